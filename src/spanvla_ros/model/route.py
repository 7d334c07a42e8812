"""Route input of the action expert: where the navigation route goes, seen from the ego's current pose.

Closed-loop driving stacks give the planner the mission route (CARLA leaderboard / Bench2Drive target points,
Autoware's route, the carla-ros-bridge waypoint topic). Without it a planner that sees the road only through a
VLM bridge refreshed at ~1 Hz cannot hold the lane centre between reasoner runs (the ego moves 20 m per second
on a highway while the bridge stays the same) and cannot know which exit a roundabout route takes.

The route is a world-frame polyline (the lane centre to follow). Features are computed at control rate from the
newest odometry pose, so they are never older than the odometry the plan starts from:
lateral offset and heading error at the ego's projection on the route, then the route points at fixed arc
lengths ahead in the ego frame, then a validity bit (0 and all-zero features when no route is known; the
expert is trained with route dropout so it still plans from the cameras alone).

Stop lines come with the route (lane-level route maps give them: CARLA's traffic lights' stop waypoints, a
lanelet2 map's stop lines): the expert sees the arc length from the ego to the next one ahead, and a validity
bit. Where to stop is then a map fact; whether to stop (the light's colour) is read from the camera frames by
the expert's traffic-light head (model.expert), so the bridge no longer has to carry the distance as well.
"""
from __future__ import annotations

import math

import numpy as np

from ..geometry import arc_lengths

LATERAL_SCALE_M = 2.0
HEADING_SCALE_RAD = 0.5
POINT_SCALE_M = 10.0
STOP_SCALE_M = 20.0
STOP_RANGE_M = (-2.0, 60.0)    # a stop line is "ahead" from just behind the ego's centre to 60 m (4 s at 15 m/s)
STOP_MAX_OFFSET_M = 3.0       # farther from the route than this, a stop line belongs to another road
STOP_FEATURES = 2


def feature_dim(lookahead_m) -> int:
    return 2 + 2 * len(lookahead_m) + 1


def _project(route_xy: np.ndarray, x: float, y: float):
    """(arc length of the closest point, signed lateral offset (left > 0), segment index, vertex arc lengths)."""
    a, b = route_xy[:-1], route_xy[1:]
    seg = b - a
    seg_len2 = np.maximum((seg ** 2).sum(1), 1e-12)
    u = np.clip(((x - a[:, 0]) * seg[:, 0] + (y - a[:, 1]) * seg[:, 1]) / seg_len2, 0.0, 1.0)
    closest = a + u[:, None] * seg
    d2 = (closest[:, 0] - x) ** 2 + (closest[:, 1] - y) ** 2
    i = int(np.argmin(d2))
    cum = np.concatenate([[0.0], np.cumsum(np.sqrt(seg_len2))])
    s = cum[i] + u[i] * math.sqrt(seg_len2[i])
    cross = seg[i, 0] * (y - a[i, 1]) - seg[i, 1] * (x - a[i, 0])
    return s, math.copysign(math.sqrt(d2[i]), cross), i, cum


def points_along(route_xy: np.ndarray, s_query: np.ndarray, cum: np.ndarray) -> np.ndarray:
    """Route points at arc lengths ``s_query`` (``cum``: arc length at each vertex); past either end the end
    segment is extended straight."""
    out = np.stack([np.interp(s_query, cum, route_xy[:, 0]), np.interp(s_query, cum, route_xy[:, 1])], 1)
    for end, sel in ((-1, s_query > cum[-1]), (0, s_query < 0.0)):
        if sel.any():
            p0, p1 = (route_xy[-2], route_xy[-1]) if end == -1 else (route_xy[0], route_xy[1])
            d = (p1 - p0) / max(np.linalg.norm(p1 - p0), 1e-9)
            ref, s_ref = (route_xy[-1], cum[-1]) if end == -1 else (route_xy[0], 0.0)
            out[sel] = ref + (s_query[sel] - s_ref)[:, None] * d
    return out


def route_features(route_xy: np.ndarray | None, pose, lookahead_m) -> np.ndarray:
    """Normalised route features for an ego at world ``pose`` (x, y, yaw); zeros with validity 0 if no route."""
    out = np.zeros(feature_dim(lookahead_m), np.float32)
    if route_xy is None or len(route_xy) < 2:
        return out
    route_xy = np.asarray(route_xy, np.float64)
    x, y, yaw = float(pose[0]), float(pose[1]), float(pose[2])
    s, lateral, i, cum = _project(route_xy, x, y)
    seg = route_xy[i + 1] - route_xy[i]
    heading_err = math.remainder(math.atan2(seg[1], seg[0]) - yaw, math.tau)
    pts = points_along(route_xy, s + np.asarray(lookahead_m, np.float64), cum)
    c, sn = math.cos(yaw), math.sin(yaw)
    dx, dy = pts[:, 0] - x, pts[:, 1] - y
    ego_pts = np.stack([c * dx + sn * dy, -sn * dx + c * dy], 1)
    out[0] = np.clip(-lateral / LATERAL_SCALE_M, -5, 5)   # where the route centre is, seen from the ego (left > 0)
    out[1] = np.clip(heading_err / HEADING_SCALE_RAD, -2 * math.pi, 2 * math.pi)
    out[2:-1] = np.clip(ego_pts / POINT_SCALE_M, -10, 10).reshape(-1)
    out[-1] = 1.0
    return out


