"""Driving data from the simulator: expert (positive), negative and recovery samples, written as rosbag2 MCAP
episode bags plus one index.json of samples, deterministic by (scenario, seed).

* positive: the expert (highway-env IDM/MOBIL + our stop-line rule) drives; a sample every ``sample_every_s``
  holds 4 camera frames per camera at 2 Hz (bag stamps), the ego's past, its logged 4 s future and text.
* negative: per positive sample, candidate trajectories (ignore the lead, accelerate, drift off, swerve) that
  the PDM-style scorer confirms as collisions, leaving the drivable area, oncoming-lane driving or running the
  red light. Kept with the sample, used as r_neg references by GRPO.
* recovery: episodes where the ego is made to drift off the lane centre for ~1 s (open-loop steering bias);
  samples at the moment the expert takes back over hold the drifted history and the expert's way back.
* dagger: the trained policy drives (``--policy CHECKPOINT``, through the planner core, as in closed loop) and at
  every sample time the simulator is forked and the expert drives the fork for 4 s: the states the policy visits,
  labelled with what the expert would do from them (DAgger). Behaviour cloning alone never sees the states its
  own errors lead to.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..eval.pdm import score
from ..geometry import to_ego, to_world
from ..model.config import CAMERAS, SpanVLAConfig
from ..sim.agents import agent_futures, futures_to_json
from ..sim.scenarios import Scenario, scenario_of, spec_of
from ..sim.types import Control
from .bag_io import BAG_EPOCH, EpisodeBagWriter
from .scene_text import describe, facts_from_state, perception_facts

_MODEL = SpanVLAConfig()
# the samples' layout is the model's (one source: model.config.SpanVLAConfig); index.json records it
HORIZON, DT, PAST, PAST_DT = (_MODEL.horizon, _MODEL.dt, _MODEL.past_poses, _MODEL.history_dt)
HISTORY_FRAMES = 4


@dataclass(frozen=True)
class EpisodeJob:
    scenario: str
    seed: int
    kind: str          # "expert" | "recovery" | "dagger"
    out_dir: str
    sample_every_s: float = 1.0
    policy: str = ""   # dagger: the checkpoint that drives
    backend: str = "highway_env"
    carla_host: str = ""
    carla_port: int = 0
    threads: int = 1   # torch threads of the worker (a DAgger policy): workers run side by side
    scenario_spec: dict | None = None   # a scenario file's scenario (sim.scenarios.spec_of); None: a built-in

    def simulated(self):
        """What the backend resets to: the built-in's name, or the scenario rebuilt from its spec."""
        return self.scenario if self.scenario_spec is None else scenario_of(self.scenario, self.scenario_spec)


def negative_candidates(speed: float) -> dict[str, np.ndarray]:
    """Ego-frame (HORIZON, 4) trajectories of typical failure modes."""
    t = DT * np.arange(1, HORIZON + 1)
    out = {}
    def traj(x, y, v):
        h = np.arctan2(np.gradient(y), np.maximum(np.gradient(x), 1e-3))
        return np.stack([x, y, h, v], 1).astype(np.float32)
    out["ignore_lead"] = traj(speed * t, 0 * t, np.full_like(t, speed))
    v_acc = speed + 3.0 * t
    out["accelerate"] = traj(speed * t + 1.5 * t ** 2, 0 * t, v_acc)
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        v_drift = max(speed, 4.0)
        out[f"drift_{side}"] = traj(v_drift * t, sgn * 8.0 * (t / t[-1]) ** 2, np.full_like(t, v_drift))
    return out


