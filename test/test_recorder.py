"""The drive recording, as `ros2 bag record` with storage options: camera frames JPEG-compressed by default, bags
split by size, recording stopped (and said so) when the disk runs low while the process goes on. The recorder's
message path is driven directly (no DDS needed: what arrives is what a subscription would hand it)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import requires_msgs, requires_ros

CAMERA = "/carla/ego_vehicle/rgb_front/image"
ODOM = "/carla/ego_vehicle/odometry"


def _frame(t: float):
    from spanvla_ros.ros.images import encode_image_msg
    from spanvla_ros.ros.stamps import sec_to_stamp

    rng = np.random.default_rng(int(t * 10))
    return encode_image_msg(rng.integers(0, 255, (112, 196, 3), dtype=np.uint8), sec_to_stamp(t), "front_camera")


def _odom(t: float) -> bytes:
    from nav_msgs.msg import Odometry
    from rclpy.serialization import serialize_message

    from spanvla_ros.ros.stamps import sec_to_stamp

    m = Odometry()
    m.header.stamp, m.header.frame_id = sec_to_stamp(t), "map"
    m.pose.pose.position.x = t
    return serialize_message(m)


@pytest.fixture
def ctx():
    import rclpy

    c = rclpy.Context()
    rclpy.init(context=c, args=[])
    yield c
    rclpy.shutdown(context=c)


@requires_ros
@requires_msgs
def test_frames_are_recorded_compressed_and_bags_split_by_size(tmp_path, ctx):
    from spanvla_ros.eval.run_view import read_run
    from spanvla_ros.ros.recorder import BagRecorderNode

    topics = [(CAMERA, "sensor_msgs/msg/Image", "sensor"), (ODOM, "nav_msgs/msg/Odometry", "default")]
    rec = BagRecorderNode(tmp_path / "bag", topics, context=ctx, split_bytes=60_000)
    raw_bytes = 0
    for k in range(20):
        frame = _frame(0.1 * k)
        raw_bytes += len(frame.data)
        rec._on_image(CAMERA, frame)
        rec._on(ODOM, _odom(0.1 * k))
    rec.close()
    rec.destroy_node()
    assert rec.counts[CAMERA] == 20 and rec.counts[ODOM] == 20
    assert rec.bytes < raw_bytes / 2                               # JPEG, not raw
    assert len(rec.parts) >= 2 and all(p.is_dir() for p in rec.parts)
    log = read_run(rec.parts, cameras=("front",))                   # every part reads back: frames and odometry
    assert len(log.images["front"]) == 20 and len(log.odom) == 20
    assert isinstance(log.images["front"][0][1], bytes)            # the compressed frame (decoded when drawn)


@requires_ros
@requires_msgs
def test_recording_stops_when_the_disk_runs_low(tmp_path, ctx):
    from spanvla_ros.ros.recorder import BagRecorderNode

    rec = BagRecorderNode(tmp_path / "bag", [(ODOM, "nav_msgs/msg/Odometry", "default")], context=ctx,
                          min_free_bytes=10 ** 18)                 # more than any disk has
    for k in range(3 * BagRecorderNode.DISK_CHECK_EVERY):
        rec._on(ODOM, _odom(0.05 * k))
    assert rec.stopped and rec.counts[ODOM] == BagRecorderNode.DISK_CHECK_EVERY - 1
    rec.close()                                                     # closing again is harmless
    rec.destroy_node()
