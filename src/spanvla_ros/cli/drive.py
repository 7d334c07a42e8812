"""spanvla-drive: the composed driving process that drive.launch.py starts, runnable without `ros2 launch`.

Nodes (names match params/spanvla.yaml): sim_bridge (highway-env closed loop, carla-ros-bridge topics, path
tracking) and spanvla_planner (reasoner + action expert sharing the bridge in memory), each on its own
executor thread, with the parameters of --params-file. Prints a summary (plans, latencies, episodes) and
exits non-zero if no plan was published.
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import threading
import time

from spanvla_ros.config import default_params_path, node_params
from spanvla_ros.sim.backends import BACKENDS


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _spin(executor) -> None:
    from rclpy.executors import ExternalShutdownException

    try:
        executor.spin()
    except ExternalShutdownException:
        pass


def _override_file(items: list[str]) -> str:
    """NODE.PARAM=VALUE items -> a temporary ROS params file (`-p` would lose to the file's node sections)."""
    import tempfile

    import yaml

    data: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        node, dot, name = key.partition(".")
        if not (sep and dot and node and name):
            raise SystemExit(f"--set expects NODE.PARAM=VALUE, got {item!r}")
        data.setdefault(node, {"ros__parameters": {}})["ros__parameters"][name] = yaml.safe_load(value)
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="spanvla_overrides_", delete=False)
    yaml.safe_dump(data, f)
    f.close()
    return f.name


class Reporter:
    """A soak test's log line every ``every`` seconds: RSS, plan and reasoner rates over the interval, degraded /
    withheld / limited plans, episodes and recorded MB so far (memory flat, rates held, nothing lost unmarked)."""

    def __init__(self, planner, sim, recorder, every: float):
        import psutil

        self.planner, self.sim, self.recorder, self.every = planner, sim, recorder, every
        self.proc = psutil.Process()
        self.t0 = self.last_t = time.monotonic()
        self.last = dict(planner.counters)
        print("[spanvla-drive] soak: minute | RSS MB | plans/s | reasoner/s | degraded | withheld | limited | "
              "episodes | recorded MB", flush=True)

    def maybe_print(self) -> None:
        now = time.monotonic()
        if now - self.last_t < self.every:
            return
        c, span = dict(self.planner.counters), now - self.last_t

        def rate(k):
            return (c.get(k, 0) - self.last.get(k, 0)) / span

        def delta(k):
            return c.get(k, 0) - self.last.get(k, 0)

        episodes = len(self.sim.episodes) if self.sim is not None else 0
        recorded = self.recorder.bytes / 1e6 if self.recorder is not None else 0.0
        print(f"[spanvla-drive] soak: {(now - self.t0) / 60:.1f} | {self.proc.memory_info().rss / 1e6:.0f} | "
              f"{rate('plans_published'):.1f} | {rate('reasoner_runs'):.2f} | {delta('plans_degraded')} | "
              f"{delta('plans_withheld_stale_odometry')} | {delta('plans_limited')} | {episodes} | {recorded:.0f}",
              flush=True)
        self.last, self.last_t = c, now


def _render_view(run_dir, bags, title: str) -> None:
    from spanvla_ros.data.bag_io import BagError
    from spanvla_ros.eval.run_view import read_run, render_strip

    try:
        out = render_strip(read_run(bags), run_dir / "run_view.png", title=title)
        print(f"[spanvla-drive] run view -> {out}")
    except BagError as exc:   # e.g. stopped before the first plan
        print(f"[spanvla-drive] no run view: {exc}")


LAUNCH_ARGUMENTS = ("params_file", "sim", "checkpoint", "duration", "record", "rviz")


