"""Samples of a generated dataset (index.json + episode bags), with camera frames decoded from the bags."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.bag_io import read_episode


@dataclass
class Sample:
    meta: dict
    images: list[np.ndarray]        # history_frames x cameras, time-major

    @property
    def future(self) -> np.ndarray:
        return np.asarray(self.meta["future"], np.float32)

    @property
    def past(self) -> np.ndarray:
        return np.asarray(self.meta["past"], np.float32)


def load_samples(data_dir: Path, cameras, kinds=None, scenarios=None, limit: int | None = None,
                 progress: bool = True) -> list[Sample]:
    from tqdm import tqdm

    data_dir = Path(data_dir)
    index = json.loads((data_dir / "index.json").read_text())
    metas = [s for s in index["samples"] if (kinds is None or s["kind"] in kinds)
             and (scenarios is None or s["scenario"] in scenarios)]
    if limit:
        metas = metas[:limit]
    by_bag: dict[str, list[dict]] = {}
    for m in metas:
        by_bag.setdefault(m["bag"], []).append(m)
    out = []
    for bag, ms in tqdm(by_bag.items(), desc="decoding bags", disable=not progress):
        log = read_episode(data_dir / bag, cameras)
        for m in ms:
            imgs = [log.image_at(c, t) for t in m["frame_stamps"] for c in cameras]
            if any(i is None for i in imgs):
                continue   # a frame is missing from the bag: skip the sample rather than pad silently
            m["lights"] = {float(k): v for k, v in (m.get("lights") or {}).items()}
            out.append(Sample(m, imgs))
    return out


def scene_maps(samples: list[Sample]) -> dict:
    """(scenario, seed) -> the road's SceneMap, rebuilt by resetting the simulator (deterministic by seed)."""
    from ..sim.highway_backend import HighwayEnvBackend

    backend = HighwayEnvBackend(render=False)
    out = {}
    for s in samples:
        key = (s.meta["scenario"], s.meta["seed"])
        if key not in out:
            backend.reset(*key)
            out[key] = backend.scene_map()
    backend.close()
    return out


def score_plan(sample: Sample, traj_ego: np.ndarray, scene):
    """PDM-style score of an ego-frame (H, 4) plan for this sample, with the other agents' logged futures and
    the logged signal states (what GRPO rewards and open-loop evaluation both use)."""
    from ..eval.pdm import score
    from ..model.trajectory import to_world

    m = sample.meta
    agents = np.asarray(m["agents_future"], np.float64)
    if agents.size == 0:
        agents = np.zeros((len(m["future"]) + 1, 0, 4))
    pose = m["pose"]
    return score(to_world(pose, traj_ego), pose, agents, scene, 0.5, m["ref_progress"], m["lights"],
                 agent_sizes=[tuple(s) for s in m["agent_sizes"]])


def attach_routes(samples: list[Sample], scenes: dict) -> None:
    """meta["route_xy"]: the route polyline the expert is given for each sample, the episode's route relabelled to
    the lane the logged drive ends in (see model.route.hindsight_lane_route); meta["stop_xy"]: the route's stop
    lines. The features a model reads from them depend on that model's lookahead, so they are made per batch
    (SpanVLAPolicy.route_input)."""
    from shapely.geometry import LineString, Point

    from ..model.route import hindsight_lane_route
    from ..model.trajectory import to_world

    for s in samples:
        scene = scenes[(s.meta["scenario"], s.meta["seed"])]
        pose = s.meta["pose"]
        goal = to_world(pose, s.future[-1:])[0, :2]
        lane = min(scene.lanes, key=lambda ln: ln.centre.distance(Point(*goal)), default=None)
        s.meta["route_xy"] = hindsight_lane_route(np.asarray(scene.route.coords), goal, lane.width if lane else 4.0)
        # a stop line crosses every lane of the approach: its point on the relabelled lane
        line = LineString(s.meta["route_xy"])
        s.meta["stop_xy"] = np.array([line.interpolate(line.project(Point(*p))).coords[0]
                                      for p in scene.stop_lines_xy()]).reshape(-1, 2)


def light_label(sample: Sample) -> int:
    """Index into LIGHT_STATES of the signal now, for a sample with a stop line ahead on its route; -100 (ignored
    by cross-entropy) otherwise: once past the line its colour no longer matters to the ego."""
    from ..model.config import LIGHT_STATES
    from ..model.route import stop_line_distance

    m = sample.meta
    state = m["lights"].get(0.0)
    if state not in LIGHT_STATES or stop_line_distance(m.get("route_xy"), m.get("stop_xy"), m["pose"]) is None:
        return -100
    return LIGHT_STATES.index(state)
