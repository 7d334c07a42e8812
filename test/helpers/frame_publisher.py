"""Child process for the cross-process DDS test: publishes N frame sets of 3 cameras at a fixed rate,
plus Reasoning and PlanStatus messages, each frame filled with a pattern derived from (camera, index)
so the receiver can check every byte. Starts publishing only after the subscriber has matched."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import rclpy
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from spanvla_ros.msg import PlanStatus, Reasoning
from spanvla_ros.ros.images import encode_image_msg
from spanvla_ros.ros.stamps import sec_to_stamp

CAMERAS = ("front", "front_left", "front_right")


def frame_pattern(cam: int, idx: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * cam + idx)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--match-timeout", type=float, default=20.0)
    a = ap.parse_args()

    rclpy.init()
    node = rclpy.create_node("frame_publisher")
    qos = QoSProfile(depth=a.frames, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
    pubs = [node.create_publisher(Image, f"/test/{c}/image", qos) for c in CAMERAS]
    pub_r = node.create_publisher(Reasoning, "/test/reasoning", qos)
    pub_s = node.create_publisher(PlanStatus, "/test/plan_status", qos)
    everyone = pubs + [pub_r, pub_s]
    deadline = time.monotonic() + a.match_timeout
    while any(p.get_subscription_count() == 0 for p in everyone):
        if time.monotonic() > deadline:
            print("no subscriber matched", file=sys.stderr)
            return 2
        rclpy.spin_once(node, timeout_sec=0.02)
    # Pre-render so the publishing loop measures transport, not numpy.
    frames = [[frame_pattern(c, i, a.height, a.width) for c in range(3)] for i in range(a.frames)]
    period = 1.0 / a.rate
    t0 = time.monotonic()
    for i in range(a.frames):
        stamp = sec_to_stamp(1000.0 + i * period)
        for c, pub in enumerate(pubs):
            pub.publish(encode_image_msg(frames[i][c], stamp, f"{CAMERAS[c]}_camera"))
        r = Reasoning()
        r.header.stamp = stamp
        r.header.frame_id = "base_link"
        r.text = f"frame {i}: lead vehicle slowing, keep distance"
        r.generation_latency = 0.25
        r.num_tokens = 12
        r.model_id = "test"
        pub_r.publish(r)
        s = PlanStatus()
        s.header.stamp = stamp
        s.flow_steps = 5
        s.degraded = i % 2 == 1
        s.degraded_reason = "bridge stale" if s.degraded else ""
        s.plans_published = i + 1
        pub_s.publish(s)
        sleep = t0 + (i + 1) * period - time.monotonic()
        if sleep > 0:
            time.sleep(sleep)
    # Reliable delivery of the tail: wait until every subscriber acknowledged, bounded.
    for p in everyone:
        p.wait_for_all_acked(rclpy.duration.Duration(seconds=10.0))
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
