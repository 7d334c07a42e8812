"""Other agents' futures, as the PDM-style scorer reads them: one builder and one marker for an agent that is not
there at a time (NaN in memory, null in a dataset's JSON)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .types import AgentState

AgentRow = tuple   # (id, x, y, heading, speed, length, width): what data generation logs per step
OLD_MISSING = 1e5  # datasets written before null: 1e6 stood for "absent"; anything this far out is read as absent


def agent_futures(frames: Sequence[Sequence[AgentRow]]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """(K, A, 4) world states x, y, heading, speed of every agent seen in any of the K frames (now, +dt, ...), NaN
    where an agent is absent, and each agent's (length, width)."""
    ids = sorted({a[0] for frame in frames for a in frame})
    col = {i: c for c, i in enumerate(ids)}
    out = np.full((len(frames), len(ids), 4), np.nan)
    sizes = [(5.0, 2.0)] * len(ids)
    for k, frame in enumerate(frames):
        for a in frame:
            out[k, col[a[0]]] = a[1:5]
            sizes[col[a[0]]] = (a[5], a[6])
    return out, sizes


def constant_velocity_frames(agents: Sequence[AgentState], horizon: int, dt: float) -> list[list[AgentRow]]:
    """The agents seen now, carried on at their speed and heading for ``horizon`` steps of ``dt``."""
    return [[(a.id, a.x + a.speed * math.cos(a.heading) * k * dt, a.y + a.speed * math.sin(a.heading) * k * dt,
              a.heading, a.speed, a.length, a.width) for a in agents] for k in range(horizon + 1)]


def futures_to_json(futures: np.ndarray) -> list:
    """Rounded nested lists, null where an agent is absent (JSON has no NaN)."""
    return [[[None if not np.isfinite(v) else round(float(v), 3) for v in state] for state in frame]
            for frame in futures]


def futures_from_json(data) -> np.ndarray:
    """The (K, A, 4) array back, NaN where absent (null, or an older dataset's 1e6)."""
    arr = np.array([[[np.nan if v is None else v for v in state] for state in frame] for frame in data],
                   np.float64) if len(data) else np.zeros((0, 0, 4))
    arr[np.abs(arr) >= OLD_MISSING] = np.nan
    return arr
