"""spanvla-make-default: build the embedded default checkpoint (tokenizer trained here + tiny Qwen2.5-VL
config + action expert) at checkpoints/spanvla_init. Training it on generated driving data is the
training pipeline's job; this writes the starting point with a fixed seed, so it is reproducible."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from spanvla_ros.config import set_torch_threads, source_root
from spanvla_ros.model.config import SpanVLAConfig
from spanvla_ros.model.corpus import tokenizer_corpus
from spanvla_ros.model.policy import DTYPES, SpanVLAPolicy
from spanvla_ros.model.tokenizer import train_tokenizer

DEFAULT_DIR = Path("checkpoints") / "spanvla_init"   # never over the shipped, trained default


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=source_root() / DEFAULT_DIR)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per CPU)")
    ap.add_argument("--device", default="cpu", help="where to initialise the weights (cuda: seconds for 3B-class)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="the VLM weights' storage type (bfloat16 halves a 3B-class checkpoint)")
    a = ap.parse_args(argv)
    set_torch_threads(a.threads)
    cfg = SpanVLAConfig()
    tok = train_tokenizer(tokenizer_corpus(cfg, seed=a.seed))
    with torch.device(a.device):
        policy = SpanVLAPolicy.build(cfg, tok, preset=a.preset, seed=a.seed)
    policy.reasoner.model.to(DTYPES[a.dtype])
    policy.save_pretrained(a.out)
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    print(f"wrote {a.out} ({size / 1e6:.1f} MB, vocab {len(tok)}, "
          f"VLM {sum(p.numel() for p in policy.reasoner.model.parameters()) / 1e6:.2f} M params, "
          f"expert {sum(p.numel() for p in policy.expert.parameters()) / 1e6:.2f} M params)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