JUNCTION_RANGE_M = (-40.0, 60.0)   # the ego is at a junction from 60 m before a stop line to 40 m past it (the box
                                   # and the exit: a turn is ~30 m of route)


def stop_line_offsets(route_xy: np.ndarray | None, stop_xy: np.ndarray | None, pose) -> list[float]:
    """Arc lengths along the route from the ego's projection to each of the route's stop lines (negative: passed);
    stop lines farther than STOP_MAX_OFFSET_M from the route belong to another road and are left out."""
    if route_xy is None or len(route_xy) < 2 or stop_xy is None or len(stop_xy) == 0:
        return []
    route_xy = np.asarray(route_xy, np.float64)
    s_ego = _project(route_xy, float(pose[0]), float(pose[1]))[0]
    out = []
    for x, y in np.asarray(stop_xy, np.float64).reshape(-1, 2):
        s, offset, _, _ = _project(route_xy, float(x), float(y))
        if abs(offset) <= STOP_MAX_OFFSET_M:
            out.append(s - s_ego)
    return out


def stop_line_distance(route_xy: np.ndarray | None, stop_xy: np.ndarray | None, pose) -> float | None:
    """Arc length along the route from the ego's projection to the nearest stop line in STOP_RANGE_M, or None."""
    ahead = [d for d in stop_line_offsets(route_xy, stop_xy, pose) if STOP_RANGE_M[0] <= d <= STOP_RANGE_M[1]]
    return min(ahead) if ahead else None


def at_junction(route_xy: np.ndarray | None, stop_xy: np.ndarray | None, pose) -> bool:
    """Whether a stop line of the route is within JUNCTION_RANGE_M of the ego (the junction lead head's domain)."""
    lo, hi = JUNCTION_RANGE_M
    return any(lo <= d <= hi for d in stop_line_offsets(route_xy, stop_xy, pose))


def stop_line_features(route_xy: np.ndarray | None, stop_xy: np.ndarray | None, pose) -> np.ndarray:
    """(distance to the next stop line / STOP_SCALE_M, validity); zeros when none is ahead or none is known.
    The validity bit is the last entry of the expert's conditioning vector (it gates the traffic-light head)."""
    d = stop_line_distance(route_xy, stop_xy, pose)
    return np.zeros(STOP_FEATURES, np.float32) if d is None else np.array([d / STOP_SCALE_M, 1.0], np.float32)


def hindsight_lane_route(route_xy: np.ndarray, goal_xy, lane_width: float) -> np.ndarray:
    """The route moved sideways by whole lanes so that it passes the lane the logged drive ends in.

    Training labels only: the expert's route is road-level (lane changes allowed), the planner's input is
    lane-level. Relabelling with the lane the expert actually reached (as nuPlan/NAVSIM planners receive the
    lane-level route of the logged drive) keeps "follow the route" consistent with the targets; at run time the
    route comes from the mission and the planner keeps to it."""
    route_xy = np.asarray(route_xy, np.float64)
    _, lateral, _, _ = _project(route_xy, float(goal_xy[0]), float(goal_xy[1]))
    lanes = round(lateral / lane_width)
    if lanes == 0:
        return route_xy
    from shapely.geometry import LineString

    shifted = LineString(route_xy).offset_curve(lanes * lane_width)
    return np.asarray(shifted.coords, np.float64)


TURN_RAD = math.radians(30.0)          # heading change along the route that makes a junction a turn
COMMAND_LOOKAHEAD_M = 40.0


def route_command(route_xy: np.ndarray, s: float, junction_s: np.ndarray | None = None,
                  lookahead_m: float = COMMAND_LOOKAHEAD_M) -> str:
    """The driving command at arc length ``s`` of the route (right-handed world frame): "turn left" / "turn right"
    when the route's heading turns by more than TURN_RAD within ``lookahead_m``, "go straight" when it crosses a
    junction (``junction_s``: arc lengths of junction points) without turning, else "follow lane"."""
    ahead = points_along(route_xy, np.linspace(s, s + lookahead_m, 17), arc_lengths(route_xy))
    heading = np.unwrap(np.arctan2(*np.diff(ahead, axis=0).T[::-1]))
    turn = float(heading[-1] - heading[0])
    if abs(turn) > TURN_RAD:
        return "turn left" if turn > 0 else "turn right"
    if junction_s is not None and np.any((junction_s >= s) & (junction_s <= s + lookahead_m)):
        return "go straight"
    return "follow lane"
