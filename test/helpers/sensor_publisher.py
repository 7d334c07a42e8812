"""Child process for the planner DDS tests: plays the planner's inputs with wall-clock stamps on a 20 Hz grid
(odometry every tick, 3 cameras every 2nd tick), in phases:

  good      cameras + odometry; every 10th camera tick the front camera also gets garbage (an unsupported
            encoding, then a payload of the wrong length). The route (latched, straight ahead along the
            odometry's x) is first published in a frame the odometry is not in, then after --route-fix s in "map";
            its stop lines (latched) first as a corrupt message (a NaN point), then with the route as one line 60 m on
  odom_only cameras stop, odometry goes on (the planner's bridge goes stale)
  then it stops publishing altogether (odometry goes stale) and prints one JSON line of what it sent."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import rclpy
from nav_msgs.msg import Odometry, Path
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image

from spanvla_ros.ros.images import encode_image_msg
from spanvla_ros.ros.messages import xy_path_msg
from spanvla_ros.ros.stamps import sec_to_stamp

TOPICS = ("/carla/ego_vehicle/rgb_front/image", "/carla/ego_vehicle/rgb_front_left/image",
          "/carla/ego_vehicle/rgb_front_right/image")
PERIOD = 0.05


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--good", type=float, default=8.0)
    ap.add_argument("--odom-only", type=float, default=4.0)
    ap.add_argument("--speed", type=float, default=8.0)
    ap.add_argument("--route-fix", type=float, default=4.0)
    a = ap.parse_args()
    rclpy.init()
    node = rclpy.create_node("sensor_publisher")
    cams = [node.create_publisher(Image, t, qos_profile_sensor_data) for t in TOPICS]
    odom_pub = node.create_publisher(Odometry, "/carla/ego_vehicle/odometry", 20)
    route_pub = node.create_publisher(Path, "/carla/ego_vehicle/route",
                                      QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))

    def route(frame):
        return xy_path_msg(np.stack([np.arange(-10.0, 400.0, 2.0), np.zeros(205)], 1), frame)
    stop_pub = node.create_publisher(Path, "/carla/ego_vehicle/stop_lines",
                                     QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    route_pub.publish(route("odom"))
    stop_pub.publish(xy_path_msg([(math.nan, 0.0)], "map"))
    deadline = time.monotonic() + 30
    while any(p.get_subscription_count() == 0 for p in cams + [odom_pub]) and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (112, 196, 3), dtype=np.uint8) for _ in range(3)]
    t0 = math.floor(time.time()) + 1.0
    time.sleep(max(0.0, t0 - time.time()))
    garbage = 1   # the NaN stop line
    k = 0
    out = dict(t0=t0, period=PERIOD, cam_every=2, route_fix=t0 + round(a.route_fix / PERIOD) * PERIOD)
    while True:
        t = t0 + k * PERIOD
        phase_t = t - t0
        if phase_t >= a.good + a.odom_only:
            break
        stamp = sec_to_stamp(t)
        if k == round(a.route_fix / PERIOD):
            out["route_fix_sent"] = time.time()
            route_pub.publish(route("map"))
            stop_pub.publish(xy_path_msg([(60.0, 0.0)], "map"))
        if phase_t < a.good and k % 2 == 0:
            for i, p in enumerate(cams):
                p.publish(encode_image_msg(frames[i], stamp, "camera"))
            if k % 20 == 0:
                bad = encode_image_msg(frames[0], stamp, "camera")
                bad.encoding = "32FC1"
                cams[0].publish(bad)
                short = encode_image_msg(frames[0], stamp, "camera")
                short.data = bytes(100)
                cams[0].publish(short)
                garbage += 2
        od = Odometry()
        od.header.stamp, od.header.frame_id, od.child_frame_id = stamp, "map", "base_link"
        od.pose.pose.position.x = a.speed * phase_t
        od.pose.pose.orientation.w = 1.0
        od.twist.twist.linear.x = a.speed
        odom_pub.publish(od)
        k += 1
        time.sleep(max(0.0, t0 + k * PERIOD - time.time()))
    out.update(garbage_sent=garbage, cameras_stop=t0 + a.good, odom_stop=time.time(), ticks=k)
    print(json.dumps(out), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
