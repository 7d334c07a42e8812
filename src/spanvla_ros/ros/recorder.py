"""A rosbag2 MCAP recorder inside the drive process (`ros2 bag` has no wheel here): raw (CDR) subscriptions,
written byte for byte through `rosbags` at their receive time, like `ros2 bag record`. The bag opens in
Foxglove Studio and replays with `spanvla-replay` or `ros2 bag play`."""
from __future__ import annotations

import importlib
import shutil
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
    """topics: [(topic, "pkg/msg/Type", qos)] with qos one of "sensor", "latched", "default".

    Like ``ros2 bag record`` with its storage options: raw camera frames are recorded JPEG-compressed on
    ``<topic>/compressed`` (sensor_msgs/CompressedImage, as image_transport names it; ~10x smaller) unless
    ``compress_images`` is off; the bag is split into parts of at most ``split_bytes`` / ``split_s`` (``out``, then
    ``out_001``, ``out_002``, ...: one rosbag2 each, ``parts`` lists them); and when the disk holding the bag has less
    than ``min_free_bytes`` left, recording stops with an error in the log (``stopped`` says why) while everything
    else goes on."""

    JPEG_QUALITY = 90
    DISK_CHECK_EVERY = 50            # messages between free-space checks

    def __init__(self, out: Path, topics, name: str = "spanvla_recorder", compress_images: bool = True,
                 split_bytes: int = 0, split_s: float = 0.0, min_free_bytes: int = 0, **node_kw):
        super().__init__(name, **node_kw)
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._ts = typestore(with_spanvla_msgs=True)
        self.compress_images = compress_images
        self.split_bytes, self.split_s, self.min_free_bytes = split_bytes, split_s, min_free_bytes
        self._lock = threading.Lock()
        self._topics: dict[str, tuple[str, str]] = {}       # subscribed topic -> (recorded topic, recorded type)
        self.counts: dict[str, int] = {}
        self.bytes = 0
        self.parts: list[Path] = []
        self.stopped = ""
        self._closed = False
        self._since_check = 0
        qos = dict(sensor=qos_profile_sensor_data, default=QoSProfile(depth=50),
                   latched=QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        for topic, typename, q in topics:
            if compress_images and typename == "sensor_msgs/msg/Image":
                self._topics[topic] = (topic + "/compressed", "sensor_msgs/msg/CompressedImage")
                self.create_subscription(rclpy_type(typename), topic, lambda m, t=topic: self._on_image(t, m), qos[q])
            else:
                self._topics[topic] = (topic, typename)
                self.create_subscription(rclpy_type(typename), topic, lambda raw, t=topic: self._on(t, raw), qos[q],
                                         raw=True)
            self.counts[topic] = 0
        self._open_part()

    def _open_part(self) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        path = self.out if not self.parts else self.out.with_name(f"{self.out.name}_{len(self.parts):03d}")
        self._writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._conns = {topic: self._writer.add_connection(name, typ, typestore=self._ts)
                       for topic, (name, typ) in self._topics.items()}
        self.parts.append(path)
        self._part_bytes, self._part_t0 = 0, time.monotonic()

    def _on_image(self, topic: str, msg) -> None:
        """A raw frame, recorded as JPEG (sensor_msgs/CompressedImage with the frame's header)."""
        import io

        from PIL import Image as PILImage
        from rclpy.serialization import serialize_message
        from sensor_msgs.msg import CompressedImage

        from .images import decode_rgb

        try:
            rgb = decode_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)
        except ValueError:
            return                      # the planner counts bad frames; the recording just skips them
        buf = io.BytesIO()
        PILImage.fromarray(rgb).save(buf, format="JPEG", quality=self.JPEG_QUALITY)
        out = CompressedImage(header=msg.header, format="rgb8; jpeg compressed bgr8", data=buf.getvalue())
        self._on(topic, serialize_message(out))

    def _on(self, topic: str, raw: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            self._since_check += 1
            if self.min_free_bytes and self._since_check >= self.DISK_CHECK_EVERY:
                self._since_check = 0
                free = shutil.disk_usage(self.out.parent).free
                if free < self.min_free_bytes:
                    self.stopped = (f"recording stopped: {free / 1e6:.0f} MB free on the disk of {self.out.parent} "
                                    f"(< {self.min_free_bytes / 1e6:.0f} MB); driving goes on")
                    self.get_logger().error(self.stopped)
                    self._close_locked()
                    return
            if (self.split_bytes and self._part_bytes >= self.split_bytes) or \
                    (self.split_s and time.monotonic() - self._part_t0 >= self.split_s):
                self._writer.close()
                self._open_part()
            self._writer.write(self._conns[topic], time.time_ns(), raw)
            self.counts[topic] += 1
            self.bytes += len(raw)
            self._part_bytes += len(raw)

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()

    def close(self) -> None:
        with self._lock:
            self._close_locked()


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
