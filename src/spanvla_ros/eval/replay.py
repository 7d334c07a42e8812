"""spanvla-replay: rosbag replay evaluation through the real nodes over real DDS.

The bag's camera and odometry messages are republished byte-for-byte (their CDR payloads) at the recorded
pace; spanvla_planner runs in this process as it does on the car; a recorder node writes every Path,
Reasoning and PlanStatus it publishes into a new bag (MCAP). Then each plan is compared with the logged
future: open-loop ADE/FDE, and PDM-style scores where the scene is known (episodes generated here carry
their scenario and seed in the bag name). Output: a table on stdout, results.json and a plot.

A corrupt or truncated bag is replayed as far as it reads; the report says so and covers what was replayed.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..data.bag_io import (AGENTS_TOPIC, CAMERA_TOPIC, LIGHT_TOPIC, ODOM_TOPIC, ROUTE_TOPIC, STOP_LINES_TOPIC, BagError, read_episode,
                           typestore)
from ..model.config import CAMERAS
from .closed_loop import plan_displacement
from .pdm import ade_fde, score

REPLAY_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "nav_msgs/msg/Odometry",
                "std_msgs/msg/String", "nav_msgs/msg/Path")
LATCHED_TYPES = ("std_msgs/msg/String", "nav_msgs/msg/Path")   # command, route, stop lines: subscribed latched


def read_raw(bag: Path, topics: set[str]):
    """(messages [(t_ns, topic, msgtype, cdr bytes)], error or None). Stops at the first unreadable record."""
    from rosbags.highlevel import AnyReader

    msgs, err = [], None
    try:
        with AnyReader([Path(bag)], default_typestore=typestore()) as reader:
            conns = [c for c in reader.connections if c.topic in topics]
            for conn, t, raw in reader.messages(connections=conns):
                msgs.append((t, conn.topic, conn.msgtype, bytes(raw)))
    except Exception as exc:  # corrupt or truncated bag: keep what was read
        err = f"{type(exc).__name__}: {exc}"
        if not msgs:
            for f in sorted(Path(bag).glob("*.mcap")):
                msgs.extend(scan_mcap_records(f.read_bytes(), topics))
    return msgs, err


def scan_mcap_records(buf: bytes, topics: set[str]):
    """Message records of an MCAP file read front to back, up to the first broken record. rosbags needs the
    summary at the end of the file, which a recording cut short (crash, full disk) does not have."""
    import struct

    out, channels, schemas = [], {}, {}

    def string(b, o):
        n = struct.unpack_from("<I", b, o)[0]
        return b[o + 4:o + 4 + n].decode(), o + 4 + n

    def records(b, o, end):
        while o + 9 <= end:
            op, ln = struct.unpack_from("<BQ", b, o)
            body, o = o + 9, o + 9 + ln
            if o > end:
                return
            if op == 0x03:      # Schema
                sid = struct.unpack_from("<H", b, body)[0]
                schemas[sid], _ = string(b, body + 2)
            elif op == 0x04:    # Channel
                cid, sid = struct.unpack_from("<HH", b, body)
                topic, _ = string(b, body + 4)
                channels[cid] = (topic, schemas.get(sid, ""))
            elif op == 0x05:    # Message
                cid, _, log_time = struct.unpack_from("<HIQ", b, body)
                topic, typ = channels.get(cid, ("", ""))
                if topic in topics:
                    out.append((log_time, topic, typ, bytes(b[body + 22:o])))
            elif op == 0x06:    # Chunk (only uncompressed chunks can be read without a codec)
                comp, p = string(b, body + 28)
                n = struct.unpack_from("<Q", b, p)[0]
                if comp == "":
                    records(b, p + 8, min(p + 8 + n, o))

    if buf[:8] == b"\x89MCAP0\r\n":
        try:
            records(buf, 8, len(buf))
        except (struct.error, UnicodeDecodeError):
            pass
    return sorted(out, key=lambda m: m[0])


class PlanRecorder:
    """Subscribes to the planner's outputs and keeps them (and their CDR bytes for the output bag)."""

    def __init__(self, node, planner_params: dict):
        from nav_msgs.msg import Path as PathMsg
        from rclpy.serialization import serialize_message

        from spanvla_ros.msg import PlanStatus, Reasoning

        self._ser = serialize_message
        self.records = []   # (receive ns, topic, typename, msg)
        self.lock = threading.Lock()
        for topic, typ, name in ((planner_params["path_topic"], PathMsg, "nav_msgs/msg/Path"),
                                 (planner_params["reasoning_topic"], Reasoning, "spanvla_ros/msg/Reasoning"),
                                 (planner_params["status_topic"], PlanStatus, "spanvla_ros/msg/PlanStatus")):
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