class EpisodeRecorder:
    """Runs one episode and keeps a per-step log for the sample builder."""

    def __init__(self, backend, job: EpisodeJob):
        self.b, self.job = backend, job
        self.steps: list[dict] = []
        self.labels: dict[int, list[dict]] = {}   # dagger: step index -> the expert's rollout on a fork from there

    def run(self, bag_path: Path):
        b, job = self.b, self.job
        obs = b.reset(job.simulated(), job.seed)
        rng = np.random.default_rng(job.seed * 7 + (1 if job.kind == "recovery" else 0))
        writer = EpisodeBagWriter(bag_path, b.cameras)
        writer.write_route(0.0, b.route_xy, b.command, b.stop_lines_xy)
        drift: tuple[float, float, float] | None = None
        if job.kind == "recovery":
            t0 = float(rng.uniform(2.5, max(3.0, b.duration_s - 7.0)))
            drift = (t0, t0 + float(rng.uniform(0.8, 1.4)), float(rng.choice([-1, 1]) * rng.uniform(0.012, 0.025)))
        self.drift = drift
        self.scene = b.scene_map()
        driver = None
        if job.kind == "dagger":
            driver = _policy_driver(job.policy)
            driver.reset(obs, b)
        self.steps.append(step_record(b, obs))
        writer.write_step(obs)
        label_at = set(sample_indices(int(round(b.duration_s / b.dt)) + 1, b.dt, job.sample_every_s))
        while not obs.done:
            control = None
            if drift and drift[0] <= b.t < drift[1]:
                control = Control(0.0, drift[2])
            if driver is not None:
                i = len(self.steps) - 1
                if i in label_at:
                    self.labels[i] = expert_rollout(b, HORIZON * int(round(DT / b.dt)))
                control = driver.act(obs, b)
            obs = b.step(control)
            self.steps.append(step_record(b, obs))
            writer.write_step(obs)
        writer.close()
        return self.steps


_DRIVERS: dict[str, object] = {}


def _policy_driver(checkpoint: str):
    """One PolicyDriver per worker process and checkpoint (loading the model takes a second)."""
    if checkpoint not in _DRIVERS:
        from ..eval.closed_loop import PolicyDriver
        from ..model.policy import SpanVLAPolicy

        if not checkpoint:
            raise ValueError("dagger episodes need the checkpoint that drives (--policy)")
        _DRIVERS[checkpoint] = PolicyDriver(SpanVLAPolicy.from_pretrained(checkpoint), reasoner_latency_s=None)
    return _DRIVERS[checkpoint]


def sample_indices(n: int, ctrl_dt: float, every_s: float) -> list[int]:
    """Step indices of the samples of an n-step episode: one every ``every_s`` once the frame history is full."""
    first = int(round((HISTORY_FRAMES - 1) * DT / ctrl_dt))
    return list(range(first, n, int(round(every_s / ctrl_dt))))


def expert_rollout(backend, steps: int) -> list[dict]:
    """The expert driving a fork of the running episode: the fork's state now, then ``steps`` more."""
    fork = backend.fork()
    obs = fork._observe()
    out = [step_record(fork, obs)]
    for _ in range(steps):
        obs = fork.step(None)
        out.append(step_record(fork, obs))
    return out


def step_record(b, obs) -> dict:
    """What the sample builder needs of one simulator step."""
    e = obs.ego
    return dict(t=obs.t, ego=(e.x, e.y, e.heading, e.speed), accel=e.accel, yaw_rate=e.yaw_rate,
                agents=[(a.id, a.x, a.y, a.heading, a.speed, a.length, a.width) for a in obs.agents],
                light=obs.light.state if obs.light else None, light_dist=b.stop_line_distance_m(obs),
                lateral=b.lateral_offset_m(),
                flags=obs.flags, progress=obs.route_progress, route_length=obs.route_length)


SAMPLE_KIND = {"expert": "positive", "recovery": "recovery", "dagger": "dagger"}


