"""The reasoner's prompt, in Qwen2.5-VL chat format, so that a real Qwen2.5-VL checkpoint reads it as trained."""
from __future__ import annotations

import numpy as np

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
SYSTEM = "You drive the ego vehicle. Look at the cameras, say what matters and why, then act."


def build_prompt(cameras, history_frames: int, history_dt: float, command: str, speed: float, accel: float,
                 past_xy: np.ndarray) -> str:
    """Images are ordered time-major (oldest first), cameras in ``cameras`` order within a time step."""
    lines = [f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"]
    for k in range(history_frames):
        t = -(history_frames - 1 - k) * history_dt
        cams = " ".join(f"{c}: {IMAGE_PLACEHOLDER}" for c in cameras)
        lines.append(f"t={t:+.1f}s {cams}\n")
    past = " ".join(f"({x:.1f},{y:.1f})" for x, y in np.asarray(past_xy)[:, :2])
    lines.append(f"command: {command}. speed {speed:.1f} m/s, acceleration {accel:+.1f} m/s2. "
                 f"past trajectory: {past}<|im_end|>\n<|im_start|>assistant\n")
    return "".join(lines)
