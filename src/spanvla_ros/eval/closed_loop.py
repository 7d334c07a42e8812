"""Closed-loop driving in the simulator, ROS-free and in lockstep (the simulator waits for the driver), so
evaluation runs faster than real time and is reproducible. The ROS graph (sim_bridge + spanvla_planner,
`spanvla-drive`) runs the same policy, buffers and tracker in real time over DDS.

Driving score, leaderboard-style: DS = route completion x 0.60^collisions x 0.70^red lights x 0.65^off-road
x 0.70^wrong-way (CARLA leaderboard penalty factors; off-road and wrong-way stand in for its lane infractions).
Per-plan PDM-style scores in closed loop use constant-velocity futures for other agents.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..model.trajectory import to_world
from ..data.sensor_buffers import EgoHistory, FrameHistory
from ..sim.controller import PathTracker
from ..sim.types import Control, Observation
from .pdm import score

PENALTY = dict(collision=0.60, red_light=0.70, off_road=0.65, wrong_way=0.70)


@dataclass
class EpisodeResult:
    scenario: str
    seed: int
    route_completion: float
    collision: bool
    off_road: bool
    red_light: bool
    wrong_way: bool
    duration_s: float
    pdms: float = float("nan")
    epdms: float = float("nan")
    reasoning: list = field(default_factory=list)

    @property
    def driving_score(self) -> float:
        pen = 1.0
        for k, f in PENALTY.items():
            pen *= f if getattr(self, k) else 1.0
        return self.route_completion * pen

    def as_dict(self) -> dict:
        d = asdict(self)
        d["driving_score"] = self.driving_score
        d.pop("reasoning")
        return d


class ExpertDriver:
    """The data-generating expert (highway-env IDM/MOBIL + stop-line rule): an upper reference."""
    name = "expert"

    def reset(self, obs, backend) -> None:
        pass

    def act(self, obs, backend) -> Control | None:
        return None


class PlanningDriver:
    """Any planner producing an ego-frame (H, 4) trajectory, tracked by pure pursuit + PI at the sim rate."""

    def __init__(self, dt_plan: float = 0.5, history_frames: int = 4, cameras=("front", "front_left", "front_right")):
        self.tracker, self.dt_plan = PathTracker(), dt_plan
        self.history_frames, self.cameras = history_frames, tuple(cameras)

    def reset(self, obs: Observation, backend) -> None:
        self.tracker.reset()
        self.frames = FrameHistory(self.cameras, self.history_frames, 0.5, 0.01)
        self.ego = EgoHistory(keep_s=4.0)
        self.last_plan = None
        self._ingest(obs)

    def _ingest(self, obs: Observation) -> None:
        for c, img in obs.images.items():
            if c in self.cameras:
                self.frames.add(c, obs.t, img)
        e = obs.ego
        self.ego.add(obs.t, e.x, e.y, e.heading, e.speed)

    def plan(self, obs: Observation, past, speed, accel, yaw_rate) -> np.ndarray:
        raise NotImplementedError

    def act(self, obs: Observation, backend) -> Control:
        self._ingest(obs)
        past, speed, accel, yaw_rate, _ = self.ego.state(4, 0.5)
        traj = self.plan(obs, past, speed, accel, yaw_rate)
        self.last_plan = traj
        return self.tracker.control(traj, obs.ego.speed, backend.dt, self.dt_plan)


class ConstantVelocityDriver(PlanningDriver):
    """Baseline (a): keep the current speed and yaw rate (the history initialisation, no model)."""
    name = "constant_velocity"

    def plan(self, obs, past, speed, accel, yaw_rate):
        from ..model.trajectory import history_trajectory
        return history_trajectory(past, speed, 0.5, 8, self.dt_plan)


class PolicyDriver(PlanningDriver):
    """SpanVLA: reasoner every ``reason_every_s`` of sim time (lockstep), action expert every control step."""

    def __init__(self, policy, reason_every_s: float = 1.0, flow_steps: int | None = None, name: str = "spanvla",
                 use_route: bool = True):
        super().__init__(policy.cfg.dt, policy.cfg.history_frames, policy.cfg.cameras)
        self.policy, self.reason_every_s, self.flow_steps, self.name = policy, reason_every_s, flow_steps, name
        self.use_route = use_route

    def reset(self, obs, backend) -> None:
        super().reset(obs, backend)
        self.bridge, self._next_reason, self.texts = None, 0.0, []
        self.route_xy = backend.route_xy if self.use_route else None
        self.stop_xy = backend.stop_lines_xy if self.use_route else None

    def plan(self, obs, past, speed, accel, yaw_rate):
        if obs.t >= self._next_reason:
            hist = self.frames.history()
            if hist is not None:
                r = self.policy.reason(hist[0], obs.command, speed, accel, past, stamp=hist[1])
                self.bridge = r.bridge
                self.texts.append((obs.t, r.text))
            self._next_reason = obs.t + self.reason_every_s
        if self.bridge is None:
            return self.policy.history_init(past, speed)
        e = obs.ego
        return self.policy.plan(self.bridge, past, speed, accel, yaw_rate, obs.command, steps=self.flow_steps,
                                route_xy=self.route_xy, pose=(e.x, e.y, e.heading), stop_xy=self.stop_xy)


def _cv_agents(obs: Observation, horizon: int, dt: float):
    A = len(obs.agents)
    out = np.zeros((horizon + 1, A, 4))
    for j, a in enumerate(obs.agents):
        for k in range(horizon + 1):
            out[k, j] = (a.x + a.speed * math.cos(a.heading) * k * dt, a.y + a.speed * math.sin(a.heading) * k * dt,
                         a.heading, a.speed)
    return out, [(a.length, a.width) for a in obs.agents]


def run_episode(backend, driver, scenario: str, seed: int, score_every_s: float = 1.0) -> EpisodeResult:
    obs = backend.reset(scenario, seed)
    driver.reset(obs, backend)
    scene = backend.scene_map()
    seen = dict(collision=False, off_road=False, red_light=False, wrong_way=False)
    scores, next_score = [], 0.0
    while not obs.done:
        control = driver.act(obs, backend)
        plan = getattr(driver, "last_plan", None)
        if plan is not None and obs.t >= next_score:
            e = obs.ego
            pose = (e.x, e.y, e.heading, e.speed)
            agents, sizes = _cv_agents(obs, len(plan), 0.5)
            ref = max(5.0, backend.scenario.ego_target_speed * 0.5 * len(plan) * 0.8)
            r = score(to_world(pose, plan), pose, agents, scene, 0.5, ref, backend.light_timeline(0.5 * len(plan), 0.5),
                      agent_sizes=sizes)
            scores.append((r.PDMS, r.EPDMS))
            next_score = obs.t + score_every_s
        obs = backend.step(control)
        for k in seen:
            seen[k] |= bool(getattr(obs.flags, k))
    s = np.array(scores).mean(0) if scores else (float("nan"), float("nan"))
    return EpisodeResult(scenario, seed, obs.route_completion, seen["collision"], seen["off_road"], seen["red_light"],
                         seen["wrong_way"], obs.t, float(s[0]), float(s[1]),
                         getattr(driver, "texts", []))


def summarise(results: list[EpisodeResult]) -> dict:
    if not results:
        return {}
    return dict(episodes=len(results),
                route_completion=float(np.mean([r.route_completion for r in results])),
                collision_rate=float(np.mean([r.collision for r in results])),
                off_road_rate=float(np.mean([r.off_road for r in results])),
                red_light_rate=float(np.mean([r.red_light for r in results])),
                driving_score=float(np.mean([r.driving_score for r in results])),
                pdms=_nanmean([r.pdms for r in results]), epdms=_nanmean([r.epdms for r in results]))


def _nanmean(xs) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def main(argv=None) -> int:
    """spanvla-closed-loop: N scenarios x seeds in lockstep; prints a table and writes JSON."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from ..sim.highway_backend import HighwayEnvBackend
    from ..sim.scenarios import HELDOUT_SEEDS, SCENARIOS

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--driver", default="spanvla", choices=["spanvla", "constant_velocity", "expert"])
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--scenarios", default="all")
    ap.add_argument("--seeds", type=int, default=2, help="first N held-out seeds")
    ap.add_argument("--reason-every", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.driver == "spanvla":
        from ..config import resolve_share_path
        from ..model.policy import SpanVLAPolicy
        driver = PolicyDriver(SpanVLAPolicy.from_pretrained(resolve_share_path(a.checkpoint or "checkpoints/spanvla_default")),
                              a.reason_every)
    else:
        driver = ExpertDriver() if a.driver == "expert" else ConstantVelocityDriver()
    backend = HighwayEnvBackend()
    names = list(SCENARIOS) if a.scenarios == "all" else a.scenarios.split(",")
    results = [run_episode(backend, driver, n, s) for n in names for s in list(HELDOUT_SEEDS)[:a.seeds]]
    print("| scenario | seed | RC | collision | off-road | red light | DS | PDMS | EPDMS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.scenario} | {r.seed} | {r.route_completion:.2f} | {r.collision} | {r.off_road} | {r.red_light} | "
              f"{r.driving_score:.2f} | {r.pdms:.2f} | {r.epdms:.2f} |")
    summ = summarise(results)
    print(json.dumps(summ))
    if a.out:
        a.out.write_text(json.dumps(dict(summary=summ, episodes=[r.as_dict() for r in results]), indent=2))
    return 0