def replay(bag: Path, params_file: Path, out_dir: Path, rate: float = 1.0, checkpoint: str = "",
           settle_s: float = 3.0) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data

    from ..config import node_params
    from ..nodes.planner import PlannerNode
    from ..ros.recorder import rclpy_type

    out_dir.mkdir(parents=True, exist_ok=True)
    pp = node_params("spanvla_planner", params_file)
    topics = {ODOM_TOPIC} | {t for c in CAMERAS for t in (CAMERA_TOPIC.format(c), CAMERA_TOPIC.format(c) + "/compressed")}
    topics |= {pp.get("command_topic", "/spanvla/command"), pp.get("route_topic", ROUTE_TOPIC),
               pp.get("stop_lines_topic", STOP_LINES_TOPIC)}
    msgs, err = read_raw(bag, topics)
    if not msgs:
        raise BagError(f"nothing replayable in {bag}: {err or 'no camera/odometry topics'}")
    compressed = any(m[2].endswith("CompressedImage") for m in msgs)
    overrides = ["-p", f"spanvla_planner:image_transport:={'compressed' if compressed else 'raw'}"]
    if checkpoint:
        overrides += ["-p", f"spanvla_planner:checkpoint:={checkpoint}"]
    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=["spanvla_replay", "--ros-args", "--params-file", str(params_file)] + overrides)
    planner = PlannerNode(context=ctx)
    player = rclpy.create_node("spanvla_bag_player", context=ctx)
    pubs = {}
    for _, topic, typ, _ in msgs:
        if topic not in pubs and typ in REPLAY_TYPES:
            qos = (qos_profile_sensor_data if "Image" in typ else
                   QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL) if typ in LATCHED_TYPES else 20)
            pubs[topic] = player.create_publisher(rclpy_type(typ), topic, qos)
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
    t_bag0, t_wall0 = msgs[0][0], time.monotonic()
    from rclpy.serialization import deserialize_message
    published = 0
    for t_ns, topic, typ, raw in msgs:
        if topic not in pubs:
            continue
        target = t_wall0 + (t_ns - t_bag0) * 1e-9 / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pubs[topic].publish(deserialize_message(raw, rclpy_type(typ)))
        published += 1
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
    report = evaluate(bag, recorder.records, out_dir)
    report.update(bag=str(bag), replayed_messages=published, read_error=err, partial=err is not None,
                  planner_counters=counters, output_bag=str(out_bag))
    if recorder.records:
        from .run_view import read_run, render_strip
        # the view needs the input bag's cameras and the plans bag; a broken input bag contributes what it read
        report["run_view"] = str(render_strip(read_run([bag, out_bag]), out_dir / "run_view.png", title=bag.name))
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def _interp_pose(odom: np.ndarray, t: float):
    ts = odom[:, 0]
    if t < ts[0] - 1e-3 or t > ts[-1] + 1e-3:
        return None
    yaw = np.unwrap(odom[:, 3])
    return np.array([np.interp(t, ts, odom[:, 1]), np.interp(t, ts, odom[:, 2]), np.interp(t, ts, yaw),
                     np.interp(t, ts, odom[:, 4])])


