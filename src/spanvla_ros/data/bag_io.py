"""rosbag2 (MCAP or sqlite3) writing and reading through `rosbags`, no ROS install needed.

Episode bags hold what a car would log, on carla-ros-bridge topic names, so they replay through the real
nodes: JPEG CompressedImage per camera, Odometry, the ground-truth route (nav_msgs/Path), other agents as a
MarkerArray of boxes (speed in the marker text; opens as boxes in Foxglove/RViz) and the signal state.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..geometry import quat_from_yaw, yaw_from_quat

CAMERA_TOPIC = "/carla/ego_vehicle/rgb_{}/image"
ODOM_TOPIC = "/carla/ego_vehicle/odometry"
ROUTE_TOPIC = "/carla/ego_vehicle/route"
STOP_LINES_TOPIC = "/carla/ego_vehicle/stop_lines"
AGENTS_TOPIC = "/sim/agents"
LIGHT_TOPIC = "/sim/traffic_light"
COMMAND_TOPIC = "/spanvla/command"
BAG_EPOCH = 1_700_000_000.0   # sim time 0 of every episode, so stamps are deterministic and realistic


class BagError(RuntimeError):
    """A bag that cannot be read (missing, corrupt, truncated); ``partial`` holds what was read before."""

    def __init__(self, msg: str, partial=None):
        super().__init__(msg)
        self.partial = partial


class BagStream:
    """The raw messages of a rosbag2 (MCAP or sqlite3) in log-time order, read lazily, so memory does not grow
    with the bag: iterate for (log time ns, topic, type name, CDR bytes). ``topics`` restricts what is read.
    A recording cut short (crash, full disk) has no MCAP summary, which rosbags needs; such a file is read
    front to back with the ``mcap`` library's non-seeking reader up to where it breaks. ``error`` then says
    why the bag ended early (None for a complete read)."""

    def __init__(self, path: str | Path, topics: set[str] | None = None):
        self.path, self.topics = Path(path), topics
        self.error: str | None = None
        if not self.path.exists():
            raise BagError(f"bag {self.path} does not exist")

    def _wanted(self, topic: str) -> bool:
        return self.topics is None or topic in self.topics

    def connections(self) -> dict[str, str]:
        """topic -> message type of the wanted topics, from the bag's metadata (or, for a truncated MCAP, from the
        channel records met before the first 2000 messages)."""
        from rosbags.highlevel import AnyReader

        try:
            with AnyReader([self.path], default_typestore=typestore()) as reader:
                return {c.topic: c.msgtype for c in reader.connections if self._wanted(c.topic)}
        except Exception:
            found: dict[str, str] = {}
            for k, (_, topic, typ, _) in enumerate(self._mcap_messages(record_error=False)):
                found.setdefault(topic, typ)
                if k >= 2000:
                    break
            return found

    def __iter__(self) -> Iterator[tuple[int, str, str, bytes]]:
        from rosbags.highlevel import AnyReader

        yielded = False
        try:
            with AnyReader([self.path], default_typestore=typestore()) as reader:
                conns = [c for c in reader.connections if self._wanted(c.topic)]
                for conn, t, raw in reader.messages(connections=conns):
                    yielded = True
                    yield t, conn.topic, conn.msgtype, bytes(raw)
            return
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            if yielded:
                return
        yield from self._mcap_messages(record_error=True)

    def _mcap_messages(self, record_error: bool) -> Iterator[tuple[int, str, str, bytes]]:
        from mcap.reader import NonSeekingReader

        for f in sorted(self.path.glob("*.mcap")) if self.path.is_dir() else [self.path]:
            with open(f, "rb") as stream:
                try:
                    # file order: log-time ordering would load the whole file (and fail at its cut)
                    for schema, channel, message in NonSeekingReader(stream).iter_messages(log_time_order=False):
                        if self._wanted(channel.topic):
                            yield message.log_time, channel.topic, schema.name if schema else "", message.data
                except Exception as exc:
                    if record_error and self.error is None:
                        self.error = f"{type(exc).__name__}: {exc}"
                    return


def typestore(with_spanvla_msgs: bool = False):
    """The Kilted type store; with this package's own messages (Reasoning, PlanStatus) registered on request,
    read from msg/ in the source tree or the installed share directory."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    if with_spanvla_msgs:
        for name in ("Reasoning", "PlanStatus"):
            f = Path(__file__).resolve().parents[3] / "msg" / f"{name}.msg"
            if not f.is_file():
                from ..config import resolve_share_path
                f = resolve_share_path(Path("msg") / f"{name}.msg")
            ts.register(get_types_from_msg(f.read_text(), f"spanvla_ros/msg/{name}"))
    return ts


def _stamp(ts, t: float):
    Time = ts.types["builtin_interfaces/msg/Time"]
    sec = int(math.floor(t))
    return Time(sec=sec, nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000)