def launch_command_line(params_file: str, sim: str, checkpoint: str, duration: str, record: str) -> list[str]:
    """drive.launch.py's arguments as this program's command line (the launch file calls this, so the two
    cannot disagree): ``sim:=false`` runs the planner alone (carla-ros-bridge or a car provides the topics),
    ``checkpoint:=DIR`` overrides the params file's."""
    if sim.strip().lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"sim:={sim!r}: expected true or false")
    args = ["--params-file", params_file, "--duration", duration, "--record", record]
    if sim.strip().lower() in ("false", "0"):
        args.append("--no-sim")
    if checkpoint:
        args += ["--set", f"spanvla_planner.checkpoint={checkpoint}"]
    return args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params-file", default=str(default_params_path()))
    ap.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0 = until Ctrl-C")
    ap.add_argument("--no-sim", action="store_true", help="planner only (camera/odometry from a real car, CARLA "
                    "bridge or bag replay)")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                    help="override one parameter of one node (YAML value), e.g. spanvla_planner.reasoner_rate_hz=2; "
                    "applied as a second params file, so it wins over node sections of --params-file")
    ap.add_argument("--episodes", type=int, default=0,
                    help="stop after this many simulator episodes (overrides sim_bridge max_episodes)")
    ap.add_argument("--record", default="runs/{time}", help="run directory: MCAP bag of inputs and plans + "
                    "run_view.png ({time} is replaced by the start time)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--record-raw", action="store_true",
                    help="record camera frames raw (default: JPEG on <topic>/compressed, ~10x smaller)")
    ap.add_argument("--split-size-mb", type=float, default=1024.0,
                    help="start a new bag part after this many MB (ros2 bag record --max-bag-size; 0: never)")
    ap.add_argument("--split-duration-s", type=float, default=0.0,
                    help="start a new bag part after this many seconds (--max-bag-duration; 0: never)")
    ap.add_argument("--min-free-mb", type=float, default=1000.0,
                    help="stop recording (driving goes on) when the disk has less than this left")
    ap.add_argument("--report-every", type=float, default=0.0,
                    help="print RSS, plan and reasoner rates and degraded / withheld counts every this many "
                         "seconds (a soak test's log; 0: off)")
    ap.add_argument("--json", default="", help="write the episodes' results, counters and latencies to this file")
    ap.add_argument("--backend", default="", choices=["", *BACKENDS],
                    help="simulator (default: sim_bridge.backend of the params file)")
    ap.add_argument("--carla-host", default="", help="CARLA server host (sim_bridge.carla_host)")
    ap.add_argument("--carla-port", type=int, default=0, help="CARLA server port (sim_bridge.carla_port)")
    a, ros_args = ap.parse_known_args(argv if argv is not None else sys.argv[1:])

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from spanvla_ros.nodes.planner import PlannerNode
    from spanvla_ros.ros.topics import default_planner_remaps, remap_arguments
    if a.episodes:
        a.set.append(f"sim_bridge.max_episodes={a.episodes}")
    for key, value in (("backend", a.backend), ("carla_host", a.carla_host), ("carla_port", a.carla_port)):
        if value:
            a.set.append(f"sim_bridge.{key}={value}")
    params_files = ["--params-file", a.params_file]
    if a.set:
        params_files += ["--params-file", _override_file(a.set)]
    # with the simulator, the planner runs on its clock (/clock): the age of the simulated sensors' stamps
    sim_time = [] if a.no_sim else ["-p", "spanvla_planner:use_sim_time:=true"]
    # the planner's node-relative topics onto the params file's names on the wire, after any remap of the user's
    remaps = ["--ros-args", *remap_arguments(default_planner_remaps(a.params_file))]
    rclpy.init(args=["spanvla_drive", "--ros-args"] + params_files + sim_time + ros_args + remaps)
    nodes: list = []
    if not a.no_sim:
        from spanvla_ros.nodes.sim_bridge import SimBridgeNode
        nodes.append(SimBridgeNode())
    planner = PlannerNode()
    nodes.append(planner)
    recorder, run_dir = None, None
    if not a.no_record:
        from pathlib import Path

        from spanvla_ros.ros.recorder import BagRecorderNode, drive_topics
        run_dir = Path(a.record.format(time=time.strftime("%Y%m%d-%H%M%S")))
        recorder = BagRecorderNode(run_dir / "bag", drive_topics(node_params("topics", a.params_file),
                                                                 None if a.no_sim else nodes[0].p),
                                   compress_images=not a.record_raw, split_bytes=int(a.split_size_mb * 1e6),
                                   split_s=a.split_duration_s, min_free_bytes=int(a.min_free_mb * 1e6))
        nodes.append(recorder)
    # One executor thread per node: the source's rendering never delays the planner's control timer.
    executors = []
    for n in nodes:
        ex = SingleThreadedExecutor()
        ex.add_node(n)
        executors.append(ex)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    spinners = [threading.Thread(target=_spin, args=(ex,), daemon=True) for ex in executors]
    for t in spinners:
        t.start()
    sim = nodes[0] if not a.no_sim else None
    deadline = time.monotonic() + a.duration if a.duration > 0 else float("inf")
    report = Reporter(planner, sim, recorder, a.report_every) if a.report_every > 0 else None
    try:
        while not stop.wait(0.2) and time.monotonic() < deadline and not (sim and sim.finished):
            if report is not None:
                report.maybe_print()
    except KeyboardInterrupt:
        pass
    finally:
        c = planner.counters
        rl, el = planner.reasoner_latencies, planner.expert_latencies
        print(f"[spanvla-drive] model {planner.policy.model_id}")
        print(f"[spanvla-drive] plans published {c['plans_published']} (degraded {c['plans_degraded']}, "
              f"without route {c['plans_without_route']}, without stop lines {c['plans_without_stop_lines']}), "
              f"withheld for stale odometry {c['plans_withheld_stale_odometry']}, reasoner runs {c['reasoner_runs']}, "
              f"bad messages {planner.bad_messages}")
        if rl:
            print(f"[spanvla-drive] reasoner latency median {statistics.median(rl):.3f} s, max {max(rl):.3f} s; "
                  f"expert latency p50 {_pct(el, .5) * 1e3:.1f} ms, p99 {_pct(el, .99) * 1e3:.1f} ms")
        if planner.core.last_reasoning:
            print(f"[spanvla-drive] last reasoning: {planner.core.last_reasoning!r}")
        print(f"[spanvla-drive] counters {dict(c)}")
        if sim is not None:
            from spanvla_ros.eval.closed_loop import EpisodeResult

            for e in sim.episodes:
                ds = EpisodeResult.from_record(e).driving_score
                print(f"[spanvla-drive] episode {e['scenario']} seed {e['seed']}: route completion "
                      f"{e['route_completion']:.0%}, collision {e['collision']}, off-road {e['off_road']}, "
                      f"red light {e['red_light']}, driving score {ds:.2f} ({e['t']:.1f} s)")
            if not sim.episodes:
                print(f"[spanvla-drive] episode {sim.scenario} seed {sim.seed} running: "
                      f"route completion {sim.obs.route_completion:.0%} after {sim.obs.t:.1f} s")
        if a.json:
            import json

            with open(a.json, "w") as f:
                json.dump(dict(model_id=planner.policy.model_id, counters=dict(c),
                               episodes=sim.episodes if sim is not None else [],
                               reasoner_latency_s=rl, expert_latency_s=el), f, indent=1)
        published = c["plans_published"]
        for ex in executors:
            ex.shutdown()
        for t in spinners:  # C++ objects must not be torn down under a thread still inside spin()
            t.join(timeout=10.0)
        if recorder is not None:
            recorder.close()
            print(f"[spanvla-drive] recorded {sum(recorder.counts.values())} messages "
                  f"({recorder.bytes / 1e6:.1f} MB) -> {', '.join(map(str, recorder.parts))}"
                  + (f"; {recorder.stopped}" if recorder.stopped else ""))
            _render_view(run_dir, recorder.parts, planner.policy.model_id)
        for n in nodes:
            n.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0 if published > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
