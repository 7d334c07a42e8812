"""Two torch processes on one machine: one lockstep closed-loop episode alone, then two side by side, each with
one thread per process and each with as many threads as the machine has (torch's default). Prints the wall times
and their ratios to the single run (python scripts/bench_threads.py [--scenario cut_in] [--json out.json]).

Every spanvla tool that runs torch takes --threads (the planner node: torch_threads), so processes that share a
machine can be given their share instead of each taking every core."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def episode_cmd(scenario: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "spanvla_ros.eval.closed_loop", "--scenarios", scenario, "--seeds", "10000:10001",
            "--reasoner-latency", "0.5", "--threads", str(threads)]


def run(n: int, scenario: str, threads: int) -> float:
    """Wall seconds until all ``n`` processes are done."""
    t0 = time.monotonic()
    procs = [subprocess.Popen(episode_cmd(scenario, threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(n)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a closed-loop run failed")
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", default="cut_in")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    alone = run(1, a.scenario, 1)
    shared = run(2, a.scenario, max(1, cores // 2))
    greedy = run(2, a.scenario, cores)
    rows = [("one process, 1 thread", alone), (f"two side by side, {max(1, cores // 2)} thread(s) each", shared),
            (f"two side by side, {cores} threads each (torch's default)", greedy)]
    print(f"| {a.scenario} episode, {cores} CPUs | wall s | x alone |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.1f} | {t / alone:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cpus=cores, scenario=a.scenario, rows=[dict(run=n, wall_s=t, ratio=t / alone)
                                                                   for n, t in rows]), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
