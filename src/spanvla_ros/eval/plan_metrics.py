"""Open-loop metrics of one plan against the logged drive, for any bag: no map or scene needed.

The set follows Autoware's planning data analyzer (autoware_tools, open-loop mode): ADE / FDE and average /
final heading error (AHE / FHE) over the full horizon and per horizon (1, 2, 3, 4 s here: the plan covers 4 s),
lateral and longitudinal deviation in the logged pose's frame; plus what a bag alone also tells: the plan's
comfort (peak longitudinal jerk, peak lateral acceleration) and its progress against the logged drive. The
PDM-style sub-scores (collisions, drivable area, lights) need the scene and are added by the caller where it
is known (eval.pdm.score)."""
from __future__ import annotations

import numpy as np

HORIZONS_S = (1.0, 2.0, 3.0, 4.0)


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def plan_vs_log(plan: np.ndarray, truth: np.ndarray, dt: float) -> dict[str, float]:
    """plan, truth: (H, 3) x, y, heading in the same (ego at plan time) frame, step ``dt``; truth is the logged
    drive at the plan's times. Returns the metric row (metres, radians, m/s^2, m/s^3; progress is a ratio)."""
    plan, truth = np.asarray(plan, float)[:, :3], np.asarray(truth, float)[:, :3]
    if plan.shape != truth.shape or len(plan) == 0:
        raise ValueError(f"plan {plan.shape} and logged future {truth.shape} must have the same (H, 3) shape")
    err = plan[:, :2] - truth[:, :2]
    dist = np.linalg.norm(err, axis=1)
    head = np.abs(_wrap(plan[:, 2] - truth[:, 2]))
    # deviation along / across the logged heading at each step (Autoware: longitudinal / lateral deviation)
    c, s = np.cos(truth[:, 2]), np.sin(truth[:, 2])
    lon, lat = err[:, 0] * c + err[:, 1] * s, -err[:, 0] * s + err[:, 1] * c
    out = dict(ade=float(dist.mean()), fde=float(dist[-1]), ahe=float(head.mean()), fhe=float(head[-1]),
               lateral_dev=float(np.abs(lat).mean()), longitudinal_dev=float(np.abs(lon).mean()))
    for h in HORIZONS_S:
        k = int(round(h / dt))
        if 1 <= k <= len(plan):
            out[f"ade_{h:g}s"], out[f"fde_{h:g}s"] = float(dist[:k].mean()), float(dist[k - 1])
    # comfort of the plan itself, from its points (the ego at the origin at t=0)
    pts = np.vstack([[0.0, 0.0, 0.0], plan])
    speed = np.linalg.norm(np.diff(pts[:, :2], axis=0), axis=1) / dt
    accel = np.diff(speed) / dt
    yaw_rate = _wrap(np.diff(pts[:, 2])) / dt
    out["max_abs_lon_jerk"] = float(np.abs(np.diff(accel) / dt).max()) if len(accel) > 1 else 0.0
    out["max_abs_lat_accel"] = float(np.abs(speed * yaw_rate).max())
    # progress: how far the plan goes against how far the logged drive went (1 = the same distance)
    truth_len = float(np.linalg.norm(np.diff(np.vstack([[0.0, 0.0], truth[:, :2]]), axis=0), axis=1).sum())
    plan_len = float(speed.sum() * dt)
    out["progress_ratio"] = plan_len / truth_len if truth_len > 0.5 else float("nan")
    return out
