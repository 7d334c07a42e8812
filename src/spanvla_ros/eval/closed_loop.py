"""Closed-loop driving in the simulator, ROS-free and in lockstep (the simulator waits for the driver), so
evaluation runs faster than real time and is reproducible. The ROS graph (sim_bridge + spanvla_planner,
`spanvla-drive`) runs the same policy, buffers and tracker in real time over DDS.

Driving score, leaderboard-style: DS = route completion x infraction penalty, the penalty 0.60 for a collision x
0.70 for a red light x 0.65 off-road x 0.70 wrong-way (CARLA leaderboard factors; off-road and wrong-way stand in
for its lane infractions), each counted once per route; success (Bench2Drive) = the route's end without an
infraction. On CARLA, ``--routes`` drives a leaderboard / Bench2Drive route file (sim.routes).
Per-plan PDM-style scores in closed loop use constant-velocity futures for other agents.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..data.sensor_buffers import EgoHistory
from ..geometry import to_world
from ..model.config import SpanVLAConfig
from ..sim.agents import agent_futures, constant_velocity_frames
from ..sim.controller import PathTracker, tracked_path
from ..sim.types import Control, Observation, SimBackend
from .pdm import score

PENALTY = dict(collision=0.60, red_light=0.70, off_road=0.65, wrong_way=0.70)
MODEL = SpanVLAConfig()   # the plan layout (step, horizon, history) of the default model: the baselines plan in it
ROUTE_DONE = 0.99     # route completion that counts as the end of the route (progress is measured to the metre)


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
    plan_consistency_m: float = float("nan")   # mean displacement between consecutive plans where they overlap
    reasoning: list = field(default_factory=list)

    @property
    def infraction_penalty(self) -> float:
        """The leaderboard's infraction penalty: the product of the factors of the infractions that happened."""
        pen = 1.0
        for k, f in PENALTY.items():
            pen *= f if getattr(self, k) else 1.0
        return pen

    @property
    def driving_score(self) -> float:
        return self.route_completion * self.infraction_penalty

    @property
    def success(self) -> bool:
        """Bench2Drive's success: the route driven to its end without an infraction."""
        return self.route_completion >= ROUTE_DONE and self.infraction_penalty == 1.0

    @classmethod
    def from_record(cls, e: dict) -> EpisodeResult:
        """From an episode record of the ROS graph's sim_bridge (nodes.sim_bridge: SimBridgeNode.episodes)."""
        return cls(e["scenario"], e["seed"], e["route_completion"], e["collision"], e["off_road"], e["red_light"],
                   e["wrong_way"], e["t"])

    def as_dict(self) -> dict:
        d = asdict(self)
        d["driving_score"] = self.driving_score
        d["infraction_penalty"] = self.infraction_penalty
        d["success"] = self.success
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

    def __init__(self, dt_plan: float = MODEL.dt):
        self.tracker, self.dt_plan = PathTracker(), dt_plan

    def reset(self, obs: Observation, backend) -> None:
        self.tracker.reset()
        self.last_plan: np.ndarray | None = None
        self._last_world_plan: tuple[float, np.ndarray] | None = None
        self.consistency: list[float] = []
        self._ingest(obs)

    def _ingest(self, obs: Observation) -> None:
        """Take in one observation (the driver's own sensor buffers)."""
        raise NotImplementedError

    def plan(self, obs: Observation) -> np.ndarray:
        raise NotImplementedError

    def act(self, obs: Observation, backend) -> Control:
        self._ingest(obs)
        traj = self.plan(obs)
        self.last_plan = traj
        e = obs.ego
        world = (obs.t, to_world((e.x, e.y, e.heading), traj))
        if self._last_world_plan is not None:
            d = plan_displacement(self._last_world_plan, world, self.dt_plan)
            if d is not None:
                self.consistency.append(d)
        self._last_world_plan = world
        # as sim_bridge tracks the nav_msgs/Path it receives (poses only), planned this step
        return self.tracker.control(tracked_path(traj, self.dt_plan), obs.ego.speed, backend.dt, self.dt_plan, 0.0)


