"""spanvla-drive: the composed driving process that drive.launch.py starts, runnable without `ros2 launch`.

Nodes (names match params/spanvla.yaml): sensor_source (stand-in for the simulator bridge) and
spanvla_planner (reasoner + action expert sharing the bridge in memory), on one multi-threaded executor,
with the parameters of --params-file. Prints a summary and exits non-zero if no plan was published.
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import threading

from spanvla_ros.config import default_params_path


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params-file", default=str(default_params_path()))
    ap.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0 = until Ctrl-C")
    ap.add_argument("--no-source", action="store_true", help="do not start the stand-in sensor source")
    a, ros_args = ap.parse_known_args(argv if argv is not None else sys.argv[1:])

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from spanvla_ros.nodes.planner import PlannerNode
    from spanvla_ros.nodes.sensor_source import SensorSourceNode

    rclpy.init(args=["spanvla_drive", "--ros-args", "--params-file", a.params_file] + ros_args)
    nodes = [] if a.no_source else [SensorSourceNode()]
    planner = PlannerNode()
    nodes.append(planner)
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
    try:
        stop.wait(a.duration if a.duration > 0 else None)
    except KeyboardInterrupt:
        pass
    finally:
        c = planner.counters
        rl, el = planner.reasoner_latencies, planner.expert_latencies
        print(f"[spanvla-drive] model {planner.policy.model_id}")
        print(f"[spanvla-drive] plans published {c['plans_published']} (degraded {c['plans_degraded']}), "
              f"withheld for stale odometry {c['plans_withheld_stale_odometry']}, reasoner runs {c['reasoner_runs']}, "
              f"bad messages {planner.bad_messages}")
        if rl:
            print(f"[spanvla-drive] reasoner latency median {statistics.median(rl):.3f} s, max {max(rl):.3f} s; "
                  f"expert latency p50 {_pct(el, .5) * 1e3:.1f} ms, p99 {_pct(el, .99) * 1e3:.1f} ms")
        if planner._last_reasoning:
            print(f"[spanvla-drive] last reasoning: {planner._last_reasoning!r}")
        print(f"[spanvla-drive] counters {dict(c)}")
        published = c["plans_published"]
        for ex in executors:
            ex.shutdown()
        for t in spinners:  # C++ objects must not be torn down under a thread still inside spin()
            t.join(timeout=10.0)
        for n in nodes:
            n.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0 if published > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
