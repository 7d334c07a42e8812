"""Samples of a generated dataset (index.json + episode bags), with camera frames decoded from the bags."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from ..sim.agents import futures_from_json
from ..sim.scenarios import scenario_of
from .bag_io import read_episode


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
            m["bag_path"] = str((data_dir / bag).resolve())   # identifies the episode across dataset copies
            m["dt"] = index["dt"]                               # the step of its future and the agents' futures
            out.append(Sample(m, cast(list[np.ndarray], imgs)))
    return out


def sample_scenario(sample: Sample):
    """The scenario the sample's episode ran (a scenario file's is carried in the sample: data.generate)."""
    return scenario_of(sample.meta["scenario"], sample.meta.get("scenario_spec"))


def scene_maps(samples: list[Sample]) -> dict:
    """(scenario, seed) -> the road's SceneMap, rebuilt by resetting the simulator (deterministic by seed)."""
    from ..sim.highway_backend import HighwayEnvBackend

    backend = HighwayEnvBackend(render=False)
    out = {}
    for s in samples:
        key = (s.meta["scenario"], s.meta["seed"])
        if key not in out:
            backend.reset(sample_scenario(s), s.meta["seed"])
            out[key] = backend.scene_map()
    backend.close()
    return out


def score_plan(sample: Sample, traj_ego: np.ndarray, scene):
    """PDM-style score of an ego-frame (H, 4) plan for this sample, with the other agents' logged futures and
    the logged signal states (what GRPO rewards and open-loop evaluation both use)."""
    from ..eval.pdm import score
    from ..geometry import to_world

    m = sample.meta
    agents = futures_from_json(m["agents_future"])
    if agents.size == 0:
        agents = np.zeros((len(m["future"]) + 1, 0, 4))
    pose = m["pose"]
    return score(to_world(pose, traj_ego), pose, agents, scene, m["dt"], m["ref_progress"], m["lights"],
                 agent_sizes=[tuple(s) for s in m["agent_sizes"]])


def attach_routes(samples: list[Sample], scenes: dict) -> None:
    """meta["route_xy"]: the route polyline the expert is given for each sample, the episode's route, relabelled to
    the lane the logged drive ends in where the expert changes lanes by choice (the open highway; see
    model.route.hindsight_lane_route); meta["stop_xy"]: the route's stop
    lines. The features a model reads from them depend on that model's lookahead, so they are made per batch
    (SpanVLAPolicy.route_input)."""
    from shapely.geometry import LineString, Point

    from ..geometry import to_world
    from ..model.route import hindsight_lane_route

    for s in samples:
        scene = scenes[(s.meta["scenario"], s.meta["seed"])]
        derive_facts(s, scene)
        route = np.asarray(scene.route.coords)
        if sample_scenario(s).expert_changes_lanes:
            # only there does the expert leave the route's lane by choice; elsewhere a label that ends in another
            # lane (a DAgger state the policy left the lane in) must not move the route the planner is given
            goal = to_world(s.meta["pose"], s.future[-1:])[0, :2]
            lane = min(scene.lanes, key=lambda ln: ln.centre.distance(Point(*goal)), default=None)
            route = hindsight_lane_route(route, goal, lane.width if lane else 4.0)
        s.meta["route_xy"] = route
        # a stop line crosses every lane of the approach: its point on the relabelled lane
        line = LineString(s.meta["route_xy"])
        s.meta["stop_xy"] = np.array([line.interpolate(line.project(Point(*p))).coords[0]
                                      for p in scene.stop_lines_xy()]).reshape(-1, 2)


ROUTE_LABEL_TOLERANCE_M = 2.0   # half a lane: a label further than this from the route drives another lane


def drop_off_route_labels(samples: list[Sample]) -> tuple[list[Sample], int]:
    """Samples whose future ends off the route they are given (meta["route_xy"], after attach_routes) by more than
    ROUTE_LABEL_TOLERANCE_M are dropped: the planner is told to follow the route, and a label that drives another
    lane or road (a DAgger state where the policy had already left the route and the expert, from there, follows
    the lane it is in) teaches it to ignore the route. Returns (kept, dropped count)."""
    from shapely.geometry import LineString, Point

    from ..geometry import to_world

    kept = []
    for s in samples:
        route = LineString(s.meta["route_xy"])
        fut = to_world(s.meta["pose"], s.future)
        if route.distance(Point(*fut[-1, :2])) <= ROUTE_LABEL_TOLERANCE_M:   # where it ends (recoveries start off)
            kept.append(s)
    return kept, len(samples) - len(kept)