def plan_displacement(prev, new, dt: float) -> float | None:
    """Mean distance (m) between two world-frame plans ``(t0, (H, >=2) poses at t0 + dt, t0 + 2 dt, ...)`` at the
    times both cover (the earlier one linearly interpolated), or None if they do not overlap."""
    (t_prev, p_prev), (t_new, p_new) = prev, new
    t_a = t_prev + dt * np.arange(1, len(p_prev) + 1)
    times = t_new + dt * np.arange(1, len(p_new) + 1)
    ok = (times <= t_a[-1] + 1e-9) & (times >= t_a[0] - 1e-9)
    if not ok.any():
        return None
    xs, ys = np.interp(times[ok], t_a, p_prev[:, 0]), np.interp(times[ok], t_a, p_prev[:, 1])
    return float(np.hypot(p_new[ok, 0] - xs, p_new[ok, 1] - ys).mean())


class ConstantVelocityDriver(PlanningDriver):
    """Baseline (a): keep the current speed and yaw rate (the history initialisation, no model)."""
    name = "constant_velocity"

    def reset(self, obs, backend) -> None:
        self.ego = EgoHistory(keep_s=4.0)
        super().reset(obs, backend)

    def _ingest(self, obs: Observation) -> None:
        e = obs.ego
        self.ego.add(obs.t, e.x, e.y, e.heading, e.speed)

    def plan(self, obs):
        from ..model.trajectory import history_trajectory

        past, speed, _, _, _ = self.ego.state(MODEL.past_poses, MODEL.history_dt)
        return history_trajectory(past, speed, MODEL.history_dt, MODEL.horizon, self.dt_plan)


class PolicyDriver(PlanningDriver):
    """SpanVLA through the planner core the node runs (planning.core.PlannerCore, params/spanvla.yaml's
    spanvla_planner section): reasoner every ``reason_every_s`` of sim time (lockstep), action expert every control
    step.

    Latency is modelled as in real time: a reasoner run's bridge is used only ``reasoner_latency_s`` of sim time
    after the frames it read (None: the run's own measured wall-clock latency); with fresh perception (the params'
    default) the perception heads read the front camera's newest frames at every plan, as in the node."""

    def __init__(self, policy, reason_every_s: float = 1.0, flow_steps: int | None = None, name: str = "spanvla",
                 use_route: bool = True, reasoner_latency_s: float | None = None,
                 fresh_perception: bool | None = None, params_file=None):
        from ..config import node_params

        super().__init__(policy.cfg.dt)
        self.policy, self.reason_every_s, self.name = policy, reason_every_s, name
        self.use_route, self.reasoner_latency_s = use_route, reasoner_latency_s
        p = node_params("spanvla_planner", params_file)
        if flow_steps is not None:
            p["flow_steps"] = flow_steps
        if fresh_perception is not None:
            p["fresh_perception"] = fresh_perception
        self.params = p

    def reset(self, obs, backend) -> None:
        from ..planning.core import PlannerCore, PlannerParams

        self.core = PlannerCore(self.policy, PlannerParams.from_mapping(self.params), self.policy.cfg.cameras)
        self.fresh = self.core.fresh
        self._pending, self._next_reason = None, 0.0
        self.texts: list[tuple[float, str]] = []
        if self.use_route:
            self.core.set_route(backend.route_xy, "map")
            self.core.set_stop_lines(backend.stop_lines_xy, "map")
        self.core.set_command(obs.command)
        super().reset(obs, backend)

    @property
    def bridge(self):
        return self.core.bridge.latest()

    def _ingest(self, obs: Observation) -> None:
        for c, img in obs.images.items():
            if c in self.core.cameras:
                self.core.add_image(c, obs.t, img)
        e = obs.ego
        self.core.add_odometry(obs.t, e.x, e.y, e.heading, e.speed, "map", received=obs.t)

    def plan(self, obs):
        if self._pending is not None and obs.t >= self._pending[1] - 1e-9:
            self.core.bridge.publish(self._pending[0])
            self._pending = None
        if obs.t >= self._next_reason:
            r = self.core.reason()
            latency = 0.0
            if r is not None:
                latency = r.latency_s if self.reasoner_latency_s is None else self.reasoner_latency_s
                self._pending = (r.bridge, r.bridge.stamp + latency)
                self.texts.append((obs.t, r.text))
            # as the node's reasoner thread: the next run starts on schedule or when this one is done, whichever
            # is later (a run slower than the period would otherwise be replaced before its bridge is published)
            self._next_reason = obs.t + max(self.reason_every_s, latency)
        return self.core.plan(obs.t).traj