def build_samples(rec: EpisodeRecorder, job: EpisodeJob, bag_rel: str) -> list[dict]:
    steps = rec.steps
    n = len(steps)
    ctrl_dt = rec.b.dt
    per_half = int(round(DT / ctrl_dt))
    crash_at = next((i for i, s in enumerate(steps) if s["flags"].collision or s["flags"].off_road), n)
    rng = np.random.default_rng(job.seed * 13 + len(job.scenario))
    if job.kind == "recovery" and rec.drift is not None:
        d0, d1, _ = rec.drift
        takeover = next((i for i, s in enumerate(steps) if s["t"] >= d1 - 1e-6), n)
        idx = [takeover, takeover + per_half]
    elif job.kind == "dagger":
        idx = sorted(rec.labels)
    else:
        idx = sample_indices(n, ctrl_dt, job.sample_every_s)
    samples = []
    for i in sorted(set(idx)):
        j_end = i + HORIZON * per_half
        if job.kind == "dagger":
            # the future is the expert's on a fork from this state (ahead[0] is the fork's state now)
            ahead = rec.labels[i]
            if any(s["flags"].collision or s["flags"].off_road for s in ahead) or i < (HISTORY_FRAMES - 1) * per_half:
                continue
        else:
            if i < (HISTORY_FRAMES - 1) * per_half or j_end >= min(n, crash_at):
                continue
            ahead = steps[i:j_end + 1]
        now = steps[i]
        pose = now["ego"]
        fut_world = np.array([ahead[k * per_half]["ego"] for k in range(1, HORIZON + 1)])
        future = to_ego(pose, fut_world).astype(np.float32)
        past_world = np.array([steps[i - k * per_half]["ego"] for k in range(PAST - 1, -1, -1)])
        past = to_ego(pose, past_world)[:, :3].astype(np.float32)
        v_prev = steps[i - per_half]["ego"][3]
        accel = (pose[3] - v_prev) / DT
        yaw_rate = math.remainder(pose[2] - steps[i - per_half]["ego"][2], 2 * math.pi) / DT
        # agents' futures, aligned by id, for PDM-style scoring
        agents_future, sizes = agent_futures([ahead[k * per_half]["agents"] for k in range(HORIZON + 1)])
        lights = {k * DT: ahead[k * per_half]["light"] for k in range(HORIZON + 1)} if now["light"] else {}
        ref_progress = ahead[-1]["progress"] - now["progress"]
        expert_score = score(fut_world, pose, agents_future, rec.scene, DT, ref_progress, lights, agent_sizes=sizes)
        negatives = []
        for name, cand in negative_candidates(pose[3]).items():
            r = score(to_world(pose, cand), pose, agents_future, rec.scene, DT, ref_progress, lights, agent_sizes=sizes)
            failed = [m for m in ("NC", "DAC", "TLC") if getattr(r, m) == 0.0] + (["DDC"] if r.DDC < 1 else [])
            if failed:
                negatives.append(dict(name=name, failed=failed, traj=cand.round(3).tolist()))
        recovering = job.kind == "recovery"
        facts = facts_from_state(pose, now["agents"], job.scenario, rec.b.command, now["light"], now["light_dist"],
                                 now["lateral"], recovering, route=rec.scene.route)
        samples.append(dict(
            scenario=job.scenario, **_spec_field(job), seed=job.seed, kind=SAMPLE_KIND[job.kind], bag=bag_rel,
            stamp=BAG_EPOCH + now["t"], t=now["t"], command=rec.b.command,
            frame_stamps=[BAG_EPOCH + now["t"] - k * DT for k in range(HISTORY_FRAMES - 1, -1, -1)],
            past=past.round(4).tolist(), speed=round(pose[3], 4), accel=round(accel, 4), yaw_rate=round(yaw_rate, 4),
            future=future.round(4).tolist(), reasoning=describe(facts, future, rng),
            # simulator truth at the sample time: perception labels (model.perception) and evaluation only
            facts=perception_facts(facts),
            expert_pdm=expert_score.as_dict(), negatives=negatives,
            # what PDM-style scoring of any other trajectory for this sample needs (GRPO rewards, eval)
            pose=[round(float(v), 4) for v in pose], ref_progress=round(float(ref_progress), 3), lights=lights,
            agents_future=futures_to_json(agents_future), agent_sizes=sizes))
    return samples


def _spec_field(job: EpisodeJob) -> dict:
    return {} if job.scenario_spec is None else {"scenario_spec": job.scenario_spec}


def run_job(job: EpisodeJob) -> dict:
    from ..config import set_torch_threads
    from ..sim.backends import make_backend

    set_torch_threads(job.threads)
    backend = make_backend(job.backend, job.carla_host, job.carla_port)
    name = f"{job.scenario}_{job.seed:05d}_{job.kind}"
    bag_path = Path(job.out_dir) / "episodes" / name
    if bag_path.exists():
        import shutil
        shutil.rmtree(bag_path)
    bag_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        rec = EpisodeRecorder(backend, job)
        steps = rec.run(bag_path)
        samples = build_samples(rec, job, f"episodes/{name}")
    finally:
        backend.close()   # CARLA: actors destroyed and settings restored, also on an error or an interrupt
    last = steps[-1]
    return dict(episode=dict(name=name, scenario=job.scenario, **_spec_field(job), seed=job.seed, kind=job.kind,
                             bag=f"episodes/{name}", duration_s=last["t"], collision=bool(last["flags"].collision),
                             route_completion=last["progress"] / last["route_length"]),
                samples=samples)


def run_job_on(job: EpisodeJob, server=None) -> dict:
    """run_job on a Ray worker's own CARLA server (distributed.run_episodes)."""
    return run_job(dataclasses.replace(job, carla_host=server[0], carla_port=server[1]) if server else job)