def evaluate(bag: Path, records, out_dir: Path) -> dict:
    from transforms3d.euler import quat2euler

    from ..model.trajectory import to_ego, to_world
    from ..ros.stamps import stamp_to_sec

    try:
        log = read_episode(bag, CAMERAS)
        partial = None
    except BagError as exc:
        log, partial = exc.partial, str(exc)
    scene, scenario = None, None
    m = re.match(r"(.+)_(\d{5})_(expert|recovery)$", Path(bag).name)
    if m:
        from ..sim.highway_backend import HighwayEnvBackend
        b = HighwayEnvBackend(render=False)
        b.reset(m.group(1), int(m.group(2)))
        scene, scenario = b.scene_map(), m.group(1)
    rows, plans_xy = [], []
    prev = None
    for _, topic, name, msg in records:
        if name != "nav_msgs/msg/Path" or len(msg.poses) == 0:
            continue
        t = stamp_to_sec(msg.header.stamp)
        pose0 = _interp_pose(log.odom, t) if len(log.odom) else None
        fut = [_interp_pose(log.odom, t + 0.5 * (k + 1)) for k in range(len(msg.poses))] if pose0 is not None else [None]
        if pose0 is None or any(f is None for f in fut):
            continue   # no logged future this far: the end of the bag
        plan = np.array([(p.pose.position.x, p.pose.position.y,
                          quat2euler((p.pose.orientation.w, p.pose.orientation.x, p.pose.orientation.y,
                                      p.pose.orientation.z))[2]) for p in msg.poses])
        truth = to_ego(pose0, np.array(fut))
        ade, fde = ade_fde(plan[:, :2], truth[:, :2])
        row = dict(t=t, ade=ade, fde=fde)
        if scene is not None:
            speed = np.r_[np.hypot(plan[0, 0], plan[0, 1]), np.hypot(*np.diff(plan[:, :2], axis=0).T)] / 0.5
            plan_world = to_world(pose0, np.c_[plan, speed])
            agents, sizes = _agents_future(log, t, len(plan))
            lights = {k * 0.5: _light_at(log, t + 0.5 * k) for k in range(len(plan) + 1)} if log.light else {}
            ref = float(scene.route.project(_pt(fut[-1])) - scene.route.project(_pt(pose0)))
            r = score(plan_world, pose0, agents, scene, 0.5, ref, lights, prev_plan=prev, prev_shift=0,
                      agent_sizes=sizes)
            prev = plan_world
            row.update(r.as_dict())
        world_xy = to_world(pose0, plan)[:, :2]
        if plans_xy:   # how far this plan moved from the previous one where their horizons overlap
            d = plan_displacement(plans_xy[-1], (t, world_xy), 0.5)
            if d is not None:
                row["plan_consistency_m"] = d
        rows.append(row)
        plans_xy.append((t, world_xy))
    report = dict(plans=len(rows), scenario=scenario, bag_read_error=partial)
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "t"))
        report["mean"] = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    _plot(log, plans_xy, rows, out_dir / "replay.png")
    report["plot"] = str(out_dir / "replay.png")
    return report


def _pt(p):
    from shapely.geometry import Point
    return Point(float(p[0]), float(p[1]))


def _agents_future(log, t, n):
    times = np.array([a[0] for a in log.agents]) if log.agents else np.zeros(0)
    ids = sorted({aid for _, lst in log.agents for (aid, *_r) in lst})
    out = np.full((n + 1, len(ids), 4), 1e6)
    sizes = [(5.0, 2.0)] * len(ids)
    for k in range(n + 1):
        if not len(times):
            break
        i = int(np.argmin(np.abs(times - (t + 0.5 * k))))
        for aid, x, y, yaw, v, length, width in log.agents[i][1]:
            j = ids.index(aid)
            out[k, j] = (x, y, yaw, v)
            sizes[j] = (length, width)
    return out, sizes


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
    a = ap.parse_args(argv)
    out = a.out or Path("replay_out") / a.bag.name
    try:
        rep = replay(a.bag, a.params_file or default_params_path(), out, a.rate, a.checkpoint)
    except BagError as exc:
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