@dataclass(frozen=True)
class DriverSpec:
    """What drives, as a value (a worker process builds the driver from it)."""
    driver: str                              # spanvla | constant_velocity | expert
    checkpoint: str = ""                     # spanvla: empty = the embedded default
    reason_every_s: float = 1.0
    reasoner_latency_s: float | None = None  # None: each reasoner run's measured latency
    params_file: str | None = None


@dataclass(frozen=True)
class ClosedLoopJob:
    driver: DriverSpec
    scenario: Any                            # a name, a sim.scenarios.Scenario or a sim.routes.RouteSpec
    seed: int
    backend: str = "highway_env"


_PROCESS: dict[Any, Any] = {}               # this process's backends (per backend and server) and drivers (per spec)


def make_driver(spec: DriverSpec):
    if spec.driver == "expert":
        return ExpertDriver()
    if spec.driver == "constant_velocity":
        return ConstantVelocityDriver()
    from ..config import resolve_share_path
    from ..model.policy import SpanVLAPolicy

    checkpoint = resolve_share_path(spec.checkpoint or "checkpoints/spanvla_default")
    return PolicyDriver(SpanVLAPolicy.from_pretrained(checkpoint), spec.reason_every_s,
                        reasoner_latency_s=spec.reasoner_latency_s, params_file=spec.params_file)


def run_job(job: ClosedLoopJob, server=None) -> EpisodeResult:
    """One episode, on this process's backend for ``job.backend`` (and CARLA ``server``), built once and reused."""
    from ..sim.backends import make_backend

    key = ("backend", job.backend, server)
    if key not in _PROCESS:
        host, port = server or ("", 0)
        _PROCESS[key] = make_backend(job.backend, host, port)
    if ("driver", job.driver) not in _PROCESS:
        _PROCESS[("driver", job.driver)] = make_driver(job.driver)
    return run_episode(_PROCESS[key], _PROCESS[("driver", job.driver)], job.scenario, job.seed)


def close_process_backends() -> None:
    """Close every backend this process built (CARLA: actors destroyed, the world's settings restored)."""
    for key in [k for k in _PROCESS if k[0] == "backend"]:
        _PROCESS.pop(key).close()


def seed_list(spec: str) -> list[int]:
    """'N': the first N held-out seeds; 'a:b' or 'a,b,c': those seeds."""
    from ..sim.scenarios import HELDOUT_SEEDS, parse_seeds

    return list(HELDOUT_SEEDS)[:int(spec)] if spec.isdigit() else parse_seeds(spec)


def run_episode(backend: SimBackend, driver, scenario, seed: int, score_every_s: float = 1.0) -> EpisodeResult:
    """One episode of ``scenario`` (a name or a sim.scenarios.Scenario) with ``seed``."""
    obs = backend.reset(scenario, seed)
    scenario = backend.scenario_name
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
            dt = driver.dt_plan
            agents, sizes = agent_futures(constant_velocity_frames(obs.agents, len(plan), dt))
            ref = max(5.0, backend.target_speed_mps * dt * len(plan) * 0.8)
            r = score(to_world(pose, plan), pose, agents, scene, dt, ref, backend.light_timeline(dt * len(plan), dt),
                      agent_sizes=sizes)
            scores.append((r.PDMS, r.EPDMS))
            next_score = obs.t + score_every_s
        obs = backend.step(control)
        for k in seen:
            seen[k] |= bool(getattr(obs.flags, k))
    s = np.array(scores).mean(0) if scores else (float("nan"), float("nan"))
    cons = getattr(driver, "consistency", [])
    return EpisodeResult(scenario, seed, obs.route_completion, seen["collision"], seen["off_road"], seen["red_light"],
                         seen["wrong_way"], obs.t, float(s[0]), float(s[1]),
                         float(np.mean(cons)) if cons else float("nan"), getattr(driver, "texts", []))


