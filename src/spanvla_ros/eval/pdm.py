"""PDM-style trajectory scoring, after NAVSIM's PDM score (sub-metrics, weights and thresholds), computed on
our own scenes with shapely. It is *PDM-style*, not the official NAVSIM implementation: the reference for ego
progress is the expert's logged future, agents follow their logged (or constant-velocity) futures, and the
at-fault rule is simplified (collisions while the ego stands still or from behind are not the ego's fault).

    PDMS  = NC * DAC * (5*TTC + 5*EP + 2*C) / 12
    EPDMS = NC * DAC * DDC * TLC * (5*EP + 5*TTC + 2*LK + 2*HC + 2*EC) / 16
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from shapely.geometry import Point, Polygon

from ..sim.scene_map import SceneMap

# NAVSIM comfort thresholds (history comfort / "C")
COMFORT = dict(min_lon_accel=-4.05, max_lon_accel=2.40, max_abs_lat_accel=4.89, max_abs_yaw_rate=0.95,
               max_abs_yaw_accel=1.93, max_abs_lon_jerk=4.13, max_abs_mag_jerk=8.37)
# NAVSIM v2 extended comfort: plan-to-plan consistency thresholds
EXT_COMFORT = dict(accel=0.7, jerk=0.5, yaw_rate=0.1, yaw_accel=0.1)
TTC_HORIZON, TTC_STEP = 0.9, 0.3
DDC_FULL, DDC_HALF = 2.0, 6.0          # metres of oncoming-lane progress
LK_MAX_DEV, LK_MAX_TIME = 0.5, 2.0
EP_MIN_PROGRESS = 5.0


def footprint(x: float, y: float, h: float, length: float = 5.0, width: float = 2.0) -> Polygon:
    c, s = math.cos(h), math.sin(h)
    pts = [(x + a * c * length / 2 - b * s * width / 2, y + a * s * length / 2 + b * c * width / 2)
           for a, b in ((1, 1), (1, -1), (-1, -1), (-1, 1))]
    return Polygon(pts)


@dataclass
class PDMResult:
    NC: float
    DAC: float
    DDC: float
    TLC: float
    EP: float
    TTC: float
    LK: float
    HC: float
    EC: float

    @property
    def PDMS(self) -> float:
        return self.NC * self.DAC * (5 * self.TTC + 5 * self.EP + 2 * self.HC) / 12

    @property
    def EPDMS(self) -> float:
        return self.NC * self.DAC * self.DDC * self.TLC * (5 * self.EP + 5 * self.TTC + 2 * self.LK + 2 * self.HC
                                                           + 2 * self.EC) / 16

    def as_dict(self) -> dict:
        return {**asdict(self), "PDMS": self.PDMS, "EPDMS": self.EPDMS}


def _kinematics(traj: np.ndarray, dt: float):
    """traj (T, 4) world x, y, heading, speed including t=0.
    Returns lon accel, lat accel, yaw rate, yaw accel, jerks."""
    v = traj[:, 3]
    h = np.unwrap(traj[:, 2])
    lon_acc = np.gradient(v, dt)
    yaw_rate = np.gradient(h, dt)
    yaw_acc = np.gradient(yaw_rate, dt)
    lat_acc = v * yaw_rate
    lon_jerk = np.gradient(lon_acc, dt)
    mag_jerk = np.hypot(lon_jerk, np.gradient(lat_acc, dt))
    return lon_acc, lat_acc, yaw_rate, yaw_acc, lon_jerk, mag_jerk


def comfort(traj: np.ndarray, dt: float) -> float:
    lon, lat, yr, ya, lj, mj = _kinematics(traj, dt)
    c = COMFORT
    ok = (lon.min() >= c["min_lon_accel"] and lon.max() <= c["max_lon_accel"]
          and np.abs(lat).max() <= c["max_abs_lat_accel"]
          and np.abs(yr).max() <= c["max_abs_yaw_rate"] and np.abs(ya).max() <= c["max_abs_yaw_accel"]
          and np.abs(lj).max() <= c["max_abs_lon_jerk"] and np.abs(mj).max() <= c["max_abs_mag_jerk"])
    return float(ok)


def extended_comfort(traj: np.ndarray, prev: np.ndarray | None, shift: int, dt: float) -> float:
    """Consistency with the previous plan over their overlap; ``shift`` = samples between the two plans."""
    if prev is None or len(prev) - shift < 3:
        return 1.0
    n = min(len(traj), len(prev) - shift)
    a = _kinematics(traj[:n], dt)
    b = _kinematics(prev[shift:shift + n], dt)
    lon = np.abs(a[0] - b[0]).mean()
    jerk = np.abs(a[4] - b[4]).mean()
    yr = np.abs(a[2] - b[2]).mean()
    ya = np.abs(a[3] - b[3]).mean()
    e = EXT_COMFORT
    return float(lon <= e["accel"] and jerk <= e["jerk"] and yr <= e["yaw_rate"] and ya <= e["yaw_accel"])


def score(plan: np.ndarray, ego0, agents_future: np.ndarray, scene: SceneMap, dt: float,
          reference_progress: float, light_states: dict[float, str] | None = None,
          prev_plan: np.ndarray | None = None, prev_shift: int = 1, ego_size=(5.0, 2.0), agent_sizes=None) -> PDMResult:
    """plan: (N, 4) world x, y, heading, speed at dt, 2dt, ...; ego0: (x, y, heading, speed) now.
    agents_future: (N+1, A, 4) world states of other agents at 0, dt, ... (NaN rows for absent agents).
    light_states: time offset from now (s) -> signal state of the ego's stop line, if the scene has one."""
    traj = np.vstack([np.asarray(ego0, np.float64)[None, :4], np.asarray(plan, np.float64)[:, :4]])
    T = len(traj)
    L, W = ego_size
    A = agents_future.shape[1] if agents_future.size else 0
    sizes = agent_sizes if agent_sizes is not None else [(5.0, 2.0)] * A

    ego_polys = [footprint(traj[k, 0], traj[k, 1], traj[k, 2], L, W) for k in range(T)]
    # NC: at-fault collisions only
    nc = 1.0
    for k in range(1, T):
        for a in range(A):
            st = agents_future[min(k, len(agents_future) - 1), a]
            if not np.isfinite(st).all():
                continue
            if ego_polys[k].intersects(footprint(*st[:3], *sizes[a])):
                rel = _to_frame(traj[k], st[:2])
                if traj[k, 3] < 0.5 or rel[0] < -L / 4:
                    continue  # standing still, or hit from behind
                nc = 0.0
                break
        if nc == 0.0:
            break
    dac = float(all(scene._drivable.contains(Point(c)) for poly in ego_polys[1:] for c in poly.exterior.coords[:4]))

    oncoming, dev_time, lk = 0.0, 0.0, 1.0
    for k in range(1, T):
        aligned_dev, opposing = scene.lane_info(*traj[k, :3])
        if opposing:
            oncoming += float(np.hypot(*(traj[k, :2] - traj[k - 1, :2])))
        if aligned_dev is not None and aligned_dev > LK_MAX_DEV:
            dev_time += dt
            if dev_time > LK_MAX_TIME:
                lk = 0.0
        else:
            dev_time = 0.0
    ddc = 1.0 if oncoming < DDC_FULL else 0.5 if oncoming < DDC_HALF else 0.0

    s = np.array([scene.route.project(Point(p)) for p in traj[:, :2]])
    tlc = 1.0
    if scene.stop_s is not None:
        front = s + L / 2
        for k in range(1, T):
            state = _light_at(light_states or {}, k * dt)
            if state == "red" and front[k - 1] <= scene.stop_s < front[k]:
                tlc = 0.0
    progress = float(s[-1] - s[0])
    ep = 1.0 if reference_progress < EP_MIN_PROGRESS else float(np.clip(progress / reference_progress, 0.0, 1.0))

    ttc = 1.0
    for k in range(0, T):
        if traj[k, 3] < 0.5 or ttc == 0.0:
            continue
        for a in range(A):
            st = agents_future[min(k, len(agents_future) - 1), a]
            if not np.isfinite(st).all() or _to_frame(traj[k], st[:2])[0] < 0:
                continue
            for tau in np.arange(TTC_STEP, TTC_HORIZON + 1e-9, TTC_STEP):
                e = _cv(traj[k], tau)
                o = _cv(st, tau)
                if footprint(e[0], e[1], e[2], L, W).intersects(footprint(o[0], o[1], o[2], *sizes[a])):
                    ttc = 0.0
                    break
            if ttc == 0.0:
                break
    hc = comfort(traj, dt)
    ec = extended_comfort(traj[1:], prev_plan, prev_shift, dt)
    return PDMResult(nc, dac, ddc, tlc, ep, ttc, lk, hc, ec)


def _light_at(states: dict[float, str], t: float) -> str:
    if not states:
        return "green"
    keys = sorted(states)
    i = max(0, int(np.searchsorted(keys, t + 1e-9)) - 1)
    return states[keys[i]]


def _to_frame(pose, xy) -> np.ndarray:
    c, s = math.cos(pose[2]), math.sin(pose[2])
    dx, dy = xy[0] - pose[0], xy[1] - pose[1]
    return np.array([c * dx + s * dy, -s * dx + c * dy])


def _cv(state, tau):
    return (state[0] + state[3] * math.cos(state[2]) * tau, state[1] + state[3] * math.sin(state[2]) * tau, state[2])


def ade_fde(pred_xy: np.ndarray, true_xy: np.ndarray) -> tuple[float, float]:
    d = np.linalg.norm(np.asarray(pred_xy)[:, :2] - np.asarray(true_xy)[:, :2], axis=-1)
    return float(d.mean()), float(d[-1])
