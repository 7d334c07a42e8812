"""Trajectories in the ego frame at the current time: x forward, y left, heading CCW (rad), speed (m/s).

The history initialisation ``a_his`` is what the ego would do if it kept its current speed and yaw rate
(estimated from the past poses): the flow starts from it instead of from noise.
"""
from __future__ import annotations

import numpy as np
import torch

from ..geometry import wrap_angle


def history_trajectory(past_xyh: np.ndarray, speed: float, dt_past: float, horizon: int, dt: float) -> np.ndarray:
    """Constant speed + constant yaw rate rollout (CTRV) from the current pose (origin of the ego frame).

    ``past_xyh``: (P, 3) past poses oldest first, the last one being the current pose (~0, 0, 0).
    Returns (horizon, 4): x, y, heading, speed.
    """
    past_xyh = np.asarray(past_xyh, dtype=np.float64)
    yaw_rate = 0.0
    if len(past_xyh) >= 2:
        yaw_rate = float(wrap_angle(past_xyh[-1, 2] - past_xyh[-2, 2]) / dt_past)
    out = np.zeros((horizon, 4), dtype=np.float32)
    x = y = h = 0.0
    substeps = 5
    for k in range(horizon):
        for _ in range(substeps):
            x += speed * np.cos(h) * dt / substeps
            y += speed * np.sin(h) * dt / substeps
            h += yaw_rate * dt / substeps
        out[k] = (x, y, h, speed)
    return out


def normalise(a: torch.Tensor, scale) -> torch.Tensor:
    return a / torch.as_tensor(scale, dtype=a.dtype, device=a.device)


def denormalise(a: torch.Tensor, scale) -> torch.Tensor:
    return a * torch.as_tensor(scale, dtype=a.dtype, device=a.device)


def ego_state_vector(speed: float, accel: float, yaw_rate: float, command: str, commands,
                     route: np.ndarray | None = None) -> np.ndarray:
    """Expert conditioning: normalised speed, acceleration, yaw rate, command one-hot[, route features]."""
    onehot = np.zeros(len(commands), np.float32)
    if command in commands:
        onehot[commands.index(command)] = 1.0
    parts: list[np.ndarray] = [np.array([speed / 10.0, accel / 3.0, yaw_rate], np.float32), onehot]
    if route is not None:
        parts.append(route)
    return np.concatenate(parts).astype(np.float32)
