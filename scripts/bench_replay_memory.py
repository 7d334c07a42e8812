#!/usr/bin/env python3
"""Peak RSS of spanvla-replay against bag length: writes a 1-minute and a 5-minute foreign bag (3 raw bgra8 320x240
cameras at 10 Hz as carla-ros-bridge records them, odometry at 20 Hz, other topic names: replayed with --remap),
replays each in its own process (run view included) and prints bag size, replay time and peak RSS side by side. Streaming means the two RSS
figures are about equal. Usage (after `make build`, in `source .venv/env.sh`):

    python scripts/bench_replay_memory.py [--minutes 1 5] [--rate 4] [--out /tmp/replay_mem]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test"))


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS MB of the process tree, seconds, exit code), sampled every 0.1 s."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps, peak = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.1)
    return peak, time.monotonic() - t0, proc.returncode


def main() -> int:
    from helpers.foreign_bag import remaps_to, write_foreign_bag
    from spanvla_ros.config import default_params_path, node_params

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, nargs="+", default=[1.0, 5.0])
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/replay_mem"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    params = default_params_path()
    remaps = remaps_to(node_params("spanvla_planner", params)["camera_names"], node_params("topics", params))
    rows = []
    for minutes in a.minutes:
        bag = a.out / f"foreign_{minutes:g}min"
        if not bag.exists():
            write_foreign_bag(bag, seconds=60 * minutes, width=320, height=240, encoding="bgra8")
        size = sum(f.stat().st_size for f in bag.iterdir()) / 2**20
        cmd = [sys.executable, "-m", "spanvla_ros.eval.replay", str(bag), "--out", str(a.out / f"out_{minutes:g}"),
               "--rate", str(a.rate), "--remap", *remaps]
        peak, secs, rc = peak_rss_mb(cmd)
        report = json.loads((a.out / f"out_{minutes:g}" / "results.json").read_text()) if rc == 0 else {}
        rows.append(dict(minutes=minutes, bag_mb=round(size, 1), replay_s=round(secs, 1), peak_rss_mb=round(peak),
                         plans=report.get("plans"), replayed_messages=report.get("replayed_messages"), rc=rc))
        print(rows[-1], flush=True)
    print("\n| bag length | bag size | replay time | plans scored | peak RSS |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['minutes']:g} min | {r['bag_mb']} MB | {r['replay_s']} s | {r['plans']} | {r['peak_rss_mb']} MB |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
