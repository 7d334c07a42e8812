"""Two processes exchange 3 cameras of rgb8 at 10 Hz plus the custom messages over real Fast DDS (loopback), with the
shipped DDS profile: 640x360, and 1920x1080 (6.2 MB a frame, bigger than one transport message)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_msgs, requires_ros

pytestmark = [requires_ros, requires_msgs, pytest.mark.dds]
HERE = Path(__file__).parent


@pytest.mark.parametrize("width,height,frames", [(640, 360, 30), pytest.param(1920, 1080, 20, marks=pytest.mark.slow)])
def test_images_and_custom_msgs_arrive_intact(subprocess_env, width, height, frames):
    import numpy as np
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from helpers.frame_publisher import CAMERAS, frame_pattern
    from helpers.ros_wait import spin_until
    from spanvla_ros.msg import PlanStatus, Reasoning
    from spanvla_ros.ros.images import decode_image_msg
    from spanvla_ros.ros.stamps import stamp_to_sec

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("frame_receiver", context=context)
    ex = SingleThreadedExecutor(context=context)
    ex.add_node(node)
    qos = QoSProfile(depth=frames, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
    got = {c: [] for c in CAMERAS}
    reasoning, status = [], []
    for c in CAMERAS:
        node.create_subscription(Image, f"/test/{c}/image", lambda m, c=c: got[c].append(m), qos)
    node.create_subscription(Reasoning, "/test/reasoning", reasoning.append, qos)
    node.create_subscription(PlanStatus, "/test/plan_status", status.append, qos)

    proc = subprocess.Popen([sys.executable, str(HERE / "helpers" / "frame_publisher.py"), "--frames", str(frames),
                             "--width", str(width), "--height", str(height)],
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        done = spin_until(ex, lambda: all(len(v) == frames for v in got.values())
                          and len(reasoning) == frames and len(status) == frames, timeout=60.0)
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
    assert proc.returncode == 0, out
    assert done, {c: len(v) for c, v in got.items()} | {"reasoning": len(reasoning), "status": len(status)}

    for ci, c in enumerate(CAMERAS):
        for i, msg in enumerate(got[c]):
            assert (msg.width, msg.height, msg.encoding, msg.header.frame_id) == (width, height, "rgb8", f"{c}_camera")
            assert stamp_to_sec(msg.header.stamp) == pytest.approx(1000.0 + i * 0.1, abs=1e-6)
            sent = frame_pattern(ci, i, height, width)
            assert np.array_equal(decode_image_msg(msg), sent), f"{c} frame {i} corrupted"
    assert [r.text for r in reasoning] == [f"frame {i}: lead vehicle slowing, keep distance" for i in range(frames)]
    assert all(abs(r.generation_latency - 0.25) < 1e-6 and r.num_tokens == 12 for r in reasoning)
    assert [s.degraded for s in status] == [i % 2 == 1 for i in range(frames)]
    assert [s.plans_published for s in status] == list(range(1, frames + 1))
