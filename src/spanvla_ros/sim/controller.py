"""Tracking controller for a planned path: pure pursuit for steering, PI on speed for acceleration.

The planner's path is in the ego frame at its stamp; the caller passes it already expressed in the current
ego frame (see ``path_to_current_frame``), so a plan a few control ticks old is still tracked correctly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..geometry import arc_lengths, to_ego, to_world
from .types import Control

STOPPED_MPS = 0.3    # a planned speed below this is a stop


@dataclass
class TrackerConfig:
    wheelbase: float = 2.5
    lookahead_min: float = 4.0
    lookahead_gain: float = 0.5        # lookahead = max(min, gain * speed)
    speed_kp: float = 1.2
    speed_ki: float = 0.1
    integral_limit: float = 2.0        # m/s*s: the I-term can add at most ki*limit = 0.2 m/s^2 (anti-windup: a
                                       # long braking phase must not keep braking once the plan's speed is met)
    preview_s: float = 0.8             # speed target: planned speed this far ahead
    max_accel: float = 6.0             # the expert vehicle's (highway-env IDMVehicle.ACC_MAX): the plans are learnt
                                       # from its driving, and a lower cap lags their launches from a stop
    max_decel: float = 7.0
    max_steer: float = 0.6


def path_to_current_frame(path: np.ndarray, plan_pose, now_pose) -> np.ndarray:
    """Re-express an (N, >=3) ego-frame path (x, y, heading, ...) planned at plan_pose (world x, y, yaw) in the
    ego frame at now_pose; further columns (speed) are kept."""
    return to_ego(now_pose, to_world(plan_pose, path))


def speeds_at_poses(xy: np.ndarray, dt: float) -> np.ndarray:
    """(N,) speeds at N path poses ``dt`` apart from +dt (the path starts at the origin at 0), from the poses alone:
    what a nav_msgs/Path, which carries no velocities, says about the plan's speed profile. The mean of the two
    segments around a pose (exact for constant acceleration; a segment's own mean speed is its midpoint's, half a
    step late), extrapolated by the last two segments at the end."""
    seg = np.linalg.norm(np.diff(np.vstack([[0.0, 0.0], xy]), axis=0), axis=1)
    v = np.empty(len(seg))
    v[:-1] = (seg[:-1] + seg[1:]) / (2.0 * dt)
    v[-1] = max(0.0, v[-2] + (seg[-1] - seg[-2]) / dt) if len(seg) > 1 else seg[-1] / dt
    return v


def tracked_path(poses: np.ndarray, dt: float) -> np.ndarray:
    """(N, >=3) ego-frame poses x, y, heading ``dt`` apart from +dt -> (N, 4) with the speeds their spacing gives:
    what the tracker follows of a nav_msgs/Path (sim_bridge) and, the same way, of a plan in the lockstep loop."""
    poses = np.asarray(poses)
    return np.c_[poses[:, :3], speeds_at_poses(poses[:, :2], dt)]


class PathTracker:
    def __init__(self, cfg: TrackerConfig | None = None):
        self.cfg = cfg or TrackerConfig()
        self._integral = 0.0

    def reset(self) -> None:
        self._integral = 0.0

    def control(self, path: np.ndarray, speed: float, dt: float, plan_dt: float, elapsed_s: float) -> Control:
        """path: (N, 4) x, y, heading, speed in the current ego frame, poses plan_dt apart starting at +plan_dt of
        the plan's time, ``elapsed_s`` of which have passed (a plan received over DDS is already some 0.1 s old:
        its speed profile is read from there on, or a braking plan is tracked late and too softly)."""
        c = self.cfg
        pts = np.vstack([[0.0, 0.0], path[:, :2]])
        # target speed: the plan's speed profile, previewed a little to lead the vehicle's lag
        t_axis = plan_dt * np.arange(len(path) + 1)
        v_plan = np.concatenate([path[:1, 3], path[:, 3]])
        v_target = max(0.0, float(np.interp(max(0.0, elapsed_s) + c.preview_s, t_axis, v_plan)))
        err = v_target - speed
        self._integral = float(np.clip(self._integral + err * dt, -c.integral_limit, c.integral_limit))
        accel = float(np.clip(c.speed_kp * err + c.speed_ki * self._integral, -c.max_decel, c.max_accel))
        # a plan that stops: brake at least as hard as stopping at its stop point takes (a speed loop alone runs a
        # metre or two past it at low speed, e.g. over a stop line), as a longitudinal controller's stop mode does
        stopped = np.nonzero(v_plan[1:] < STOPPED_MPS)[0]
        if len(stopped) and speed > STOPPED_MPS:
            to_stop = max(float(arc_lengths(pts)[stopped[0] + 1]), 0.1)
            accel = min(accel, max(-c.max_decel, -speed ** 2 / (2.0 * to_stop)))
        if v_target < 0.3 and speed < 0.5:
            accel, self._integral = -c.max_decel * 0.5, 0.0   # hold the stop
        # pure pursuit on the densified path
        dense = _densify(pts, 0.5)
        lookahead = max(c.lookahead_min, c.lookahead_gain * speed)
        dist = np.hypot(dense[:, 0], dense[:, 1])
        ahead = np.nonzero((dist >= lookahead) & (dense[:, 0] > 0.0))[0]
        target = dense[ahead[0]] if len(ahead) else dense[-1]
        ld2 = max(float(target @ target), 1e-3)
        curvature = 2.0 * target[1] / ld2
        steer = float(np.clip(math.atan(c.wheelbase * curvature), -c.max_steer, c.max_steer))
        if np.hypot(*dense[-1]) < 1.0:     # a stop plan: keep the wheels straight
            steer = 0.0
        return Control(accel, steer)


def _densify(pts: np.ndarray, step: float) -> np.ndarray:
    s = arc_lengths(pts)
    if s[-1] < 1e-6:
        return pts[-1:].copy()
    q = np.arange(0.0, s[-1] + 1e-9, step)
    return np.stack([np.interp(q, s, pts[:, 0]), np.interp(q, s, pts[:, 1])], 1)
