"""spanvla-replay: rosbag replay evaluation through the real nodes over real DDS.

Any rosbag2 (MCAP or sqlite3): the planner's input topics come from the params file (cameras raw or
/compressed, odometry, command, route, stop lines), ``--remap FROM:=TO`` maps a bag's own names onto them. The
bag is streamed (memory does not grow with its length) and its messages are republished at the recorded pace
(``--rate``, ``--start``, ``--duration``); spanvla_planner runs in this process as it does on the car; a
recorder node writes every Path, Reasoning and PlanStatus it publishes into a new bag (MCAP). Then each plan is
compared with the logged drive (eval.plan_metrics: ADE/FDE per horizon, heading, lateral/longitudinal
deviation, comfort, progress; plan-to-plan consistency), and PDM-style scores where the scene is known
(episodes generated here carry their scenario and seed in the bag name). Output: a table on stdout,
results.json, a plot and a run view.

A corrupt or truncated bag is replayed as far as it reads; the report says so and covers what was replayed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data.bag_io import BagError, BagStream, EpisodeLog, odometry_row, read_episode, typestore
from ..geometry import yaw_from_quat
from ..model.config import SpanVLAConfig
from .closed_loop import plan_displacement
from .pdm import score
from .plan_metrics import plan_vs_log

REPLAY_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "nav_msgs/msg/Odometry",
                "std_msgs/msg/String", "nav_msgs/msg/Path")
LATCHED_TYPES = ("std_msgs/msg/String", "nav_msgs/msg/Path")   # command, route, stop lines: subscribed latched


class PlanRecorder:
    """Subscribes to the planner's outputs and keeps them (and their CDR bytes for the output bag)."""

    def __init__(self, node, wire: dict):
        from nav_msgs.msg import Path as PathMsg
        from rclpy.serialization import serialize_message

        from spanvla_ros.msg import PlanStatus, Reasoning

        self._ser = serialize_message
        self.records: list[tuple[int, str, str, Any]] = []   # (receive ns, topic, typename, msg)
        self.lock = threading.Lock()
        for topic, typ, name in ((wire["path_topic"], PathMsg, "nav_msgs/msg/Path"),
                                 (wire["reasoning_topic"], Reasoning, "spanvla_ros/msg/Reasoning"),
                                 (wire["status_topic"], PlanStatus, "spanvla_ros/msg/PlanStatus")):
            node.create_subscription(typ, topic, lambda m, t=topic, n=name: self._on(t, n, m), 50)

    def _on(self, topic, name, msg):
        with self.lock:
            self.records.append((time.time_ns(), topic, name, msg))

    def write_bag(self, out: Path) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        from ..ros.stamps import stamp_to_sec

        ts = typestore(with_spanvla_msgs=True)
        with Writer(out, version=9, storage_plugin=StoragePlugin.MCAP) as w:
            conns = {}
            for _, topic, name, msg in self.records:
                if topic not in conns:
                    conns[topic] = w.add_connection(topic, name, typestore=ts)
                # header stamps are the input (sensor) times: recording at them keeps the bag on the input clock
                w.write(conns[topic], int(stamp_to_sec(msg.header.stamp) * 1e9), self._ser(msg))


def parse_remaps(items) -> dict[str, str]:
    """``FROM:=TO`` pairs (the ros2 bag play --remap form): bag topic FROM is published as TO."""
    out = {}
    for item in items or ():
        src, sep, dst = item.partition(":=")
        if not sep or not src.startswith("/") or not dst.startswith("/"):
            raise ValueError(f"remap {item!r}: expected /bag/topic:=/planner/topic")
        out[src] = dst
    return out


def planner_inputs(pp: dict) -> dict[str, str]:
    """The planner's input topics on the wire (config.node_params("topics")) -> what each is: camera (raw and
    /compressed), odometry, ..."""
    topics = {pp["odom_topic"]: "odometry", pp["command_topic"]: "command", pp["route_topic"]: "route",
              pp["stop_lines_topic"]: "stop_lines"}
    for t in pp["camera_topics"]:
        topics[t] = topics[t + "/compressed"] = "camera"
    return topics


def camera_names_of(target: dict[str, str], params_file: Path) -> dict[str, str]:
    """Bag topic -> the planner's camera name, for the bag topics ``target`` sends to a camera input (raw or
    /compressed)."""
    from ..config import node_params
    from ..ros.topics import COMPRESSED

    wire = dict(zip(node_params("topics", params_file)["camera_topics"],
                    node_params("spanvla_planner", params_file)["camera_names"]))
    return {bag_topic: wire[t.removesuffix(COMPRESSED)] for bag_topic, t in target.items()
            if t.removesuffix(COMPRESSED) in wire}


