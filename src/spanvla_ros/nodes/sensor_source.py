"""sensor_source: a stand-in for the simulator bridge so the node graph runs on its own. It drives the ego
along a straight road at a fixed speed and renders three simple camera views of that road (lane markings
moving with the ego); frames are synthetic and carry no scene semantics."""
from __future__ import annotations

import numpy as np
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from spanvla_ros.ros.images import encode_image_msg


def render_road(width: int, height: int, travelled: float, yaw_offset: float) -> np.ndarray:
    """Pinhole view of a flat straight 3-lane road from 1.5 m height, camera yawed by yaw_offset (rad)."""
    img = np.empty((height, width, 3), np.uint8)
    horizon = height // 2
    img[:horizon] = (135, 170, 210)
    img[horizon:] = (70, 110, 60)
    f = width / 2.0
    v = np.arange(horizon + 1, height)[:, None]
    z = 1.5 * f / (v - horizon)                       # ground distance for each row
    u = np.arange(width)[None, :]
    ang = np.arctan((u - width / 2) / f) + yaw_offset  # ray bearing
    x_lat = z * np.tan(ang)                            # lateral offset on the ground (left < 0)
    ground = img[horizon + 1:]
    road = np.abs(x_lat) < 5.25
    ground[road] = (90, 90, 90)
    for edge in (-5.25, -1.75, 1.75, 5.25):
        dashed = edge in (-1.75, 1.75)
        on = np.abs(x_lat - edge) < 0.08
        if dashed:
            on &= ((z + travelled) % 9.0) < 3.0
        ground[on] = (240, 240, 240)
    return img


class SensorSourceNode(Node):
    def __init__(self, name: str = "sensor_source"):
        super().__init__(name)
        d = dict(rate_hz=10.0, width=224, height=112, speed_mps=8.0,
                 camera_names=["front", "front_left", "front_right"],
                 camera_topics=["/carla/ego_vehicle/rgb_front/image", "/carla/ego_vehicle/rgb_front_left/image",
                                "/carla/ego_vehicle/rgb_front_right/image"],
                 odom_topic="/carla/ego_vehicle/odometry")
        self.p = {k: self.declare_parameter(k, v).value for k, v in d.items()}
        self.cam_pubs = [self.create_publisher(Image, t, qos_profile_sensor_data) for t in self.p["camera_topics"]]
        self.odom_pub = self.create_publisher(Odometry, self.p["odom_topic"], 20)
        self.yaws = {"front": 0.0, "front_left": -0.96, "front_right": 0.96}
        self.t0 = self.get_clock().now()
        self.frames_published = 0
        self.create_timer(1.0 / self.p["rate_hz"], self._tick)

    def _tick(self) -> None:
        now = self.get_clock().now()
        t = (now - self.t0).nanoseconds * 1e-9
        x = self.p["speed_mps"] * t
        stamp = now.to_msg()
        odom = Odometry()
        odom.header.stamp, odom.header.frame_id, odom.child_frame_id = stamp, "map", "base_link"
        odom.pose.pose.position.x = x
        odom.pose.pose.orientation.w = 1.0
        odom.twist.twist.linear.x = self.p["speed_mps"]
        self.odom_pub.publish(odom)
        for name, pub in zip(self.p["camera_names"], self.cam_pubs):
            img = render_road(self.p["width"], self.p["height"], x, self.yaws.get(name, 0.0))
            pub.publish(encode_image_msg(img, stamp, f"{name}_camera"))
        self.frames_published += 1
