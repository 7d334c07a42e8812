"""Safety envelope: the plan may not go where the model's own perception says it cannot stop in time.

InterFuser's safety controller and Autoware's obstacle stop / cruise planners sit after the planner for the same
reason: a learned trajectory can be wrong about the one thing that must not be wrong. Here the limits come from what
the perception heads read in the newest front frames (the lead vehicle's gap and closing speed, the light's colour)
and from the map (the route's stop lines): no simulator truth. A plan that respects every limit is returned as it
is; otherwise its path is kept and its progress along the path is slowed to the fastest profile that does.

The limit is a braking-distance rule (RSS's safe longitudinal distance): at every moment the ego must be able to
stop, after ``reaction_time_s`` at its speed and then braking at ``brake_decel_mps2``, behind the point where the
lead would stop braking at ``lead_brake_decel_mps2`` (plus ``standstill_gap_m``; for a lead the ego goes on
``lead_time_gap_s`` longer before it brakes, the time gap adaptive cruise keeps), or before a red / yellow stop line
it can still stop at, or before a stop line while the crossing-traffic head sees a vehicle coming onto the ego's
path (yield: a car already past the line clears the junction rather than stop in it). With equal braking (the
shipped values) a lead at the ego's speed binds only within the distance the ego covers in the reaction time and
the time gap, plus the standstill gap, so a far car mistaken for the lead costs nothing; a lead that is slower, or
brakes, binds as soon as the ego could no longer stop behind it.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..config import fields_from
from ..geometry import arc_lengths, poses_at_arc_lengths
from ..model.perception import CROSSING_RADIUS_M, Percept

SUBSTEPS = 10


@dataclass(frozen=True)
class EnvelopeParams:
    safety_envelope: bool
    ego_front_m: float             # base_link (the plan's origin) to the front bumper
    ego_rear_m: float              # base_link to the rear bumper
    standstill_gap_m: float
    lead_near_gap_m: float         # a lead read this near or nearer is taken as touching (see limits)
    reaction_time_s: float
    brake_decel_mps2: float        # the braking the limit plans with for the ego
    lead_brake_decel_mps2: float   # the braking the lead is assumed able to do (RSS takes it harder than the ego's)
    lead_time_gap_s: float         # kept to a lead on top of the reaction time (an ACC time gap)
    max_decel_mps2: float          # the hardest braking a limited plan may ask for
    yellow_stop_decel_mps2: float  # on yellow, stop only where braking no harder than this reaches the line
    lead_min_probability: float
    light_min_probability: float
    stop_line_margin_m: float      # a limited stop ends this far before the stop line (the labels' stop margin)
    crossing_yield: bool           # hold at the stop line for perceived crossing traffic (a model with that head)
    crossing_min_probability: float
    crossing_accel_mps2: float     # the ego's acceleration when it judges whether it clears a crossing car's path
    crossing_margin_s: float       # time the ego must have cleared that point before the crossing car reaches it
    lead_fit_window_s: float       # the lead's speed is also fitted to its read positions over this long (0: off)
    lead_fit_max_gap_m: float      # ... while the read gap is below this (beyond, the head's gap hardly moves)

    @classmethod
    def from_mapping(cls, params: Mapping) -> EnvelopeParams:
        return cls(**fields_from(cls, params, "safety envelope"))


class LeadSpeedFit:
    """The lead's speed from how its read position moves (least squares over ``lead_fit_window_s``, world frame
    along the ego's heading), and the more cautious of that and the closing-speed head's reading. The head reads
    4 frames 0.5 s apart and lags a braking lead (2-6 m/s where the gap shrinks at 8-14 m/s, real-time traces);
    nearer than ~20 m the gaps it reads at control rate move with the lead, farther they hardly move (a receding
    lead read at a slowly falling gap would look like a closing one), so the fit runs only below
    ``lead_fit_max_gap_m``. A frame without a lead, or one farther than that, starts a new fit."""

    def __init__(self) -> None:
        self._rears: deque[tuple[float, float]] = deque()    # stamp, the lead's rear along the ego's heading

    def update(self, stamp: float, pose: tuple[float, float, float], speed: float, percept: Percept | None,
               p: EnvelopeParams) -> Percept | None:
        if (p.lead_fit_window_s <= 0.0 or percept is None or percept.lead_probability is None
                or percept.lead_probability < p.lead_min_probability or percept.lead_gap_m > p.lead_fit_max_gap_m):
            self._rears.clear()
            return percept
        x, y, yaw = pose
        ahead = max(0.0, percept.lead_gap_m) + p.ego_front_m
        self._rears.append((stamp, x * math.cos(yaw) + y * math.sin(yaw) + ahead))
        while self._rears[0][0] < stamp - p.lead_fit_window_s:
            self._rears.popleft()
        ts = np.array([r[0] for r in self._rears])
        if len(ts) < 3 or ts[-1] - ts[0] < 0.5 * p.lead_fit_window_s:
            return percept
        fitted = float(np.polyfit(ts - ts[-1], np.array([r[1] for r in self._rears]), 1)[0])
        closing = speed - max(0.0, fitted)
        if closing <= percept.lead_closing_mps:
            return percept
        return dataclasses.replace(percept, lead_closing_mps=closing)


@dataclass(frozen=True)
class Limit:
    """Where the ego's centre must be able to stop by time t (metres along the plan's path): ``base + speed * t +
    speed^2 / (2 decel)`` for a lead moving at ``speed``; ``base`` for a stop line. ``time_gap_s``: how much longer
    than the reaction time the ego goes on at its speed before it brakes for this limit."""
    base: float
    speed: float
    cause: str
    time_gap_s: float = 0.0

    def at(self, t: float, lead_decel: float) -> float:
        return self.base + self.speed * t + self.speed ** 2 / (2.0 * lead_decel)


def limits(percept: Percept | None, speed: float, p: EnvelopeParams, percept_age_s: float) -> list[Limit]:
    """The limits the perceived scene sets on a plan starting at ``speed``; the percept was read from frames
    ``percept_age_s`` older than the plan (in real time the newest frame is a camera period and a transport old):
    a closing lead is that much nearer now."""
    if percept is None:
        return []
    out = []
    if percept.lead_probability is not None and percept.lead_probability >= p.lead_min_probability:
        gap = max(0.0, percept.lead_gap_m - max(0.0, percept.lead_closing_mps) * max(0.0, percept_age_s))
        if gap <= p.lead_near_gap_m:   # the head reads ~4 m however near the lead is: no creeping into it
            gap = 0.0
        lead_speed = max(0.0, speed - percept.lead_closing_mps)
        out.append(Limit(gap + p.ego_front_m - p.standstill_gap_m, lead_speed,
                         f"lead {gap:.1f} m ahead, closing {percept.lead_closing_mps:.1f} m/s", p.lead_time_gap_s))
    if percept.stop_line_m is None:
        return out
    line = max(0.0, percept.stop_line_m - p.ego_front_m)      # front bumper to the stop line
    if percept.light is not None:
        _, yellow, red = percept.light
        # red: stop wherever the car still can; yellow: only where a comfortable stop reaches the line
        for colour, prob, decel in (("red", red, p.max_decel_mps2), ("yellow", yellow, p.yellow_stop_decel_mps2)):
            if prob >= p.light_min_probability and can_stop_before(line, speed, decel):
                out.append(Limit(max(0.0, line - p.stop_line_margin_m), 0.0, f"{colour} light, stop line {line:.1f} m"))
                break
    if (p.crossing_yield and percept.crossing_probability is not None
            and percept.crossing_probability >= p.crossing_min_probability
            and not clears_first(percept.crossing_where_m, percept.crossing_when_s, speed, p)):
        if can_stop_before(line, speed, p.brake_decel_mps2):
            out.append(Limit(max(0.0, line - p.stop_line_margin_m), 0.0,
                             f"crossing traffic in {percept.crossing_when_s:.1f} s at {percept.crossing_where_m:.0f} m"
                             f" (P {percept.crossing_probability:.2f}), stop line {line:.1f} m"))
    return out


def can_stop_before(line_m: float, speed: float, decel: float) -> bool:
    """Whether braking at ``decel`` from ``speed`` stops the front bumper by a line ``line_m`` ahead (half a metre
    over allowed: a car already past the line clears the junction rather than stop in it)."""
    return speed ** 2 / (2.0 * decel) <= line_m + 0.5


def clears_first(where_m: float, when_s: float, speed: float, p: EnvelopeParams) -> bool:
    """Gap acceptance (Autoware's intersection module compares the same two time windows): whether the ego, going on
    at ``crossing_accel_mps2`` from ``speed``, has its rear past the point ``where_m`` ahead where the crossing car
    comes onto its path ``crossing_margin_s`` before the car gets there at ``when_s``. Unknown where or when: no."""
    if not (math.isfinite(where_m) and math.isfinite(when_s)):
        return False
    distance = max(0.0, where_m) + p.ego_rear_m + CROSSING_RADIUS_M
    a = p.crossing_accel_mps2
    t_clear = (-speed + math.sqrt(speed * speed + 2.0 * a * distance)) / a
    return t_clear + p.crossing_margin_s <= when_s


def allowed_speed(room: float, p: EnvelopeParams, time_gap_s: float = 0.0) -> float:
    """Largest v with v * (reaction + time_gap_s) + v^2 / (2 decel) <= room."""
    if room <= 0.0:
        return 0.0
    b, rho = p.brake_decel_mps2, p.reaction_time_s + time_gap_s
    return b * (-rho + math.sqrt(rho * rho + 2.0 * room / b))


def constrain(traj: np.ndarray, dt: float, speed: float, percept: Percept | None,
              p: EnvelopeParams, percept_age_s: float) -> tuple[np.ndarray, str]:
    """(trajectory, cause): ``traj`` (H, 4) x, y, heading, speed in the ego frame, poses ``dt`` apart from +dt,
    unchanged with cause "" when no limit binds; otherwise the same path at the limited progress. ``percept_age_s``:
    how much older than the plan's odometry the frames the percept was read from are."""
    if not p.safety_envelope:
        return traj, ""
    active = limits(percept, speed, p, percept_age_s)
    if not active:
        return traj, ""
    path = np.vstack([[0.0, 0.0], traj[:, :2]])
    arc = arc_lengths(path)
    plan_speed = np.diff(arc) / dt                                 # the plan's own progress, per interval
    h = dt / SUBSTEPS
    s, v, t = 0.0, float(speed), 0.0
    s_out, v_out, cause = [], [], ""
    for k in range(len(traj)):
        for _ in range(SUBSTEPS):
            cap, binding = min(((allowed_speed(lim.at(t, p.lead_brake_decel_mps2) - s, p, lim.time_gap_s), lim)
                                for lim in active), key=lambda c: c[0])
            target = float(plan_speed[k])
            if cap < target:
                target, cause = cap, cause or binding.cause
            v = max(target, v - p.max_decel_mps2 * h) if target < v else target
            s, t = s + v * h, t + h
        s_out.append(s)
        v_out.append(v)
    if not cause:
        return traj, ""
    out = np.array(traj, dtype=np.float32, copy=True)
    out[:, :3] = poses_at_arc_lengths(traj, np.minimum(np.array(s_out), arc[-1]))
    out[:, 3] = v_out
    return out, cause


def timed_by_speed(traj: np.ndarray, dt: float, speed: float) -> np.ndarray:
    """``traj`` (H, 4) x, y, heading, speed, poses ``dt`` apart from +dt, with its poses moved along its own path to
    where its speeds take the car from ``speed`` now (trapezoids). A nav_msgs/Path carries poses only, so whoever
    tracks the plan reads its speed from their spacing (sim.controller.speeds_at_poses); the model's poses and speeds
    disagree (the second step's spacing runs about 1 m/s under its speeds), and a tracker reading the poses would
    drive slower than the plan says."""
    v = np.concatenate([[speed], np.maximum(traj[:, 3], 0.0)])
    out = np.array(traj, dtype=np.float32, copy=True)
    out[:, :3] = poses_at_arc_lengths(traj, np.cumsum(dt * (v[:-1] + v[1:]) / 2.0))
    return out
