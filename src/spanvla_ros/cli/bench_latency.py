"""spanvla-bench-latency: the planner node under load, measured from outside over real DDS.

The planner runs as its own process (`spanvla-drive --no-sim`, params/spanvla.yaml, the embedded default or
--checkpoint). This process plays a pre-rendered highway-env episode into it in real time: 3 cameras at
10 Hz and odometry at 20 Hz, stamped with the wall clock at publication, and listens to its Path, PlanStatus
and Reasoning. Per reasoner rate (and per ``--variant``: planner parameters measured side by side) it prints:

* input stamp -> Path received: odometry stamp (what the plan is stamped with) to arrival here, p50/p99,
  split into plans that arrived while the reasoner was generating and plans that arrived while it was idle;
* camera stamp -> Path: the same plus the age of the bridge it was planned from (frames -> reasoning -> plan);
* achieved control rate (busy / idle), reasoner rate and latency, expert compute time;
* CPU (% of one core) and peak RSS of the planner: the node's process and its reasoner process together.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def record_episode(scenario: str, seed: int):
    from spanvla_ros.sim.highway_backend import HighwayEnvBackend

    b = HighwayEnvBackend()
    obs = b.reset(scenario, seed)
    steps = [obs]
    while not obs.done:
        obs = b.step(None)
        steps.append(obs)
    b.close()
    return steps, b.dt, (b.route_xy, b.stop_lines_xy)


def _spin(executor) -> None:
    from rclpy.executors import ExternalShutdownException

    try:
        executor.spin()
    except ExternalShutdownException:
        pass


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


class Player:
    """Publishes the recorded episode on the planner's input topics at wall-clock pace, looping."""

    HD_FRAMES = 20     # distinct frames per camera at a larger size (3 x 20 x 6.2 MB at 1920x1080), looped

    def __init__(self, node, params: dict, steps, sim_dt: float, route, camera_size: tuple[int, int] | None = None):
        from nav_msgs.msg import Odometry
        from nav_msgs.msg import Path as PathMsg
        from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import Image

        from spanvla_ros.ros.messages import xy_path_msg

        self.node, self.steps, self.sim_dt = node, steps, sim_dt
        self.cams = list(params["camera_names"])
        self.cam_pubs = [node.create_publisher(Image, t, qos_profile_sensor_data) for t in params["camera_topics"]]
        self.odom_pub = node.create_publisher(Odometry, params["odom_topic"], 20)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.route_pub = node.create_publisher(PathMsg, params["route_topic"], latched)
        self.stop_lines_pub = node.create_publisher(PathMsg, params["stop_lines_topic"], latched)
        route_xy, stop_xy = route
        self.route_pub.publish(xy_path_msg(route_xy[::2], "map"))
        self.stop_lines_pub.publish(xy_path_msg(stop_xy, "map"))
        self.stop = threading.Event()
        self.published = 0
        # frames at another size (e.g. HD from a real camera): the episode's first frames, nearest-upscaled once
        self.resized: dict[str, list[np.ndarray]] | None = None
        if camera_size is not None:
            w, h = camera_size
            self.resized = {}
            for cam in self.cams:
                frames = []
                for st in steps[:self.HD_FRAMES]:
                    img = st.images[cam]
                    rows = np.arange(h) * img.shape[0] // h
                    cols = np.arange(w) * img.shape[1] // w
                    frames.append(np.ascontiguousarray(img[rows[:, None], cols[None, :]]))
                self.resized[cam] = frames

    def run(self, odom_hz: float = 20.0, cam_every: int = 2):
        from nav_msgs.msg import Odometry

        from spanvla_ros.geometry import quat_from_yaw
        from spanvla_ros.ros.images import encode_image_msg
        from spanvla_ros.ros.stamps import sec_to_stamp

        period = 1.0 / odom_hz
        t0 = time.monotonic()
        k = 0
        while not self.stop.is_set():
            sim_t = k * period
            n = len(self.steps)
            i = int(sim_t / self.sim_dt) % n
            j = min(i + 1, n - 1)
            f = (sim_t / self.sim_dt) % 1.0
            e0, e1 = self.steps[i].ego, self.steps[j].ego
            stamp = sec_to_stamp(time.time())
            if k % cam_every == 0:
                for cam, pub in zip(self.cams, self.cam_pubs):
                    img = self.resized[cam][i % len(self.resized[cam])] if self.resized else self.steps[i].images[cam]
                    pub.publish(encode_image_msg(img, stamp, f"{cam}_camera"))
            od = Odometry()
            od.header.stamp, od.header.frame_id, od.child_frame_id = stamp, "map", "base_link"
            od.pose.pose.position.x = float(e0.x + f * (e1.x - e0.x))
            od.pose.pose.position.y = float(e0.y + f * (e1.y - e0.y))
            w, x, y, z = quat_from_yaw(e0.heading)
            q = od.pose.pose.orientation
            q.w, q.x, q.y, q.z = w, x, y, z
            od.twist.twist.linear.x = float(e0.speed)
            self.odom_pub.publish(od)
            self.published += 1
            k += 1
            time.sleep(max(0.0, t0 + k * period - time.monotonic()))


