"""A rosbag2 this project did not write: its own topic names, camera resolution and encoding, a car driving a
straight empty road at constant speed (3 cameras at 10 Hz, odometry at 20 Hz), written with rosbags."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FOREIGN_CAMERAS = {"front": "/sensing/camera/front/image_raw", "front_left": "/sensing/camera/left/image_raw",
                   "front_right": "/sensing/camera/right/image_raw"}
FOREIGN_ODOM = "/localization/kinematic_state"


def _frame(width: int, height: int, shift: float) -> np.ndarray:
    """Sky over grey asphalt with lane marks that move with the car."""
    img = np.full((height, width, 3), (120, 120, 120), np.uint8)
    img[: height // 2] = (170, 200, 235)
    rows = np.arange(height // 2, height)
    for lane_x in (-0.35, 0.35):
        cols = (width / 2 + lane_x * width * (rows - height / 2) / (height / 2)).astype(int)
        on = ((rows + int(shift * 8)) // 12) % 2 == 0
        img[rows[on], np.clip(cols[on], 0, width - 1)] = 255
    return img


def _overcast_frame(width: int, height: int, shift: float) -> np.ndarray:
    """Another look: an overcast sky's gradient, dark asphalt, a soft horizon above the middle, a dashed centre
    line and two solid edges that widen towards the car, sensor noise."""
    rng = np.random.default_rng(int(shift * 10))
    horizon = int(height * 0.45)
    img = np.zeros((height, width, 3), np.float32)
    img[:horizon] = np.linspace(150, 205, horizon)[:, None, None] * np.array([1.0, 1.0, 1.02])
    img[horizon:] = np.linspace(95, 70, height - horizon)[:, None, None]
    img[horizon:horizon + 6] = 0.5 * img[horizon:horizon + 6] + 80.0
    rows = np.arange(horizon, height)
    depth = (rows - horizon) / (height - horizon)
    for lane_x, dashed in ((-0.45, False), (0.0, True), (0.45, False)):
        cols = (width / 2 + lane_x * width * depth).astype(int)
        on = ((rows + int(shift * 6)) // 16) % 2 == 0 if dashed else np.ones_like(rows, bool)
        for r, c, half in zip(rows[on], cols[on], np.maximum(1, (depth[on] * 6).astype(int))):
            img[r, max(0, c - half):min(width, c + half)] = (230, 225, 200)
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


LOOKS = {"plain": _frame, "overcast": _overcast_frame}


def write_foreign_bag(path: Path, seconds: float, speed: float = 10.0, width: int = 320, height: int = 240,
                      encoding: str = "bgra8", compressed: bool = False, look: str = "plain") -> Path:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    T = ts.types
    img_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"

    def header(t: float, frame: str):
        sec = int(math.floor(t))
        return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](
            sec=sec, nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000), frame_id=frame)

    t0 = 1_750_000_000.0
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        cams = {c: w.add_connection(topic, img_type, typestore=ts) for c, topic in FOREIGN_CAMERAS.items()}
        odom = w.add_connection(FOREIGN_ODOM, "nav_msgs/msg/Odometry", typestore=ts)
        for k in range(int(seconds * 20)):
            t = t0 + 0.05 * k
            x = speed * 0.05 * k
            if k % 2 == 0:
                rgb = LOOKS[look](width, height, x)
                for c, conn in cams.items():
                    if compressed:
                        import io

                        from PIL import Image
                        buf = io.BytesIO()
                        Image.fromarray(rgb).save(buf, format="JPEG", quality=80)
                        msg = T[img_type](header=header(t, f"{c}_camera"), format="jpeg",
                                          data=np.frombuffer(buf.getvalue(), np.uint8))
                    else:
                        data = rgb[:, :, ::-1] if encoding.startswith("bgr") else rgb
                        if encoding.endswith("a8"):
                            data = np.concatenate([data, np.full((height, width, 1), 255, np.uint8)], 2)
                        msg = T[img_type](header=header(t, f"{c}_camera"), height=height, width=width,
                                          encoding=encoding, is_bigendian=0, step=width * data.shape[2],
                                          data=np.ascontiguousarray(data).reshape(-1))
                    w.write(conn, int(t * 1e9), ts.serialize_cdr(msg, img_type))
            pose = T["geometry_msgs/msg/Pose"](
                position=T["geometry_msgs/msg/Point"](x=x, y=0.0, z=0.0),
                orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))
            twist = T["geometry_msgs/msg/Twist"](linear=T["geometry_msgs/msg/Vector3"](x=speed, y=0.0, z=0.0),
                                                 angular=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0))
            od = T["nav_msgs/msg/Odometry"](
                header=header(t, "map"), child_frame_id="base_link",
                pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
                twist=T["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=np.zeros(36)))
            w.write(odom, int(t * 1e9), ts.serialize_cdr(od, "nav_msgs/msg/Odometry"))
    return path


def remaps_to(camera_names, wire: dict) -> list[str]:
    """--remap arguments that map this bag's topics onto the params file's input names on the wire (compressed
    frames follow to <camera topic>/compressed on their own)."""
    cams = dict(zip(camera_names, wire["camera_topics"]))
    return [f"{FOREIGN_CAMERAS[c]}:={cams[c]}" for c in FOREIGN_CAMERAS] + [f"{FOREIGN_ODOM}:={wire['odom_topic']}"]
