"""spanvla-results: the training results table on held-out scenes, one command.

Rows: (a) constant-velocity baseline, (b) SFT, (c) + GRPO positive only, (d) + negatives, (e) + recovery, the
pure-noise-start ablation (SFT with a flow from N(0, I) instead of the history trajectory), any further
checkpoints given with --extra (e.g. the shipped default when it comes from another run), and the
data-generating expert as a closed-loop reference.

Open loop, on held-out samples (seeds never trained on): the reasoner generates its text from the frames (the
inference path, not teacher forcing), the expert plans from that bridge; ADE/FDE against the expert's logged
future and PDM-style PDMS/EPDMS with the other agents' logged futures.
Closed loop, lockstep in the simulator on held-out seeds: route completion, collision rate, driving score.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.config import SpanVLAConfig
from ..model.policy import vlm_digest

ROWS = (  # (row name, checkpoint dir relative to --run / --ablation-run, which run)
    ("(a) constant velocity", None, None),
    ("(b) SFT", "sft", "run"),
    ("(c) + GRPO positive", "grpo_pos", "run"),
    ("(d) + negatives", "grpo_neg", "run"),
    ("(e) + recovery", "grpo_rec", "run"),
    ("ablation: noise start (SFT)", "sft", "ablation"),
)


@torch.inference_mode()
def plan_all(policy, samples, bridges, batch=32) -> np.ndarray:
    from ..model.batch import ego_tensor, his_tensor
    from ..model.bridge import collate_bridges

    out = []
    for b0 in range(0, len(samples), batch):
        bs = samples[b0:b0 + batch]
        br = collate_bridges(bridges[b0:b0 + batch])
        out.append(policy.expert.sample(br, his_tensor(policy, bs), ego_tensor(policy, bs),
                                        generator=torch.Generator().manual_seed(0)).numpy())
    return np.concatenate(out)


def open_loop_metrics(samples, plans, scenes) -> dict:
    from ..data.samples import score_plan
    from .pdm import ade_fde

    ade, fde, pdms, epdms = [], [], [], []
    for s, p in zip(samples, plans):
        a, f = ade_fde(p[:, :2], s.future[:, :2])
        r = score_plan(s, p, scenes[(s.meta["scenario"], s.meta["seed"])])
        ade.append(a)
        fde.append(f)
        pdms.append(r.PDMS)
        epdms.append(r.EPDMS)
    return dict(samples=len(samples), ade=float(np.mean(ade)), fde=float(np.mean(fde)), pdms=float(np.mean(pdms)),
                epdms=float(np.mean(epdms)))


def reasoning_overlap(texts, refs) -> float:
    """Mean word-level F1 between generated and reference reasoning (a coarse check that SFT 1 took)."""
    f1 = []
    for t, r in zip(texts, refs):
        a, b = t.lower().split(), r.lower().split()
        common = sum(min(a.count(w), b.count(w)) for w in set(a))
        f1.append(0.0 if not common else 2 * common / (len(a) + len(b)))
    return float(np.mean(f1)) if f1 else float("nan")


def closed_loop(driver, scenarios, seeds, backend_args) -> dict:
    from ..sim.backends import backend_from_args
    from .closed_loop import run_episode, summarise

    backend = backend_from_args(backend_args)
    torch.manual_seed(0)   # the noise-start expert samples: same draws for every row, reproducible
    try:
        eps = [run_episode(backend, driver, sc, s) for sc in scenarios for s in seeds]
    finally:
        backend.close()
    return dict(summary=summarise(eps), episodes=[e.as_dict() for e in eps])


COMPLETED_FRACTION = 0.9


def mark_completed(rows: list[dict], expert_row: dict) -> None:
    """A route counts as completed when the episode had no collision, stayed on the road, ran no red light and
    got at least 90 % of the expert's route completion on the same scenario and seed (the expert itself waits
    behind a braking lead or at a red light, so "completed" is measured against what was possible there)."""
    ref = {(e["scenario"], e["seed"]): e["route_completion"] for e in expert_row["closed_loop"]["episodes"]}
    for r in rows:
        eps = (r.get("closed_loop") or {}).get("episodes") or []
        for e in eps:
            e["completed"] = bool(not e["collision"] and not e["off_road"] and not e["red_light"]
                                  and e["route_completion"] >= COMPLETED_FRACTION * ref[(e["scenario"], e["seed"])])
        if eps:
            r["closed_loop"]["summary"]["completed"] = sum(e["completed"] for e in eps)


def format_table(rows: list[dict]) -> str:
    lines = ["| model | ADE (m) | FDE (m) | PDMS | EPDMS | CL routes completed | CL route completion | CL collisions | "
             "CL off-road | CL red light | CL driving score | CL plan consistency (m) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ol, cl = r.get("open_loop") or {}, (r.get("closed_loop") or {}).get("summary") or {}
        def f(d, k, fmt="{:.2f}"):
            return fmt.format(d[k]) if k in d else "-"
        def count(k, cl=cl):
            return f"{round(cl[k] * cl['episodes'])}/{cl['episodes']}" if cl else "-"
        done = f"{cl['completed']}/{cl['episodes']}" if "completed" in cl else "-"
        lines.append(f"| {r['name']} | {f(ol, 'ade')} | {f(ol, 'fde')} | {f(ol, 'pdms', '{:.3f}')} | "
                     f"{f(ol, 'epdms', '{:.3f}')} | {done} | {f(cl, 'route_completion')} | {count('collision_rate')} | "
                     f"{count('off_road_rate')} | {count('red_light_rate')} | {f(cl, 'driving_score')} | "
                     f"{f(cl, 'plan_consistency_m')} |")
    return "\n".join(lines)


PERCEPTION_COLUMNS = (("light_acc", "light acc (heads)"), ("lead_f1", "lead F1"), ("gap_mae_m", "gap MAE (m)"),
                      ("closing_mae_mps", "closing MAE (m/s)"), ("text_lead_acc", "text: lead"),
                      ("text_gap_bucket_acc", "text: gap bucket"), ("text_light_acc", "text: light colour"))


def format_perception_table(rows: list[dict]) -> str:
    """Held-out perception: the expert's heads and the facts stated in the generated reasoning."""
    lines = ["| model | " + " | ".join(h for _, h in PERCEPTION_COLUMNS) + " |",
             "|---|" + "---|" * len(PERCEPTION_COLUMNS)]
    for r in rows:
        p = r.get("perception")
        if p:
            lines.append(f"| {r['name']} | " + " | ".join(f"{p[k]:.2f}" if k in p and np.isfinite(p[k]) else "-"
                                                          for k, _ in PERCEPTION_COLUMNS) + " |")
    return "\n".join(lines)