def measure(params_file: Path, reasoner_hz: float, duration: float, warmup: float, steps, sim_dt, route,
            checkpoint: str, env: dict, camera_size: tuple[int, int] | None = None,
            overrides: tuple[str, ...] = ()) -> dict:
    import psutil
    import rclpy
    from nav_msgs.msg import Path as PathMsg
    from rclpy.executors import SingleThreadedExecutor

    from spanvla_ros.config import node_params
    from spanvla_ros.msg import PlanStatus, Reasoning
    from spanvla_ros.ros.stamps import stamp_to_sec

    params = {**node_params("topics", params_file),
              "camera_names": node_params("spanvla_planner", params_file)["camera_names"]}
    cmd = [sys.executable, "-m", "spanvla_ros.cli.drive", "--no-sim", "--no-record", "--params-file",
           str(params_file), "--duration", str(duration + warmup + 30),
           "--set", f"spanvla_planner.reasoner_rate_hz={reasoner_hz}"]
    if checkpoint:
        cmd += ["--set", f"spanvla_planner.checkpoint={checkpoint}"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("latency_bench", context=ctx)
    paths: list[tuple[float, float]] = []
    status: dict[float, PlanStatus] = {}
    reasoning: list = []
    node.create_subscription(PathMsg, params["path_topic"],
                             lambda m: paths.append((time.time(), stamp_to_sec(m.header.stamp))), 50)
    node.create_subscription(PlanStatus, params["status_topic"],
                             lambda m: status.__setitem__(round(stamp_to_sec(m.header.stamp), 6), m), 50)
    node.create_subscription(Reasoning, params["reasoning_topic"],
                             lambda m: reasoning.append((time.time(), m.generation_latency)), 10)
    player = Player(node, params, steps, sim_dt, route, camera_size)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    spin = threading.Thread(target=_spin, args=(ex,), daemon=True)
    spin.start()
    play = threading.Thread(target=player.run, daemon=True)
    try:
        ps = psutil.Process(proc.pid)
        # wait for the planner to come up (model load) before the clock starts
        deadline = time.monotonic() + 120
        play.start()
        while not reasoning and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        if not reasoning:
            tail = proc.communicate(timeout=5)[0][-2000:] if proc.poll() is not None else "timeout"
            raise RuntimeError("planner produced no reasoning: " + tail)
        time.sleep(warmup)
        t_start = time.time()
        # the node and its reasoner process (planning.reasoner_process), if it runs one: the CPU it all costs
        procs = [ps, *ps.children(recursive=True)]
        for q in procs:
            q.cpu_percent()
        rss, cpu, cpu_main = [], [], []
        while time.time() - t_start < duration:
            time.sleep(0.5)
            per = [q.cpu_percent() for q in procs]
            cpu.append(sum(per))
            cpu_main.append(per[0])
            rss.append(sum(q.memory_info().rss for q in procs))
        t_end = time.time()
    finally:
        player.stop.set()
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        ex.shutdown()
        # no C++ object may be torn down under a thread still inside it (the abort at exit seen before)
        for t in (play, spin):
            if t.is_alive():
                t.join(timeout=10.0)
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    busy = [(t - lat, t) for t, lat in reasoning]
    def is_busy(t):
        return any(a <= t <= b for a, b in busy)
    win = [(r, s) for r, s in paths if t_start <= r <= t_end]
    lat_in: dict[bool, list[float]] = {True: [], False: []}
    cam, cam_bridge = [], []
    for r, s in win:
        lat_in[is_busy(r)].append(r - s)
        st = status.get(round(s, 6))
        if st is not None and st.bridge_age >= 0:
            cam_bridge.append(r - s + st.bridge_age)
            # what the plan saw of the cameras: the perception heads' frames when fresh, else the bridge's
            cam.append(r - s + (st.perception_age if st.perception_age >= 0 else st.bridge_age))
    busy_time = sum(max(0.0, min(b, t_end) - max(a, t_start)) for a, b in busy)
    idle_time = (t_end - t_start) - busy_time
    sts = [st for (s, st) in status.items() if t_start - 1 <= s <= t_end]
    n_reason = sum(t_start <= t <= t_end for t, _ in reasoning)
    size = camera_size or steps[0].images[player.cams[0]].shape[1::-1]
    return dict(
        reasoner_hz_param=reasoner_hz, camera_size=f"{size[0]}x{size[1]}", window_s=round(t_end - t_start, 1),
        control_rate_hz=len(win) / (t_end - t_start),
        control_rate_busy_hz=len(lat_in[True]) / busy_time if busy_time > 0 else float("nan"),
        control_rate_idle_hz=len(lat_in[False]) / idle_time if idle_time > 0 else float("nan"),
        input_to_path_p50_ms=pct(lat_in[True] + lat_in[False], 50) * 1e3,
        input_to_path_p99_ms=pct(lat_in[True] + lat_in[False], 99) * 1e3,
        input_to_path_busy_p99_ms=pct(lat_in[True], 99) * 1e3, input_to_path_idle_p99_ms=pct(lat_in[False], 99) * 1e3,
        camera_to_path_p50_ms=pct(cam, 50) * 1e3, camera_to_path_p99_ms=pct(cam, 99) * 1e3,
        bridge_camera_to_path_p50_ms=pct(cam_bridge, 50) * 1e3, bridge_camera_to_path_p99_ms=pct(cam_bridge, 99) * 1e3,
        reasoner_rate_hz=n_reason / (t_end - t_start),
        reasoner_latency_p50_ms=pct([lat for t, lat in reasoning if t_start <= t <= t_end], 50) * 1e3,
        expert_compute_p50_ms=pct([s.expert_latency for s in sts], 50) * 1e3,
        expert_compute_p99_ms=pct([s.expert_latency for s in sts], 99) * 1e3,
        degraded_plans=sum(s.degraded for s in sts), plans=len(win),
        cpu_percent_of_one_core=float(np.mean(cpu)) if cpu else float("nan"),
        cpu_percent_main_process=float(np.mean(cpu_main)) if cpu_main else float("nan"),
        processes=len(procs),
        peak_rss_mb=max(rss) / 1e6 if rss else float("nan"))


ROWS = [("control rate (Hz)", "control_rate_hz", "{:.1f}"), ("  while reasoner busy", "control_rate_busy_hz", "{:.1f}"),
        ("  while reasoner idle", "control_rate_idle_hz", "{:.1f}"),
        ("input stamp -> Path p50 (ms)", "input_to_path_p50_ms", "{:.1f}"),
        ("input stamp -> Path p99 (ms)", "input_to_path_p99_ms", "{:.1f}"),
        ("  p99 while reasoner busy (ms)", "input_to_path_busy_p99_ms", "{:.1f}"),
        ("  p99 while reasoner idle (ms)", "input_to_path_idle_p99_ms", "{:.1f}"),
        ("camera stamp -> Path p50 (ms)", "camera_to_path_p50_ms", "{:.0f}"),
        ("camera stamp -> Path p99 (ms)", "camera_to_path_p99_ms", "{:.0f}"),
        ("  via the bridge (reasoner frames) p50 (ms)", "bridge_camera_to_path_p50_ms", "{:.0f}"),
        ("  via the bridge (reasoner frames) p99 (ms)", "bridge_camera_to_path_p99_ms", "{:.0f}"),
        ("reasoner rate (Hz)", "reasoner_rate_hz", "{:.2f}"),
        ("reasoner latency p50 (ms)", "reasoner_latency_p50_ms", "{:.0f}"),
        ("expert compute p50 (ms)", "expert_compute_p50_ms", "{:.1f}"),
        ("expert compute p99 (ms)", "expert_compute_p99_ms", "{:.1f}"),
        ("plans in window (degraded)", None, None),
        ("planner CPU, all its processes (% of one core)", "cpu_percent_of_one_core", "{:.0f}"),
        ("  of which the node's process", "cpu_percent_main_process", "{:.0f}"),
        ("planner processes (the node and its children)", "processes", "{:d}"),
        ("planner peak RSS, all its processes (MB)", "peak_rss_mb", "{:.0f}")]


def table(results: list[dict]) -> str:
    head = "| metric | " + " | ".join(f"reasoner {r['reasoner_hz_param']:g} Hz, {r['camera_size']}"
                                      + (f", {r['variant']}" if r["variant"] else "") for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for label, key, fmt in ROWS:
        if key is None:
            cells = [f"{r['plans']} ({r['degraded_plans']})" for r in results]
        else:
            cells = [str(fmt).format(r[key]) for r in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from spanvla_ros.config import default_params_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-file", type=Path, default=default_params_path())
    ap.add_argument("--reasoner-hz", default="0.5,1,2", help="comma list; one planner run each")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--scenario", default="lead_brake")
    ap.add_argument("--seed", type=int, default=10000)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--camera-sizes", default="native",
                    help="comma list of frame sizes the cameras publish: native (the simulator's) or WxH, e.g. "
                         "native,1920x1080 (one planner run per size and reasoner rate)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:NODE.PARAM=VALUE[;...]",
                    help="a planner configuration to measure side by side with the others (repeatable; one run "
                         "per variant, size and rate), e.g. 'in-process:spanvla_planner.reasoner_process=false'")
    a = ap.parse_args(argv)
    variants: list[tuple[str, tuple[str, ...]]] = [("", ())]
    if a.variant:
        variants = []
        for spec in a.variant:
            name, sep, sets = spec.partition(":")
            if not sep or not name:
                ap.error(f"--variant {spec!r}: expected NAME:NODE.PARAM=VALUE[;...]")
            variants.append((name, tuple(x for x in sets.split(";") if x)))
    steps, sim_dt, route = record_episode(a.scenario, a.seed)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    def size(spec: str) -> tuple[int, int] | None:
        if spec == "native":
            return None
        w, _, h = spec.partition("x")
        return int(w), int(h)

    sizes = [size(x) for x in a.camera_sizes.split(",")]
    results = []
    for (name, sets), wh, hz in [(v, wh, float(x)) for v in variants for wh in sizes
                                 for x in a.reasoner_hz.split(",")]:
        results.append({**measure(a.params_file, hz, a.duration, a.warmup, steps, sim_dt, route, a.checkpoint, env,
                                  wh, sets), "variant": name, "overrides": list(sets)})
        rounded = {k: round(v, 2) if isinstance(v, float) else v for k, v in results[-1].items()}
        print(f"reasoner {hz:g} Hz{', ' + name if name else ''}: {json.dumps(rounded)}",
              flush=True)
    print(f"\nplanner process (spanvla-drive --no-sim), {os.cpu_count()} CPU cores, {a.duration:g} s per run, "
          f"inputs: 3 cameras 10 Hz (raw rgb8) + odometry 20 Hz over DDS (loopback)\n")
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