def _header(ts, t: float, frame: str):
    return ts.types["std_msgs/msg/Header"](stamp=_stamp(ts, t), frame_id=frame)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as im:
        return np.asarray(im.convert("RGB"))


def odometry_row(msg) -> tuple[float, float, float, float, float]:
    """(stamp, x, y, yaw, speed) of a nav_msgs/Odometry (an rclpy message or a rosbags-deserialised one)."""
    from ..ros.stamps import stamp_to_sec

    p, v = msg.pose.pose.position, msg.twist.twist.linear
    return stamp_to_sec(msg.header.stamp), p.x, p.y, yaw_from_quat(msg.pose.pose.orientation), math.hypot(v.x, v.y)


class EpisodeBagWriter:
    def __init__(self, path: Path, cameras, storage: str = "mcap"):
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.ts = typestore()
        self.cameras = tuple(cameras)
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self.w = Writer(Path(path), version=9, storage_plugin=plugin)
        self.w.open()
        self.conn: dict[str, Any] = {}
        for c in self.cameras:
            self._add(CAMERA_TOPIC.format(c) + "/compressed", "sensor_msgs/msg/CompressedImage")
        for topic, typ in ((ODOM_TOPIC, "nav_msgs/msg/Odometry"), (ROUTE_TOPIC, "nav_msgs/msg/Path"),
                           (STOP_LINES_TOPIC, "nav_msgs/msg/Path"),
                           (AGENTS_TOPIC, "visualization_msgs/msg/MarkerArray"), (LIGHT_TOPIC, "std_msgs/msg/String"),
                           (COMMAND_TOPIC, "std_msgs/msg/String")):
            self._add(topic, typ)

    def _add(self, topic, typ):
        self.conn[topic] = (self.w.add_connection(topic, typ, typestore=self.ts), typ)

    def _write(self, topic, t, msg):
        conn, typ = self.conn[topic]
        self.w.write(conn, int(round((BAG_EPOCH + t) * 1e9)), self.ts.serialize_cdr(msg, typ))

    def _xy_path(self, t: float, xy) -> object:
        T = self.ts.types
        poses = []
        for x, y in xy:
            p = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=float(x), y=float(y), z=0.0),
                                            orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))
            poses.append(T["geometry_msgs/msg/PoseStamped"](header=_header(self.ts, BAG_EPOCH + t, "map"), pose=p))
        return T["nav_msgs/msg/Path"](header=_header(self.ts, BAG_EPOCH + t, "map"), poses=poses)

    def write_route(self, t: float, route_xy: np.ndarray, command: str, stop_xy: np.ndarray | None = None) -> None:
        self._write(ROUTE_TOPIC, t, self._xy_path(t, route_xy[::2]))
        if stop_xy is not None:
            self._write(STOP_LINES_TOPIC, t, self._xy_path(t, stop_xy))
        self._write(COMMAND_TOPIC, t, self.ts.types["std_msgs/msg/String"](data=command))

    def write_step(self, obs) -> None:
        T, t = self.ts.types, obs.t
        stamp_t = BAG_EPOCH + t
        for c in self.cameras:
            if c in obs.images:
                msg = T["sensor_msgs/msg/CompressedImage"](header=_header(self.ts, stamp_t, f"{c}_camera"),
                                                          format="jpeg",
                                                          data=np.frombuffer(jpeg_bytes(obs.images[c]), np.uint8))
                self._write(CAMERA_TOPIC.format(c) + "/compressed", t, msg)
        e = obs.ego
        self._write(ODOM_TOPIC, t, odometry_msg(self.ts, stamp_t, e.x, e.y, e.heading, e.speed, e.yaw_rate))
        markers = []
        for a in obs.agents:
            qw, qx, qy, qz = quat_from_yaw(a.heading)
            m = T["visualization_msgs/msg/Marker"](
                header=_header(self.ts, stamp_t, "map"), ns="agents", id=int(a.id), type=1, action=0,
                pose=T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=a.x, y=a.y, z=0.75),
                                                 orientation=T["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw)),
                scale=T["geometry_msgs/msg/Vector3"](x=a.length, y=a.width, z=1.5),
                color=T["std_msgs/msg/ColorRGBA"](r=0.2, g=0.4, b=0.9, a=1.0),
                lifetime=T["builtin_interfaces/msg/Duration"](sec=0, nanosec=200_000_000), frame_locked=False,
                points=[], colors=[], texture_resource="", texture=T["sensor_msgs/msg/CompressedImage"](
                    header=_header(self.ts, stamp_t, ""), format="", data=np.zeros(0, np.uint8)),
                uv_coordinates=[], text=f"{a.speed:.3f}", mesh_resource="",
                mesh_file=T["visualization_msgs/msg/MeshFile"](filename="", data=np.zeros(0, np.uint8)),
                mesh_use_embedded_materials=False)
            markers.append(m)
        self._write(AGENTS_TOPIC, t, T["visualization_msgs/msg/MarkerArray"](markers=markers))
        if obs.light is not None:
            self._write(LIGHT_TOPIC, t, T["std_msgs/msg/String"](data=obs.light.state))

    def close(self) -> None:
        self.w.close()


