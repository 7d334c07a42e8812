"""spanvla-bench-model: reasoner prefill, decode per token, flow-expert trajectory (N Euler steps) vs
autoregressive action tokens (AutoVLA-style), side by side in one run, for 10 and 50 action points; and the
planner core's own path (frames + odometry -> reasoner -> bridge -> expert -> trajectory) per model.
Medians over --repeats runs; peak memory (RSS, or CUDA peak on a GPU). Models are presets built with random
weights (--presets) or checkpoints loaded through SpanVLAPolicy.from_pretrained (--checkpoints), the path the
planner node uses. Paper reference: 0.40 s AR vs 0.08 s flow (5x), 0.67 s in all, Qwen2.5-VL-3B on a GPU."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from spanvla_ros.config import node_params, set_torch_threads
from spanvla_ros.model.ar_baseline import ARActionDecoder
from spanvla_ros.model.config import SpanVLAConfig
from spanvla_ros.model.corpus import tokenizer_corpus
from spanvla_ros.model.policy import DTYPES, SpanVLAPolicy
from spanvla_ros.model.tokenizer import train_tokenizer
from spanvla_ros.planning.core import PlannerCore, PlannerParams

PAST = np.array([[-12.0, 0.0, 0.0], [-8.0, 0.0, 0.0], [-4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
SPEED = 8.0


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def load_model(name: str, device: str, dtype: str) -> SpanVLAPolicy:
    """A preset name builds random weights; anything else is a checkpoint directory."""
    if Path(name).is_dir():
        return SpanVLAPolicy.from_pretrained(name, device=device, dtype=dtype)
    cfg = SpanVLAConfig()
    policy = SpanVLAPolicy.build(cfg, train_tokenizer(tokenizer_corpus(cfg, n=100)), preset=name)
    policy.reasoner.model.to(device, DTYPES[dtype])
    policy.expert.to(device)
    return policy


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def bench_model(policy: SpanVLAPolicy, repeats: int, reasoning_tokens: int, points=(10, 50)) -> dict:
    """Reasoner, flow expert and AR action tokens on the same prefix."""
    cfg, device = policy.cfg, policy.reasoner.device
    ar = ARActionDecoder(policy.reasoner)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (cfg.image_height, cfg.image_width, 3), dtype=np.uint8)
              for _ in range(cfg.num_images)]
    prompt = policy.reasoner.prompt(cfg.commands[0], SPEED, 0.0, PAST[:, :2])
    rows: dict[str, list[float]] = {"prefill": [], "decode_per_token": []}
    for n in points:
        rows[f"flow_{n}"], rows[f"ar_{n}"] = [], []
    ego = torch.zeros(1, cfg.ego_dim, device=device)
    for rep in range(repeats + 1):  # first round is warm-up (and compilation)
        # a fixed token budget so every model decodes the same number of tokens
        r = ar.reasoner.reason(images, prompt, max_new_tokens=reasoning_tokens, keep_cache=True)
        if rep:
            rows["prefill"].append(r.prefill_s)
            rows["decode_per_token"].append(r.decode_s / len(r.token_ids))
        for n in points:
            a_his = torch.from_numpy(policy.history_init(PAST, SPEED, horizon=n))[None].to(device)
            with torch.inference_mode():
                def flow(r=r, a_his=a_his):
                    return policy.expert.sample(r.bridge, a_his, ego, steps=cfg.flow_steps)
                _, flow_s = _timed(flow, device)
            cache: Any = r.cache   # transformers' DynamicCache
            seq = cache.get_seq_length()
            _, ar_s = ar.decode_trajectory(r, n)
            _sync(device)
            added = cache.get_seq_length() - seq
            if added:  # rewind the cache so the next point count starts from the same prefix
                cache.crop(-added)
            if rep:
                rows[f"flow_{n}"].append(flow_s)
                rows[f"ar_{n}"].append(ar_s)
    out = {k: statistics.median(v) for k, v in rows.items()}
    out["seq_len"] = r.bridge.seq_len
    return out


def bench_core(policy: SpanVLAPolicy, repeats: int, reasoning_tokens: int) -> dict:
    """The planner node's path without ROS: 4 history frame sets of 3 cameras at 2 Hz and 20 Hz odometry into
    PlannerCore, one reasoner run, its bridge published, then plans (fresh perception of the newest front frame
    included, as in the node)."""
    cfg = policy.cfg
    params = node_params("spanvla_planner")
    params["max_new_tokens"] = reasoning_tokens
    cams = tuple(params["camera_names"])
    core = PlannerCore(policy, PlannerParams.from_mapping(params), cams)
    rng = np.random.default_rng(1)
    frame_dt, t = 1.0 / params["history_rate_hz"], 0.0
    for k in range(cfg.history_frames):
        for cam in cams:
            core.add_image(cam, k * frame_dt, rng.integers(0, 256, (cfg.image_height, cfg.image_width, 3), np.uint8))
    while t <= (cfg.history_frames - 1) * frame_dt + 1e-9:
        core.add_odometry(t, SPEED * t, 0.0, 0.0, SPEED, "map", received=t)
        t += 0.05
    device = policy.reasoner.device
    reason_s, plan_s = [], []
    for rep in range(repeats + 1):
        r, dt = _timed(core.reason, device)
        core.bridge.publish(r.bridge)
        plans = []
        for _ in range(5):
            plan, p_dt = _timed(lambda: core.plan(t), device)
            if plan is None or not np.isfinite(plan.traj).all():
                raise RuntimeError("the planner core returned no finite plan")
            plans.append(p_dt)
        if rep:
            reason_s.append(dt)
            plan_s.extend(plans)
    return {"core_reason": statistics.median(reason_s), "core_plan": statistics.median(plan_s)}


def peak_memory_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="*", default=["tiny", "qwen0.5b-class"],
                    help="presets built with random weights (model.policy.VLM_PRESETS)")
    ap.add_argument("--checkpoints", nargs="*", default=[], help="checkpoint directories (from_pretrained)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the VLM's; the expert stays float32")
    ap.add_argument("--compile-expert", action="store_true",
                    help="torch.compile the expert's velocity network (CUDA graphs on a GPU: mode reduce-overhead)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reasoning-tokens", type=int, default=20)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per CPU)")
    a = ap.parse_args(argv)
    set_torch_threads(a.threads)
    torch.set_grad_enabled(False)
    card = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"device={a.device} ({card}) dtype={a.dtype} compile_expert={a.compile_expert} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} repeats={a.repeats} reasoning_tokens={a.reasoning_tokens}")
    hdr = (f"{'model':<22}{'VLM M':>8}{'seq':>6}{'prefill s':>11}{'tok ms':>8}{'flow10 ms':>11}{'AR10 ms':>10}"
           f"{'AR/flow10':>10}{'flow50 ms':>11}{'AR50 ms':>10}{'AR/flow50':>10}{'core reason s':>15}"
           f"{'core plan ms':>14}{'peak MB':>9}")
    print(hdr)
    rows = []
    for name in [*a.presets, *a.checkpoints]:
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        policy = load_model(name, a.device, a.dtype)
        if a.compile_expert:
            mode = "reduce-overhead" if a.device.startswith("cuda") else "default"
            policy.expert.forward = torch.compile(policy.expert.forward, mode=mode)  # type: ignore[method-assign]
        r = bench_model(policy, a.repeats, a.reasoning_tokens)
        r.update(bench_core(policy, a.repeats, a.reasoning_tokens))
        r.update(model=Path(name).name if Path(name).is_dir() else name, device=a.device, card=card, dtype=a.dtype,
                 compile_expert=a.compile_expert, reasoning_tokens=a.reasoning_tokens, repeats=a.repeats,
                 vlm_params_m=sum(p.numel() for p in policy.reasoner.model.parameters()) / 1e6,
                 expert_params_m=sum(p.numel() for p in policy.expert.parameters()) / 1e6,
                 bridge_layers=len(policy.reasoner.layer_ids), peak_mem_mb=peak_memory_mb(a.device))
        rows.append(r)
        print(f"{r['model']:<22}{r['vlm_params_m']:>8.1f}{r['seq_len']:>6}{r['prefill']:>11.3f}"
              f"{r['decode_per_token'] * 1e3:>8.1f}{r['flow_10'] * 1e3:>11.1f}{r['ar_10'] * 1e3:>10.1f}"
              f"{r['ar_10'] / r['flow_10']:>10.2f}{r['flow_50'] * 1e3:>11.1f}{r['ar_50'] * 1e3:>10.1f}"
              f"{r['ar_50'] / r['flow_50']:>10.2f}{r['core_reason']:>15.3f}{r['core_plan'] * 1e3:>14.1f}"
              f"{r['peak_mem_mb']:>9.0f}", flush=True)
        del policy
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
