"""spanvla-bench-model: reasoner prefill, decode per token, flow-expert trajectory (N Euler steps) vs
autoregressive action tokens (AutoVLA-style), side by side in one run, for 10 and 50 action points.
Medians over --repeats runs; peak memory (RSS, or CUDA peak on a GPU). Paper reference: 0.40 s AR vs 0.08 s
flow (5x) with Qwen2.5-VL-3B on a GPU."""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import psutil
import torch

from spanvla_ros.model.ar_baseline import ARActionDecoder
from spanvla_ros.model.config import SpanVLAConfig
from spanvla_ros.model.corpus import tokenizer_corpus
from spanvla_ros.model.policy import SpanVLAPolicy
from spanvla_ros.model.tokenizer import train_tokenizer

PAST = np.array([[-12.0, 0.0, 0.0], [-8.0, 0.0, 0.0], [-4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_preset(preset: str, device: str, repeats: int, reasoning_tokens: int, points=(10, 50)) -> dict:
    cfg = SpanVLAConfig()
    tok = train_tokenizer(tokenizer_corpus(cfg, n=100))
    policy = SpanVLAPolicy.build(cfg, tok, preset=preset)
    policy.reasoner.model.to(device)
    policy.expert.to(device)
    ar = ARActionDecoder(policy.reasoner)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (cfg.image_height, cfg.image_width, 3), dtype=np.uint8) for _ in range(12)]
    prompt = policy.reasoner.prompt("follow lane", 8.0, 0.0, PAST[:, :2])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rows = {"prefill": [], "decode_per_token": []}
    for n in points:
        rows[f"flow_{n}"], rows[f"ar_{n}"] = [], []
    ego = torch.zeros(1, cfg.ego_dim, device=device)
    for rep in range(repeats + 1):  # first round is warm-up
        # reasoning with a fixed token budget so every preset decodes the same number of tokens
        r = ar.reasoner.reason(images, prompt, max_new_tokens=reasoning_tokens, keep_cache=True)
        # the AR copy shares the reasoner's weights and shapes, so its bridge fits the expert
        if rep:
            rows["prefill"].append(r.prefill_s)
            rows["decode_per_token"].append(r.decode_s / len(r.token_ids))
        for n in points:
            a_his = torch.from_numpy(policy.history_init(PAST, 8.0, horizon=n))[None].to(device)
            with torch.inference_mode():
                _sync(device)
                t0 = time.perf_counter()
                policy.expert.sample(r.bridge, a_his, ego, steps=cfg.flow_steps)
                _sync(device)
                flow_s = time.perf_counter() - t0
            seq = r.cache.get_seq_length()
            _, ar_s = ar.decode_trajectory(r, n)
            _sync(device)
            added = r.cache.get_seq_length() - seq
            if added:  # rewind the cache so the next point count starts from the same prefix
                r.cache.crop(-added)
            if rep:
                rows[f"flow_{n}"].append(flow_s)
                rows[f"ar_{n}"].append(ar_s)
    out = {k: statistics.median(v) for k, v in rows.items()}
    out["vlm_params_m"] = sum(p.numel() for p in policy.reasoner.model.parameters()) / 1e6
    out["expert_params_m"] = sum(p.numel() for p in policy.expert.parameters()) / 1e6
    out["seq_len"] = r.bridge.seq_len
    out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                          else psutil.Process().memory_info().rss / 2**20)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["tiny", "qwen0.5b-class"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reasoning-tokens", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()} repeats={a.repeats}")
    hdr = (f"{'preset':<16}{'VLM M':>8}{'seq':>6}{'prefill s':>11}{'tok ms':>8}{'flow10 ms':>11}{'AR10 ms':>10}"
           f"{'AR/flow10':>10}{'flow50 ms':>11}{'AR50 ms':>10}{'AR/flow50':>10}{'peak MB':>9}")
    print(hdr)
    for preset in a.presets:
        r = bench_preset(preset, a.device, a.repeats, a.reasoning_tokens)
        print(f"{preset:<16}{r['vlm_params_m']:>8.1f}{r['seq_len']:>6}{r['prefill']:>11.3f}"
              f"{r['decode_per_token'] * 1e3:>8.1f}{r['flow_10'] * 1e3:>11.1f}{r['ar_10'] * 1e3:>10.1f}"
              f"{r['ar_10'] / r['flow_10']:>10.2f}{r['flow_50'] * 1e3:>11.1f}{r['ar_50'] * 1e3:>10.1f}"
              f"{r['ar_50'] / r['flow_50']:>10.2f}{r['peak_mem_mb']:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
