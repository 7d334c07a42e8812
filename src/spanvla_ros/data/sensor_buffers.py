"""Buffers between the sensor callbacks and the model, free of ROS so they can be tested directly.

FrameHistory keeps recent frames per camera; a frame *set* exists only when every camera has a frame within
``max_skew`` of a reference time, and the history is taken at ``history_dt`` spacing (2 Hz) back from the
newest complete set. EgoHistory turns odometry into the past poses in the current ego frame, plus speed,
acceleration and yaw rate.
"""
from __future__ import annotations

import bisect
import math
import threading
from collections import deque

import numpy as np

from ..geometry import to_ego, to_world


class FrameHistory:
    def __init__(self, cameras, history_frames: int, history_dt: float, max_skew: float, keep_s: float | None = None):
        self.cameras = tuple(cameras)
        self.history_frames, self.history_dt, self.max_skew = history_frames, history_dt, max_skew
        keep_s = keep_s or history_dt * (history_frames + 1)
        self._keep_s = keep_s
        self._buf: dict[str, deque[tuple[float, np.ndarray]]] = {c: deque() for c in self.cameras}  # stamps increasing
        self._lock = threading.Lock()

    def add(self, camera: str, stamp: float, image: np.ndarray) -> None:
        if camera not in self._buf:
            raise KeyError(f"unknown camera {camera!r}")
        with self._lock:
            buf = self._buf[camera]
            if buf and stamp <= buf[-1][0]:
                return  # out of order or duplicate: keep the buffer sorted
            buf.append((stamp, image))
            while buf and buf[0][0] < stamp - self._keep_s:
                buf.popleft()

    def _nearest(self, camera: str, t: float):
        buf = self._buf[camera]
        stamps = [s for s, _ in buf]
        i = bisect.bisect_left(stamps, t)
        best = min((j for j in (i - 1, i) if 0 <= j < len(buf)), key=lambda j: abs(stamps[j] - t), default=None)
        return None if best is None else buf[best]

    def latest_complete_stamp(self) -> float | None:
        """Newest stamp of the front camera (first) for which every camera has a frame within max_skew."""
        with self._lock:
            return self._latest_complete_stamp()

    def _latest_complete_stamp(self) -> float | None:
        for stamp, _ in reversed(self._buf[self.cameras[0]]):
            if all((f := self._nearest(c, stamp)) is not None and abs(f[0] - stamp) <= self.max_skew
                   for c in self.cameras[1:]):
                return stamp
        return None

    def history(self) -> tuple[list[np.ndarray], float] | None:
        """history_frames x cameras images, time-major oldest first, and the stamp of the newest set.
        Older slots not yet filled repeat the oldest available set (start-up), as a constant-history pad."""
        with self._lock:   # one hold: frames dropped in between (drop_before) would leave a camera empty
            t0 = self._latest_complete_stamp()
            if t0 is None:
                return None
            images = []
            for k in range(self.history_frames - 1, -1, -1):
                t = t0 - k * self.history_dt
                for c in self.cameras:
                    f = self._nearest(c, t)
                    images.append(f[1])
        return images, t0

    def camera_history(self, camera: str) -> tuple[list[np.ndarray], list[float]] | None:
        """One camera's history_frames images at history_dt spacing back from its newest frame (oldest first), and
        their stamps: what the perception heads read at control rate, fresher than the last complete frame set."""
        with self._lock:
            buf = self._buf[camera]
            if not buf:
                return None
            t0 = buf[-1][0]
            picked = [self._nearest(camera, t0 - k * self.history_dt) for k in range(self.history_frames - 1, -1, -1)]
        return [f[1] for f in picked], [f[0] for f in picked]

    def drop_before(self, stamp: float) -> None:
        """Forget every frame stamped before ``stamp``."""
        with self._lock:
            for buf in self._buf.values():
                while buf and buf[0][0] < stamp:
                    buf.popleft()

    def missing_cameras(self) -> list[str]:
        with self._lock:
            return [c for c, b in self._buf.items() if not b]


class EgoHistory:
    """Odometry samples (t, x, y, yaw, speed) in the odometry frame."""

    def __init__(self, keep_s: float = 4.0):
        self._buf: deque = deque()
        self._keep_s = keep_s
        self._lock = threading.Lock()

    def add(self, t: float, x: float, y: float, yaw: float, speed: float) -> None:
        with self._lock:
            if self._buf and t <= self._buf[-1][0]:
                return
            self._buf.append((t, x, y, yaw, speed))
            while self._buf and self._buf[0][0] < t - self._keep_s:
                self._buf.popleft()

    @property
    def latest_stamp(self) -> float | None:
        return self._buf[-1][0] if self._buf else None

    def latest_sample(self) -> tuple[float, float, float, float, float] | None:
        """Newest (t, x, y, yaw, speed)."""
        with self._lock:
            return tuple(self._buf[-1]) if self._buf else None

    def latest_pose(self) -> tuple[float, float, float] | None:
        """Newest (x, y, yaw) in the odometry frame."""
        sample = self.latest_sample()
        return None if sample is None else sample[1:4]

    def clear(self) -> None:
        with self._lock:
            self._buf.clear()

    def _interp(self, arr: np.ndarray, t: float) -> np.ndarray:
        ts = arr[:, 0]
        if t <= ts[0]:
            # before the first sample (start-up): where the car was at its first speed and heading, as a constant-
            # velocity past; repeating the first pose would be a standing past at a speed (the model never trains
            # on one: its samples start after a full history)
            _, x, y, yaw, v = arr[0]
            behind = to_world((x, y, yaw), np.array([[-v * (ts[0] - t), 0.0, 0.0]]))[0]
            return np.array([*behind, v])
        yaw = np.unwrap(arr[:, 3])
        cols = [np.interp(t, ts, arr[:, 1]), np.interp(t, ts, arr[:, 2]), np.interp(t, ts, yaw),
                np.interp(t, ts, arr[:, 4])]
        return np.array(cols)

    def state(self, past_poses: int, dt: float):
        """(past_xyh (P,3) in the current ego frame oldest first, speed, accel, yaw_rate, stamp) or None."""
        with self._lock:
            if not self._buf:
                return None
            arr = np.array(self._buf, dtype=np.float64)
        t_now, x0, y0, h0, v0 = arr[-1]
        poses = np.array([self._interp(arr, t_now - k * dt)[:3] for k in range(past_poses - 1, -1, -1)])
        past = to_ego((x0, y0, h0), poses)
        _, _, h_prev, v_prev = self._interp(arr, t_now - dt)
        accel = (v0 - v_prev) / dt if len(arr) > 1 else 0.0
        yaw_rate = math.atan2(math.sin(h0 - h_prev), math.cos(h0 - h_prev)) / dt if len(arr) > 1 else 0.0
        return past, float(v0), float(accel), float(yaw_rate), float(t_now)