def ros_graph_seeds(closed_loop_seeds: list[int], count: int) -> list[int]:
    """The first ``count`` closed-loop seeds, which must be consecutive: sim_bridge runs every scenario at its
    first seed, then every scenario at the next one."""
    seeds = closed_loop_seeds[:count]
    if count < 1 or len(seeds) < count or seeds != list(range(seeds[0], seeds[0] + count)):
        raise SystemExit(f"--ros-graph-seeds {count}: needs {count} consecutive closed-loop seeds, "
                         f"got {closed_loop_seeds}")
    return seeds


def ros_graph_row(name: str, checkpoint: Path, scenarios, seeds: list[int], out: Path, backend_args) -> dict:
    """The same model through the real ROS graph in real time (spanvla-drive: sim_bridge + spanvla_planner over
    DDS on loopback), one episode per scenario and seed (``ros_graph_seeds``); the episodes are scored like the
    lockstep ones."""
    import os
    import subprocess

    from .closed_loop import EpisodeResult, summarise

    report = out / "ros_graph.json"
    episodes = len(scenarios) * len(seeds)
    cmd = [sys.executable, "-m", "spanvla_ros.cli.drive", "--episodes", str(episodes), "--no-record",
           "--json", str(report), "--set", f"spanvla_planner.checkpoint={Path(checkpoint).resolve()}",
           "--set", f"sim_bridge.seed={seeds[0]}",
           "--set", "sim_bridge.scenarios=[" + ",".join(s.name for s in scenarios) + "]",
           "--backend", backend_args.backend]
    if backend_args.carla_host:
        cmd += ["--carla-host", backend_args.carla_host]
    if backend_args.carla_port:
        cmd += ["--carla-port", str(backend_args.carla_port)]
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120 + 60 * episodes)
    if proc.returncode != 0 or not report.is_file():
        raise SystemExit(f"spanvla-drive failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    eps = [EpisodeResult.from_record(e) for e in data["episodes"]]
    return dict(name=f"{name} (ROS graph, real time)", checkpoint=str(checkpoint),
                closed_loop=dict(summary=summarise(eps), episodes=[e.as_dict() for e in eps]),
                counters=data["counters"])


def main(argv=None) -> int:
    from ..data.samples import attach_routes, load_samples, scene_maps
    from ..eval.closed_loop import ConstantVelocityDriver, ExpertDriver, PlanningDriver, PolicyDriver, seed_list
    from ..model.batch import reason_all
    from ..model.policy import SpanVLAPolicy
    from ..model.trajectory import history_trajectory
    from ..sim.backends import add_backend_arguments
    from ..sim.scenarios import HELDOUT_SEEDS, resolve
    from .perception_eval import head_metrics, reasoning_fact_accuracy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="spanvla-train output (sft/, grpo_*/)")
    ap.add_argument("--ablation-run", type=Path, default=None, help="spanvla-train --flow-init noise output")
    ap.add_argument("--heldout", type=Path, required=True, help="spanvla-generate-data output on held-out seeds")
    ap.add_argument("--closed-loop-seeds", default="2",
                    help="N (the first N held-out seeds; 0: skip), a:b (range) or a,b,c, per scenario")
    ap.add_argument("--scenarios", default="all",
                    help="'all', a comma list, or a YAML scenario file (sim.scenarios.load_scenarios)")
    ap.add_argument("--reasoner-latency", type=float, default=None,
                    help="closed loop: sim seconds from a reasoner run's frames to its bridge being used "
                         "(default: each run's measured wall-clock latency)")
    ap.add_argument("--rows", default="", help="comma list of row letters to run (e.g. c,d,e); default all")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=CHECKPOINT",
                    help="one more row: a checkpoint directory evaluated the same way (repeatable)")
    ap.add_argument("--no-expert", action="store_true", help="skip the expert reference row")
    ap.add_argument("--ros-graph", default="", metavar="NAME=CHECKPOINT",
                    help="also drive this checkpoint through the real ROS graph (spanvla-drive, real time), one "
                         "episode per scenario at each of the first --ros-graph-seeds closed-loop seeds")
    ap.add_argument("--ros-graph-seeds", type=int, default=1,
                    help="how many closed-loop seeds (consecutive) the ROS graph drives, every scenario at each")
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (one per process when several run)")
    add_backend_arguments(ap)
    a = ap.parse_args(argv)
    from ..config import set_torch_threads

    set_torch_threads(a.threads)
    t_start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = SpanVLAConfig()
    samples = load_samples(a.heldout, cfg.cameras, kinds=("positive",))
    leaked = {s.meta["seed"] for s in samples if s.meta["seed"] < HELDOUT_SEEDS.start}
    if leaked:
        raise SystemExit(f"--heldout contains training seeds {sorted(leaked)[:5]}...: "
                         "generate it with --seeds 10000:...")
    scenes = scene_maps(samples)
    attach_routes(samples, scenes)
    scen = resolve(a.scenarios)
    cl_seeds = seed_list(a.closed_loop_seeds)
    graph_seeds = ros_graph_seeds(cl_seeds, a.ros_graph_seeds) if a.ros_graph and cl_seeds else []
    print(f"{len(samples)} held-out samples from {len(scenes)} episodes; closed loop {len(scen)} scenarios x "
          f"seeds {cl_seeds}")

    rows: list[dict] = []
    bridge_cache: dict = {}
    wanted = {f"({r.strip()})" for r in a.rows.split(",") if r.strip()}
    extra = []
    for item in a.extra:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--extra {item!r}: expected NAME=CHECKPOINT")
        extra.append((name, Path(path), "extra"))
    for name, sub, which in [r for r in ROWS if not wanted or r[0].split()[0] in wanted
                             or (r[0].startswith("ablation") and "(ablation)" in wanted)] + extra:
        t0 = time.time()
        if sub is None:
            plans = np.stack([history_trajectory(s.past, s.meta["speed"], cfg.history_dt, cfg.horizon, cfg.dt)
                              for s in samples])
            row: dict[str, Any] = dict(name=name, open_loop=open_loop_metrics(samples, plans, scenes))
            driver: PlanningDriver = ConstantVelocityDriver()
        else:
            root = {"run": a.run, "ablation": a.ablation_run, "extra": Path(".")}[str(which)]
            if root is None or not (root / sub / "spanvla.json").is_file():
                print(f"skip {name}: no checkpoint at {root}/{sub}")
                continue
            policy = SpanVLAPolicy.from_pretrained(root / sub)
            # the reasoner's output depends on the VLM only, unless the text starts with the expert heads' facts
            key = (vlm_digest(policy), policy.model_id if policy.cfg.grounded_reasoning else "")
            if key not in bridge_cache:
                bridge_cache[key] = reason_all(policy, samples, desc="reasoning (held-out)")
            bridges, texts, hit = bridge_cache[key]
            row = dict(name=name, checkpoint=str(root / sub), model_id=policy.model_id,
                       open_loop=open_loop_metrics(samples, plan_all(policy, samples, bridges), scenes))
            row["open_loop"].update(action_token_rate=hit,
                                    reasoning_f1=reasoning_overlap(texts, [s.meta["reasoning"] for s in samples]))
            row["perception"] = {**head_metrics(policy, samples, bridges),
                                 **reasoning_fact_accuracy(texts, [s.meta.get("facts") for s in samples])}
            driver = PolicyDriver(policy, 1.0, name=str(sub), reasoner_latency_s=a.reasoner_latency)
        if cl_seeds:
            row["closed_loop"] = closed_loop(driver, scen, cl_seeds, a)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(format_table([row]).splitlines()[-1], f"({row['seconds']} s)", flush=True)
    if graph_seeds:
        name, _, path = a.ros_graph.partition("=")
        rows.append(ros_graph_row(name, Path(path), scen, graph_seeds, a.out, a))
        print(format_table([rows[-1]]).splitlines()[-1], flush=True)
    if cl_seeds and not a.no_expert:
        rows.append(dict(name="reference: expert (IDM/MOBIL)",
                         closed_loop=closed_loop(ExpertDriver(), scen, cl_seeds, a)))
        mark_completed(rows, rows[-1])
    table = format_table(rows) + "\n\n" + format_perception_table(rows)
    print(table)
    report = dict(rows=rows, heldout=str(a.heldout), seconds=round(time.time() - t_start))
    (a.out / "results.json").write_text(json.dumps(report, indent=1))
    (a.out / "results.md").write_text(table + "\n")
    print(f"-> {a.out}/results.json, results.md ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
