"""Every coordinate conversion of the project, in one place (as carla-ros-bridge keeps its transforms in one module).

The stack's frame is right-handed and planar: x forward / east, y left / north, yaw counter-clockwise in radians,
poses (x, y, yaw). Here: angle wrapping, SE(2) between the world and an ego frame, yaw <-> quaternion (the planar
poses of every ROS message), and CARLA's left-handed world (y right, yaw clockwise in degrees) to and from ours.
"""
from __future__ import annotations

import math

import numpy as np


def wrap_angle(a):
    """Angle(s) in [-pi, pi)."""
    return (a + np.pi) % (2 * np.pi) - np.pi


def arc_lengths(xy: np.ndarray) -> np.ndarray:
    """(N,) distance along a polyline (N, >=2) from its first point to each of its points."""
    xy = np.asarray(xy, np.float64)
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy[:, :2], axis=0), axis=1))])


def poses_at_arc_lengths(traj: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(len(s), 3) x, y, heading at arc lengths ``s`` along the path of ``traj`` (H, >=3 ego-frame poses; the path
    starts at the origin heading along x); beyond its end, straight on along its last segment."""
    traj = np.asarray(traj, np.float64)
    s = np.asarray(s, np.float64)
    path = np.vstack([[0.0, 0.0], traj[:, :2]])
    heading = np.concatenate([[0.0], traj[:, 2]])
    arc = arc_lengths(path)
    out = np.stack([np.interp(s, arc, path[:, 0]), np.interp(s, arc, path[:, 1]), np.interp(s, arc, heading)], 1)
    beyond = s > arc[-1]
    if beyond.any():
        last = path[-1] - path[-2]
        norm = float(np.hypot(*last))
        direction = last / norm if norm > 1e-6 else np.array([math.cos(heading[-1]), math.sin(heading[-1])])
        out[beyond, :2] = path[-1] + (s[beyond] - arc[-1])[:, None] * direction
        out[beyond, 2] = heading[-1]
    return out


def to_ego(pose, pts: np.ndarray) -> np.ndarray:
    """World (N, >=3) x, y, heading[, more columns kept] -> the ego frame of ``pose`` (x, y, yaw)."""
    c, s = math.cos(pose[2]), math.sin(pose[2])
    out = np.array(pts, dtype=np.float64, copy=True)
    dx, dy = pts[:, 0] - pose[0], pts[:, 1] - pose[1]
    out[:, 0], out[:, 1] = c * dx + s * dy, -s * dx + c * dy
    out[:, 2] = np.arctan2(np.sin(pts[:, 2] - pose[2]), np.cos(pts[:, 2] - pose[2]))
    return out


def to_world(pose, pts: np.ndarray) -> np.ndarray:
    """Ego-frame (N, >=3) x, y, heading[, ...] of ``pose`` -> world."""
    c, s = math.cos(pose[2]), math.sin(pose[2])
    out = np.array(pts, dtype=np.float64, copy=True)
    out[:, 0] = pose[0] + c * pts[:, 0] - s * pts[:, 1]
    out[:, 1] = pose[1] + s * pts[:, 0] + c * pts[:, 1]
    out[:, 2] = pts[:, 2] + pose[2]
    return out


def quat_from_yaw(yaw: float) -> tuple[float, float, float, float]:
    """(w, x, y, z) of a rotation by ``yaw`` about z."""
    return math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)


def yaw_from_quat(q) -> float:
    """Yaw (about z) of a geometry_msgs/Quaternion (any object with w, x, y, z)."""
    return math.atan2(2 * (q.w * q.z + q.x * q.y), 1 - 2 * (q.y * q.y + q.z * q.z))


# ------------------------------------------------------------------ CARLA (left-handed: y right, yaw clockwise, deg)
def from_carla_xy(x: float, y: float) -> tuple[float, float]:
    return x, -y


def from_carla_yaw(yaw_deg: float) -> float:
    return -math.radians(yaw_deg)


def to_carla_yaw(yaw: float) -> float:
    return -math.degrees(yaw)


def to_carla_location(carla, x: float, y: float, z: float = 0.5):
    """A point of ours as a carla.Location (``carla``: the client module)."""
    return carla.Location(x=float(x), y=float(-y), z=z)