def summarise(results: list[EpisodeResult]) -> dict:
    if not results:
        return {}
    return dict(episodes=len(results),
                route_completion=float(np.mean([r.route_completion for r in results])),
                collision_rate=float(np.mean([r.collision for r in results])),
                off_road_rate=float(np.mean([r.off_road for r in results])),
                red_light_rate=float(np.mean([r.red_light for r in results])),
                driving_score=float(np.mean([r.driving_score for r in results])),
                infraction_penalty=float(np.mean([r.infraction_penalty for r in results])),
                success_rate=float(np.mean([r.success for r in results])),
                pdms=_nanmean([r.pdms for r in results]), epdms=_nanmean([r.epdms for r in results]),
                plan_consistency_m=_nanmean([r.plan_consistency_m for r in results]))


def _nanmean(xs) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def main(argv=None) -> int:
    """spanvla-closed-loop: N scenarios x seeds in lockstep; prints a table and writes JSON."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from ..sim.backends import add_backend_arguments
    from ..sim.routes import load_routes
    from ..sim.scenarios import resolve

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--driver", default="spanvla", choices=["spanvla", "constant_velocity", "expert"])
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--scenarios", default="all",
                    help="'all', a comma list of built-in scenarios, or a YAML file of base scenarios + overrides "
                         "(sim.scenarios.load_scenarios)")
    ap.add_argument("--seeds", default="2", help="N (the first N held-out seeds), a:b (range) or a,b,c")
    ap.add_argument("--routes", default="", help="CARLA leaderboard / Bench2Drive route file (XML): each route is "
                    "driven once per seed instead of --scenarios (needs --backend carla)")
    ap.add_argument("--route-ids", default="", help="comma list of the route file's route ids (default all)")
    ap.add_argument("--reason-every", type=float, default=1.0)
    ap.add_argument("--reasoner-latency", type=float, default=None,
                    help="sim seconds from a reasoner run's frames to its bridge being used (default: the run's "
                         "measured wall-clock latency)")
    ap.add_argument("--params-file", type=Path, default=None,
                    help="the planner's parameters (default: the package's params/spanvla.yaml)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (one per process when several run)")
    add_backend_arguments(ap)
    ap.add_argument("--ray-address", default="", help="run one task per episode on Ray: 'local' (this machine, "
                    "--workers workers), 'auto' or ray://head:10001 (a cluster); default: serially here")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (without --carla-servers)")
    ap.add_argument("--carla-servers", default="", help="host:port,host:port: one Ray worker per CARLA server")
    a = ap.parse_args(argv)
    from ..config import interrupt_on_sigterm, set_torch_threads
    from ..distributed import parse_servers, run_episodes

    set_torch_threads(a.threads)
    if a.routes and a.backend != "carla":
        ap.error("--routes are CARLA leaderboard routes: add --backend carla")
    scenarios = load_routes(a.routes, a.route_ids) if a.routes else resolve(a.scenarios)
    servers = parse_servers(a.carla_servers) or ([(a.carla_host, a.carla_port)] if a.carla_host or a.carla_port
                                                 else [])
    spec = DriverSpec(a.driver, a.checkpoint, a.reason_every, a.reasoner_latency,
                      str(a.params_file) if a.params_file else None)
    jobs = [ClosedLoopJob(spec, sc, s, a.backend) for sc in scenarios for s in seed_list(a.seeds)]
    interrupt_on_sigterm()
    try:
        results = run_episodes(run_job, jobs, a.ray_address, a.workers, servers, a.threads,
                               cleanup=close_process_backends)
    except KeyboardInterrupt:
        print("spanvla-closed-loop: interrupted", file=sys.stderr)
        return 130
    print("| scenario | seed | RC | collision | off-road | red light | IP | DS | PDMS | EPDMS | plan consistency (m) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.scenario} | {r.seed} | {r.route_completion:.2f} | {r.collision} | {r.off_road} | {r.red_light} | "
              f"{r.infraction_penalty:.2f} | {r.driving_score:.2f} | {r.pdms:.2f} | {r.epdms:.2f} | "
              f"{r.plan_consistency_m:.2f} |")
    summ = summarise(results)
    print(json.dumps(summ))
    if a.out:
        a.out.write_text(json.dumps(dict(summary=summ, episodes=[r.as_dict() for r in results]), indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