def replay(bag: Path, params_file: Path, out_dir: Path, rate: float = 1.0, checkpoint: str = "",
           settle_s: float = 3.0, remap: dict[str, str] | None = None, start_s: float = 0.0,
           duration_s: float | None = None, view: bool = True) -> dict:
    """Play ``bag`` into the planner node over DDS at ``rate`` x its recorded pace, streamed (memory does not
    grow with the bag), from ``start_s`` for ``duration_s`` (bag seconds). Topics are the planner's inputs from
    ``params_file``; ``remap`` maps the bag's names onto them. Latched topics (command, route, stop lines) are
    played whenever they were recorded, also before ``start_s``: they are state, not a stream."""
    import rclpy
    from builtin_interfaces.msg import Time
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
    from rclpy.serialization import deserialize_message
    from rosgraph_msgs.msg import Clock

    from ..config import node_params
    from ..nodes.planner import PlannerNode
    from ..ros.recorder import rclpy_type
    from ..ros.topics import default_planner_remaps, remap_arguments

    remap = remap or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    pp = node_params("topics", params_file)
    inputs = planner_inputs(pp)
    stream = BagStream(bag)
    kinds = {topic: typ for topic, typ in stream.connections().items() if remap.get(topic, topic) in inputs}
    target = {topic: remap.get(topic, topic) for topic in kinds}   # the planner's name for each bag topic
    if not any(inputs[t] == "camera" for t in target.values()) or pp["odom_topic"] not in target.values():
        raise BagError(f"nothing replayable in {bag}: the bag has none of the planner's camera topics or no "
                       f"{pp['odom_topic']} (topics from {params_file}; bag topics: "
                       f"{sorted(stream.connections())}; map others with --remap FROM:=TO)")
    stream.topics = set(kinds)
    for topic, typ in kinds.items():   # compressed frames go where image_transport puts them: <topic>/compressed
        if inputs[target[topic]] == "camera" and typ.endswith("CompressedImage") \
                and not target[topic].endswith("/compressed"):
            target[topic] += "/compressed"
    compressed = any(typ.endswith("CompressedImage") for topic, typ in kinds.items()
                     if inputs[target[topic]] == "camera")
    # the planner runs on the bag's time (/clock from the player): staleness means what it meant on the car
    overrides = ["-p", f"spanvla_planner:image_transport:={'compressed' if compressed else 'raw'}",
                 "-p", "spanvla_planner:use_sim_time:=true"]
    if checkpoint:
        overrides += ["-p", f"spanvla_planner:checkpoint:={checkpoint}"]
    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=["spanvla_replay", "--ros-args", "--params-file", str(params_file)] + overrides
               + remap_arguments(default_planner_remaps(params_file)))
    planner = PlannerNode(context=ctx)
    player = rclpy.create_node("spanvla_bag_player", context=ctx)
    pubs, types = {}, {}
    for topic, typ in kinds.items():
        if typ in REPLAY_TYPES:
            qos = (qos_profile_sensor_data if "Image" in typ else
                   QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL) if typ in LATCHED_TYPES else 20)
            pubs[topic], types[topic] = player.create_publisher(rclpy_type(typ), target[topic], qos), rclpy_type(typ)
    clock_pub = player.create_publisher(Clock, "/clock", 10)
    recorder = PlanRecorder(player, pp)
    executors = []
    for n in (planner, player):
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(n)
        executors.append(ex)
    threads = [threading.Thread(target=ex.spin, daemon=True) for ex in executors]
    for t in threads:
        t.start()
    # wait for discovery between the player's publishers and the planner's subscriptions (no fixed sleep)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(p.get_subscription_count() == 0 for p in pubs.values()):
        time.sleep(0.05)
    odom: list[tuple[float, float, float, float, float]] = []
    published, t_first, t_wall0, last_clock = 0, None, None, -1
    for t_ns, topic, typ, raw in stream:
        if topic not in pubs:
            continue
        t_first = t_ns if t_first is None else t_first
        t_rel = (t_ns - t_first) * 1e-9 - start_s
        if duration_s is not None and t_rel > duration_s:
            break
        if t_rel < 0 and typ not in LATCHED_TYPES:
            continue
        if t_wall0 is None or t_rel < 0:
            t_wall0 = time.monotonic() - max(t_rel, 0.0) / rate
        delay = t_wall0 + max(t_rel, 0.0) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        msg = deserialize_message(raw, types[topic])
        if t_ns > last_clock:
            last_clock = t_ns
            clock_pub.publish(Clock(clock=Time(sec=t_ns // 1_000_000_000, nanosec=t_ns % 1_000_000_000)))
        pubs[topic].publish(msg)
        published += 1
        if inputs[target[topic]] == "odometry":
            odom.append(odometry_row(msg))
    time.sleep(settle_s)
    counters = dict(planner.counters)
    for ex in executors:
        ex.shutdown()
    for t in threads:
        t.join(timeout=10.0)
    planner.destroy_node()
    player.destroy_node()
    rclpy.shutdown(context=ctx)
    out_bag = out_dir / "plans"
    if out_bag.exists():
        import shutil
        shutil.rmtree(out_bag)
    recorder.write_bag(out_bag)
    report = evaluate(bag, np.array(odom).reshape(-1, 5), recorder.records, out_dir)
    report.update(bag=str(bag), replayed_messages=published, read_error=stream.error,
                  partial=stream.error is not None, planner_counters=counters, output_bag=str(out_bag),
                  topics=target)
    if recorder.records and view:
        from .run_view import read_run, render_strip
        # keyframes from the plans, then only the frames they show are kept from the input bag
        report["run_view"] = str(render_strip(read_run([bag, out_bag], keyframes_from=out_bag,
                                                       camera_topics=camera_names_of(target, params_file)),
                                              out_dir / "run_view.png", title=bag.name))
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def _interp_pose(odom: np.ndarray, t: float):
    ts = odom[:, 0]
    if t < ts[0] - 1e-3 or t > ts[-1] + 1e-3:
        return None
    yaw = np.unwrap(odom[:, 3])
    return np.array([np.interp(t, ts, odom[:, 1]), np.interp(t, ts, odom[:, 2]), np.interp(t, ts, yaw),
                     np.interp(t, ts, odom[:, 4])])


def _plan_poses(msg) -> tuple[np.ndarray, np.ndarray]:
    """(H, 3) x, y, heading of a Path's poses and (H,) the times they are for."""
    from ..ros.stamps import stamp_to_sec

    xyh = np.array([(p.pose.position.x, p.pose.position.y, yaw_from_quat(p.pose.orientation)) for p in msg.poses])
    t0 = stamp_to_sec(msg.header.stamp)
    times = np.array([stamp_to_sec(p.header.stamp) for p in msg.poses])
    if np.allclose(times, t0):   # poses all carry the Path's stamp (recorded before per-pose stamps): the model's step
        times = t0 + SpanVLAConfig.dt * np.arange(1, len(xyh) + 1)
    return xyh, times


def evaluate(bag: Path, odom: np.ndarray, records, out_dir: Path) -> dict:
    """Each recorded plan against the logged drive ``odom`` (t, x, y, yaw, speed; the bag's odometry as replayed):
    eval.plan_metrics for any bag, plus plan-to-plan consistency, plus the PDM-style scores where the scene is
    known (episodes generated here carry their scenario and seed in the bag name)."""
    from ..geometry import to_ego, to_world
    from ..ros.stamps import stamp_to_sec

    log, partial = EpisodeLog(odom=odom[np.argsort(odom[:, 0])] if len(odom) else odom), None
    scene, scenario = None, None
    m = re.match(r"(.+)_(\d{5})_(expert|recovery)$", Path(bag).name)
    if m:
        from ..sim.highway_backend import HighwayEnvBackend
        try:
            known = read_episode(bag, cameras=())   # agents, lights, route: no images
        except BagError as exc:
            known, partial = exc.partial, str(exc)
        log.agents, log.light, log.route = known.agents, known.light, known.route
        b = HighwayEnvBackend(render=False)
        b.reset(m.group(1), int(m.group(2)))
        scene, scenario = b.scene_map(), m.group(1)
    rows: list[dict] = []
    plans_xy: list[tuple[float, np.ndarray]] = []
    prev = None
    for _, _topic, name, msg in records:
        if name != "nav_msgs/msg/Path" or len(msg.poses) == 0:
            continue
        t = stamp_to_sec(msg.header.stamp)
        plan, times = _plan_poses(msg)
        dt = float(times[0] - t)
        pose0 = _interp_pose(log.odom, t) if len(log.odom) else None
        fut = [_interp_pose(log.odom, tk) for tk in times] if pose0 is not None else [None]
        if pose0 is None or any(f is None for f in fut):
            continue   # no logged future this far: the end of the bag
        truth = to_ego(pose0, np.array(fut))
        row = dict(t=t, **plan_vs_log(plan, truth[:, :3], dt))
        if scene is not None:
            speed = np.r_[np.hypot(plan[0, 0], plan[0, 1]), np.hypot(*np.diff(plan[:, :2], axis=0).T)] / dt
            plan_world = to_world(pose0, np.c_[plan, speed])
            agents, sizes = _agents_future(log, t, len(plan), dt)
            lights = {k * dt: _light_at(log, t + dt * k) for k in range(len(plan) + 1)} if log.light else {}
            ref = float(scene.route.project(_pt(fut[-1])) - scene.route.project(_pt(pose0)))
            r = score(plan_world, pose0, agents, scene, dt, ref, lights, prev_plan=prev, prev_shift=0,
                      agent_sizes=sizes)
            prev = plan_world
            row.update(r.as_dict())
        world_xy = to_world(pose0, plan)[:, :2]
        if plans_xy:   # how far this plan moved from the previous one where their horizons overlap
            d = plan_displacement(plans_xy[-1], (t, world_xy), dt)
            if d is not None:
                row["plan_consistency_m"] = d
        rows.append(row)
        plans_xy.append((t, world_xy))
    report = dict(plans=len(rows), scenario=scenario, bag_read_error=partial)
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "t"))
        report["mean"] = {k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys}
    _plot(log, plans_xy, rows, out_dir / "replay.png")
    report["plot"] = str(out_dir / "replay.png")
    return report


def _pt(p):
    from shapely.geometry import Point
    return Point(float(p[0]), float(p[1]))


def _agents_future(log, t, n, dt):
    """The bag's logged agents nearest each of the plan's times (agents logged with every simulator step)."""
    from ..sim.agents import agent_futures

    if not log.agents:
        return agent_futures([[] for _ in range(n + 1)])
    times = np.array([a[0] for a in log.agents])
    return agent_futures([log.agents[int(np.argmin(np.abs(times - (t + dt * k))))][1] for k in range(n + 1)])


def _light_at(log, t):
    times = np.array([x[0] for x in log.light])
    return log.light[int(np.argmin(np.abs(times - t)))][1]


def _plot(log, plans_xy, rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    if log.route is not None:
        ax1.plot(log.route[:, 0], log.route[:, 1], color="0.8", lw=6, label="route")
    if len(log.odom):
        ax1.plot(log.odom[:, 1], log.odom[:, 2], "k-", lw=1.5, label="logged ego")
    for i, (_, xy) in enumerate(plans_xy[::10]):
        ax1.plot(xy[:, 0], xy[:, 1], "-", color="tab:orange", alpha=0.7, label="plans" if i == 0 else None)
    ax1.set_aspect("equal", adjustable="datalim")
    ax1.legend(loc="best")
    ax1.set_title("plans vs logged trajectory (every 10th plan)")
    if rows:
        t0 = rows[0]["t"]
        ax2.plot([r["t"] - t0 for r in rows], [r["ade"] for r in rows], label="ADE")
        ax2.plot([r["t"] - t0 for r in rows], [r["fde"] for r in rows], label="FDE")
        if "PDMS" in rows[0]:
            ax2.plot([r["t"] - t0 for r in rows], [r["PDMS"] * 10 for r in rows], label="PDMS x10")
        ax2.set_xlabel("bag time (s)")
        ax2.set_ylabel("m")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    from ..config import default_params_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bag", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--params-file", type=Path, default=None)
    ap.add_argument("--rate", type=float, default=1.0, help="replay speed factor")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--remap", nargs="*", default=[], metavar="FROM:=TO",
                    help="publish bag topic FROM as TO (the planner's input names come from --params-file)")
    ap.add_argument("--start", type=float, default=0.0, help="bag seconds to skip (latched topics still play)")
    ap.add_argument("--duration", type=float, default=None, help="bag seconds to play from --start")
    ap.add_argument("--no-view", action="store_true", help="skip the run view (keyframe strip)")
    a = ap.parse_args(argv)
    out = a.out or Path("replay_out") / a.bag.name
    try:
        rep = replay(a.bag, a.params_file or default_params_path(), out, a.rate, a.checkpoint,
                     remap=parse_remaps(a.remap), start_s=a.start, duration_s=a.duration, view=not a.no_view)
    except (BagError, ValueError) as exc:
        print(f"[spanvla-replay] {exc}", file=sys.stderr)
        return 2
    print(f"[spanvla-replay] {rep['bag']}: replayed {rep['replayed_messages']} messages, {rep['plans']} plans scored"
          + (f" (PARTIAL: {rep['read_error']})" if rep["partial"] else ""))
    if "mean" in rep:
        print("| " + " | ".join(rep["mean"]) + " |")
        print("|" + "---|" * len(rep["mean"]))
        print("| " + " | ".join(f"{v:.3f}" for v in rep["mean"].values()) + " |")
    print(f"[spanvla-replay] plans bag {rep['output_bag']}, plot {rep['plot']}, run view {rep.get('run_view')}, "
          f"report {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