def odometry_msg(ts, stamp_t, x, y, yaw, speed, yaw_rate):
    T = ts.types
    qw, qx, qy, qz = quat_from_yaw(yaw)
    cov = np.zeros(36)
    pose = T["geometry_msgs/msg/PoseWithCovariance"](
        pose=T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=x, y=y, z=0.0),
                                         orientation=T["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw)),
        covariance=cov)
    twist = T["geometry_msgs/msg/TwistWithCovariance"](
        twist=T["geometry_msgs/msg/Twist"](linear=T["geometry_msgs/msg/Vector3"](x=speed, y=0.0, z=0.0),
                                           angular=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=yaw_rate)),
        covariance=cov)
    return T["nav_msgs/msg/Odometry"](header=_header(ts, stamp_t, "map"), child_frame_id="base_link", pose=pose,
                                      twist=twist)


def path_xy(msg) -> np.ndarray:
    """(N, 2) positions of a nav_msgs/Path's poses; works on rosbags and rclpy messages alike."""
    return np.array([(ps.pose.position.x, ps.pose.position.y) for ps in msg.poses], np.float64).reshape(-1, 2)


@dataclass
class EpisodeLog:
    """What a bag holds, as arrays. Times are bag stamps in seconds."""
    odom: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))    # t, x, y, yaw, speed
    images: dict = field(default_factory=dict)      # camera -> list of (t, jpeg or raw rgb)
    agents: list = field(default_factory=list)      # (t, [(id, x, y, yaw, speed, length, width), ...])
    light: list = field(default_factory=list)       # (t, state)
    route: np.ndarray | None = None
    stop_lines: np.ndarray | None = None            # (K, 2), None when the bag has no stop-line message
    command: str = "follow lane"
    messages: int = 0

    def image_at(self, camera: str, t: float, tol: float = 0.06) -> np.ndarray | None:
        frames = self.images.get(camera, [])
        if not frames:
            return None
        ts = np.array([f[0] for f in frames])
        i = int(np.argmin(np.abs(ts - t)))
        if abs(ts[i] - t) > tol:
            return None
        data = frames[i][1]
        return data if isinstance(data, np.ndarray) else decode_jpeg(data)


def read_episode(path: Path, cameras) -> EpisodeLog:
    """Read an episode bag (MCAP or sqlite3). Corrupt or truncated bags raise BagError with the partial log."""
    from rosbags.highlevel import AnyReader

    path = Path(path)
    log = EpisodeLog(images={c: [] for c in cameras})
    odom = []
    if not path.exists():
        raise BagError(f"bag {path} does not exist", log)
    cam_of = {}
    for c in cameras:
        cam_of[CAMERA_TOPIC.format(c) + "/compressed"] = c
        cam_of[CAMERA_TOPIC.format(c)] = c
    try:
        with AnyReader([path], default_typestore=typestore()) as reader:
            for conn, stamp, raw in reader.messages():
                msg: Any = reader.deserialize(raw, conn.msgtype)
                log.messages += 1
                t = stamp * 1e-9
                if conn.topic in cam_of:
                    hs = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
                    if conn.msgtype.endswith("CompressedImage"):
                        log.images[cam_of[conn.topic]].append((hs, bytes(msg.data)))
                    else:
                        from ..ros.images import decode_rgb
                        log.images[cam_of[conn.topic]].append(
                            (hs, decode_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)))
                elif conn.topic == ODOM_TOPIC:
                    odom.append(odometry_row(msg))
                elif conn.topic == AGENTS_TOPIC:
                    log.agents.append((t, [(m.id, m.pose.position.x, m.pose.position.y,
                                            yaw_from_quat(m.pose.orientation), float(m.text or 0.0), m.scale.x,
                                            m.scale.y) for m in msg.markers]))
                elif conn.topic == LIGHT_TOPIC:
                    log.light.append((t, msg.data))
                elif conn.topic == ROUTE_TOPIC:
                    log.route = path_xy(msg)
                elif conn.topic == STOP_LINES_TOPIC:
                    log.stop_lines = path_xy(msg)
                elif conn.topic == COMMAND_TOPIC:
                    log.command = msg.data
    except BagError:
        raise
    except Exception as exc:  # rosbags raises several types (ReaderError, struct errors, mcap errors)
        log.odom = np.array(odom) if odom else np.zeros((0, 5))
        raise BagError(f"cannot read bag {path}: {type(exc).__name__}: {exc}", log) from exc
    log.odom = np.array(odom) if odom else np.zeros((0, 5))
    return log