def generate(out_dir: Path, scenarios, seeds, kinds=("expert", "recovery"), workers: int = 1,
             sample_every_s: float = 1.0, progress: bool = True, policy: str = "", backend: str = "highway_env",
             carla_host: str = "", carla_port: int = 0, ray_address: str = "", servers=()) -> dict:
    """Episodes x kinds on ``backend``: serially, on ``workers`` local processes, or on Ray (``ray_address``, one
    task per episode; with CARLA ``servers`` one worker per server). The index is the same either way. On CARLA
    without Ray every episode runs on the one server given (workers would drive the same world at once)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "dagger" in kinds and not policy:
        raise ValueError("dagger episodes need the checkpoint that drives (policy=...)")
    if backend == "carla" and workers > 1 and not ray_address:
        raise ValueError("CARLA: one worker per server (several would tick the same world)")
    if "dagger" in kinds and backend != "highway_env":
        raise ValueError("dagger labels roll the expert out on a copy of the running world, which only "
                         "highway-env can make (a CARLA world cannot be forked)")
    jobs = [EpisodeJob(getattr(s, "name", s), seed, k, str(out_dir), sample_every_s,
                       str(Path(policy).resolve()) if policy else "", backend, carla_host, carla_port,
                       scenario_spec=spec_of(s) if isinstance(s, Scenario) else None)
            for s in scenarios for seed in seeds for k in kinds]
    t0 = time.time()
    results = []
    if ray_address:
        from ..distributed import run_episodes

        results = run_episodes(run_job_on, jobs, ray_address, workers, servers)
    elif workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for r in tqdm(pool.imap(run_job, jobs), total=len(jobs), disable=not progress, desc="episodes"):
                results.append(r)
    else:
        for job in tqdm(jobs, disable=not progress, desc="episodes"):
            results.append(run_job(job))
    index = dict(version=1, cameras=list(CAMERAS), horizon=HORIZON, dt=DT, past_dt=PAST_DT,
                 episodes=[r["episode"] for r in results], samples=[s for r in results for s in r["samples"]],
                 generation_s=round(time.time() - t0, 1))
    (out_dir / "index.json").write_text(json.dumps(index))
    return index


def main(argv=None) -> int:
    from ..config import interrupt_on_sigterm
    from ..distributed import parse_servers
    from ..sim.backends import add_backend_arguments
    from ..sim.scenarios import SCENARIOS, is_scenario_file, load_scenarios, parse_seeds

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", default="all", help=f"comma list or 'all' ({', '.join(SCENARIOS)}), or a YAML "
                    "scenario file (sim.scenarios.load_scenarios)")
    ap.add_argument("--seeds", default="0:4", help="a:b range or comma list")
    ap.add_argument("--kinds", default="expert,recovery", help="expert, recovery, dagger (comma list)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--sample-every", type=float, default=1.0)
    ap.add_argument("--policy", default="", help="checkpoint that drives the dagger episodes (--kinds dagger)")
    add_backend_arguments(ap)
    ap.add_argument("--ray-address", default="", help="one Ray task per episode: 'local' (this machine, --workers "
                    "workers), 'auto' or ray://head:10001; default: local processes (--workers)")
    ap.add_argument("--carla-servers", default="", help="host:port,host:port: one Ray worker per CARLA server")
    a = ap.parse_args(argv)
    # names pass through as they are: on CARLA a name is not a highway-env scenario ("town": a spawn point's road)
    scen = (load_scenarios(a.scenarios) if is_scenario_file(a.scenarios)
            else list(SCENARIOS) if a.scenarios == "all" else a.scenarios.split(","))
    interrupt_on_sigterm()
    try:
        idx = generate(Path(a.out), scen, parse_seeds(a.seeds), tuple(a.kinds.split(",")), a.workers,
                       a.sample_every, policy=a.policy, backend=a.backend, carla_host=a.carla_host,
                       carla_port=a.carla_port, ray_address=a.ray_address, servers=parse_servers(a.carla_servers))
    except KeyboardInterrupt:
        print("spanvla-generate-data: interrupted (episodes written so far are on disk; no index)", file=sys.stderr)
        return 130
    kinds: dict[str, int] = {}
    for s in idx["samples"]:
        kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    nneg = sum(len(s["negatives"]) for s in idx["samples"])
    crashes = sum(e["collision"] for e in idx["episodes"])
    print(f"{len(idx['episodes'])} episodes ({crashes} expert collisions), samples {kinds}, negatives {nneg}, "
          f"{idx['generation_s']} s -> {a.out}/index.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
