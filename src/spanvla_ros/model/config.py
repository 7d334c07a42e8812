"""SpanVLA configuration: what the reasoner sees and how the action expert plans. Saved as spanvla.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = ("follow lane", "turn left", "turn right", "go straight")
CAMERAS = ("front", "front_left", "front_right")


@dataclass
class SpanVLAConfig:
    cameras: tuple[str, ...] = CAMERAS
    history_frames: int = 4            # per camera, oldest first
    history_dt: float = 0.5            # 2 Hz history
    image_height: int = 112            # frames are resized to this before the VLM's own processor
    image_width: int = 196
    past_poses: int = 4                # past ego poses in the prompt (and for the history initialisation)
    horizon: int = 8                   # future poses
    dt: float = 0.5                    # spacing of future poses (s)
    action_dim: int = 4                # x, y, heading, speed in the ego frame at the current time
    action_scale: tuple[float, ...] = (20.0, 5.0, 0.5, 10.0)  # normalisation of (x, y, heading, speed)
    bridge_layer_stride: int = 2       # KV of every k-th VLM layer feeds the expert
    expert_hidden: int = 128
    expert_mlp: int = 256
    flow_steps: int = 5
    flow_init: str = "history"         # "history" (SpanVLA) or "noise" (ablation)
    history_noise_std: float = 0.05    # noise on a_his during training, in normalised units
    max_new_tokens: int = 40
    action_token: str = "<|action|>"
    ego_dim: int = 3 + len(COMMANDS)   # speed, acceleration, yaw rate, command one-hot
    commands: tuple[str, ...] = COMMANDS
    vlm_path: str = "vlm"              # relative to the checkpoint directory, or absolute (e.g. a Qwen2.5-VL-3B fine-tune)
    extra: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.cameras) * self.history_frames

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpanVLAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SpanVLA config keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("cameras", "action_scale", "commands"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "SpanVLAConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