def derive_facts(sample: Sample, scene) -> None:
    """meta["facts"] from what the sample stores: the other agents at the sample time (the first row of their
    logged futures), the signal state and the episode's route; derived again for every sample so that the
    labels follow data.scene_text.perception_facts as it is now (also for datasets generated before it changed,
    or before facts were stored at all)."""
    from shapely.geometry import Point

    from ..data.scene_text import facts_from_state, perception_facts
    from ..sim.types import VEHICLE_LENGTH_M

    m = sample.meta
    now = futures_from_json(m["agents_future"])
    agents = [(i, *row) for i, row in enumerate(now[0]) if np.isfinite(row).all()] if now.size else []
    light = m["lights"].get(0.0)
    light_dist = None
    if light is not None and scene.stop_s is not None:   # as data.generate logs it: front bumper to the line
        light_dist = scene.stop_s - scene.route.project(Point(m["pose"][0], m["pose"][1])) - VEHICLE_LENGTH_M / 2
    facts = facts_from_state(m["pose"], agents, m["scenario"], m["command"], light, light_dist, route=scene.route)
    m["facts"] = perception_facts(facts)


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


STOP_MARGIN_M = 1.0   # the relabelled plan stops this far before the line


def stop_at_signal_future(meta: dict) -> np.ndarray | None:
    """The label a camera-only planner is taught at a signal it must stop for, or None to keep the logged future.

    The expert's logged 4 s future crosses a red stop line whenever the light turns green within the horizon (43 %
    of the red samples near the line): it knows the phase timing, which neither the cameras nor the map give. A
    planner that sees only the current colour cannot tell those samples from the ones where the light stays red, so
    it learns the mixture and plans through the line. Taught instead: stop before the line at the colour seen now
    (the expert's own rule, sim.types.must_stop), along the logged path, braking evenly to STOP_MARGIN_M before it;
    once the light turns green the next plan goes."""
    from ..sim.types import must_stop

    facts = meta.get("facts") or {}
    state, gap = (meta.get("lights") or {}).get(0.0), facts.get("light_dist")
    future = np.asarray(meta["future"], np.float64)
    speed = float(meta["speed"])
    if gap is None or not must_stop(state, gap, speed):
        return None
    path = np.vstack([[0.0, 0.0, 0.0, speed], future])
    seg = np.linalg.norm(np.diff(path[:, :2], axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    stop_s = max(gap - STOP_MARGIN_M, 0.0)   # ego-centre travel; gap is from the front bumper, as the expert's
    if cum[-1] <= stop_s + 0.1:
        return None                          # the logged future already stops before the line
    # brake evenly to rest at stop_s (already at rest, or at the line: stay)
    t_stop = 2 * stop_s / speed if speed > 0.1 and stop_s > 0.05 else 0.0
    decel = speed / t_stop if t_stop > 0 else math.inf
    out = future.copy()
    for k in range(len(future)):
        t = 0.5 * (k + 1)
        s_t = stop_s if t >= t_stop else speed * t - 0.5 * decel * t * t
        out[k, 0] = np.interp(s_t, cum, path[:, 0])
        out[k, 1] = np.interp(s_t, cum, path[:, 1])
        out[k, 2] = np.interp(s_t, cum, np.unwrap(path[:, 2]))
        out[k, 3] = max(speed - decel * t, 0.0) if math.isfinite(decel) else 0.0
    return out.astype(np.float32)


def relabel_signal_stops(samples: list[Sample]) -> int:
    """Apply stop_at_signal_future to every sample (in place); returns how many futures changed. The logged future
    stays in meta["logged_future"]."""
    n = 0
    for s in samples:
        new = stop_at_signal_future(s.meta)
        if new is not None:
            s.meta["logged_future"] = s.meta["future"]
            s.meta["future"] = new.round(4).tolist()
            n += 1
    return n
