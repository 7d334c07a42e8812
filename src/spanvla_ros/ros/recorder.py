"""A rosbag2 MCAP recorder inside the drive process (`ros2 bag` has no wheel here): raw (CDR) subscriptions,
written byte for byte through `rosbags` at their receive time, like `ros2 bag record`. The bag opens in
Foxglove Studio and replays with `spanvla-replay` or `ros2 bag play`."""
from __future__ import annotations

import importlib
import threading
import time
from pathlib import Path

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data

from ..data.bag_io import typestore


def rclpy_type(name: str):
    """'pkg/msg/Type' -> the rclpy message class."""
    pkg, _, cls = name.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), cls)


class BagRecorderNode(Node):
    """topics: [(topic, "pkg/msg/Type", qos)] with qos one of "sensor", "latched", "default"."""

    def __init__(self, out: Path, topics, name: str = "spanvla_recorder", **node_kw):
        from rosbags.rosbag2 import StoragePlugin, Writer

        super().__init__(name, **node_kw)
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._ts = typestore(with_spanvla_msgs=True)
        self._writer = Writer(self.out, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._lock = threading.Lock()
        self._conns = {}
        self.counts: dict[str, int] = {}
        self.bytes = 0
        self._closed = False
        qos = dict(sensor=qos_profile_sensor_data, default=QoSProfile(depth=50),
                   latched=QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        for topic, typename, q in topics:
            self._conns[topic] = self._writer.add_connection(topic, typename, typestore=self._ts)
            self.counts[topic] = 0
            self.create_subscription(rclpy_type(typename), topic, lambda raw, t=topic: self._on(t, raw), qos[q],
                                     raw=True)

    def _on(self, topic: str, raw: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            self._writer.write(self._conns[topic], time.time_ns(), raw)
            self.counts[topic] += 1
            self.bytes += len(raw)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._writer.close()


def drive_topics(wire: dict, sim: dict | None) -> list[tuple[str, str, str]]:
    """What a drive run records: inputs (cameras, odometry, command, route and its stop lines, and the simulator's
    agents when it runs) and the planner's outputs, by their names on the wire (config.node_params("topics"))."""
    topics = [(t, "sensor_msgs/msg/Image", "sensor") for t in wire["camera_topics"]]
    topics += [(wire["odom_topic"], "nav_msgs/msg/Odometry", "default"),
               (wire["command_topic"], "std_msgs/msg/String", "latched"),
               (wire["route_topic"], "nav_msgs/msg/Path", "latched"),
               (wire["stop_lines_topic"], "nav_msgs/msg/Path", "latched"),
               (wire["path_topic"], "nav_msgs/msg/Path", "default"),
               (wire["reasoning_topic"], "spanvla_ros/msg/Reasoning", "default"),
               (wire["status_topic"], "spanvla_ros/msg/PlanStatus", "default"),
               (wire["markers_topic"], "visualization_msgs/msg/MarkerArray", "default")]
    if sim is not None:
        topics += [(sim["agents_topic"], "visualization_msgs/msg/MarkerArray", "default")]
    return topics
