"""sim_bridge: the simulator side of the closed loop, on carla-ros-bridge topic names.

Publishes per camera sensor_msgs/Image + CameraInfo, nav_msgs/Odometry, the ground-truth route and its stop lines
(nav_msgs/Path, transient local), other agents (MarkerArray), the driving command, and frames on /tf and /tf_static
(map -> base_link -> cameras; through tf2_ros where it is installed, else tf2_msgs/TFMessage published directly).
Subscribes to the planned nav_msgs/Path and tracks it with pure pursuit + PI speed control at control rate.
The simulator steps at ``sim_rate_hz`` in real time; when an episode ends the next seed starts.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

import numpy as np
from geometry_msgs.msg import TransformStamped
from nav_msgs.msg import Odometry, Path
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String
from visualization_msgs.msg import Marker, MarkerArray

from spanvla_ros.geometry import quat_from_yaw, yaw_from_quat
from spanvla_ros.ros.images import encode_image_msg
from spanvla_ros.ros.messages import xy_path_msg
from spanvla_ros.ros.params import check_changes, declare_from_schema
from spanvla_ros.ros.stamps import sec_to_stamp, stamp_to_sec
from spanvla_ros.sim.backends import make_backend
from spanvla_ros.sim.controller import PathTracker, path_to_current_frame, tracked_path
from spanvla_ros.sim.types import Control

MAX_PLAN_STEP_S = 2.0    # a Path whose poses are further apart in time than this is not a plan


class SimBridgeNode(Node):
    def __init__(self, name: str = "sim_bridge", backend=None, **node_kw):
        super().__init__(name, **node_kw)
        # from params/spanvla.schema.yaml: descriptors, no defaults (the params file gives every value)
        self.p: dict[str, Any] = declare_from_schema(self, "sim_bridge")
        self.add_on_set_parameters_callback(
            lambda changes: SetParametersResult(successful=not (r := check_changes("sim_bridge", self.p, changes)),
                                                reason=r))
        self.add_post_set_parameters_callback(lambda changes: self.p.update({c.name: c.value for c in changes}))
        p = self.p
        # the simulator steps at the rate the node ticks it, or stamps (wall time + sim time) drift apart
        step = 1.0 / p["sim_rate_hz"]
        self.backend = backend or make_backend(p["backend"], p["carla_host"], p["carla_port"], control_dt=step)
        if abs(self.backend.dt - step) > 1e-9:
            raise ValueError(f"sim_rate_hz {p['sim_rate_hz']} does not match the backend's step "
                             f"{self.backend.dt} s: set one to the other")
        self.tracker = PathTracker()
        self.counters: Counter = Counter()
        self.episodes: list[dict] = []
        self.cam_pubs = {c: self.create_publisher(Image, t, qos_profile_sensor_data)
                         for c, t in zip(p["camera_names"], p["camera_topics"])}
        self.info_pubs = {c: self.create_publisher(CameraInfo, t.rsplit("/", 1)[0] + "/camera_info",
                                                   qos_profile_sensor_data)
                          for c, t in zip(p["camera_names"], p["camera_topics"])}
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.odom_pub = self.create_publisher(Odometry, p["odom_topic"], 20)
        self.route_pub = self.create_publisher(Path, p["route_topic"], latched)
        self.stop_lines_pub = self.create_publisher(Path, p["stop_lines_topic"], latched)
        self.cmd_pub = self.create_publisher(String, p["command_topic"], latched)
        self.agents_pub = self.create_publisher(MarkerArray, p["agents_topic"], 5)
        self.clock_pub = self.create_publisher(Clock, "/clock", 10)
        self._static_tfs: dict[str, TransformStamped] = {}
        self._tf = self._make_tf_publishers(latched)
        self.create_subscription(Path, p["path_topic"], self._on_path, 5)
        # (path (N,4) ego frame at plan time, plan pose, receipt monotonic, the plan's step, its stamp)
        self._plan: tuple[np.ndarray, tuple[float, float, float], float, float, float] | None = None
        # (stamp, x, y, yaw) to place plans made from older odometry
        self._poses: deque[tuple[float, float, float, float]] = deque(maxlen=200)
        self.control = Control(0.0, 0.0)
        self._episode_index, self._restart_pending = 0, False
        self._start_episode()
        self.create_timer(1.0 / p["sim_rate_hz"], self._tick)
        self.create_timer(1.0 / p["control_rate_hz"], self._control_tick)

    # ------------------------------------------------------------------ frames
    def destroy_node(self):
        # a CARLA world keeps the ego, its sensors and the traffic, and stays in synchronous mode with nobody
        # ticking it, unless the backend restores it
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()
        return super().destroy_node()

    def _make_tf_publishers(self, latched):
        """/tf and /tf_static as tf2 does it: through tf2_ros where it is installed, else tf2_msgs/TFMessage
        published directly (the package's interfaces/ builds tf2_msgs where ROS does not provide it)."""
        try:
            from tf2_ros import StaticTransformBroadcaster, TransformBroadcaster
            return ("tf2", TransformBroadcaster(self), StaticTransformBroadcaster(self))
        except ImportError:
            from tf2_msgs.msg import TFMessage
            return ("topic", self.create_publisher(TFMessage, "/tf", 100),
                    self.create_publisher(TFMessage, "/tf_static", latched))

    def _send_tf(self, tf: TransformStamped, static: bool = False) -> None:
        kind, dyn, stat = self._tf
        if kind == "tf2":
            (stat if static else dyn).sendTransform(tf)
            return
        from tf2_msgs.msg import TFMessage
        if static:   # one latched message holds every static frame, as tf2_ros's static broadcaster keeps it
            self._static_tfs[tf.child_frame_id] = tf
            stat.publish(TFMessage(transforms=list(self._static_tfs.values())))
        else:
            dyn.publish(TFMessage(transforms=[tf]))

    def _transform(self, stamp, parent, child, x, y, z, yaw) -> TransformStamped:
        tf = TransformStamped()
        tf.header.stamp, tf.header.frame_id, tf.child_frame_id = stamp, parent, child
        t = tf.transform.translation
        t.x, t.y, t.z = float(x), float(y), float(z)
        q = tf.transform.rotation
        q.w, q.x, q.y, q.z = quat_from_yaw(yaw)
        return tf

    # ------------------------------------------------------------------ episodes
    def _start_episode(self) -> None:
        p = self.p
        names = list(p["scenarios"])
        self.scenario = names[self._episode_index % len(names)]
        self.seed = int(p["seed"]) + self._episode_index // len(names)
        self.obs = self.backend.reset(self.scenario, self.seed)
        self.tracker.reset()
        self._plan, self.control = None, Control(0.0, 0.0)
        self._wall0 = time.time() - self.obs.t
        self._flags_seen: Counter[str] = Counter()
        self.get_logger().info(f"episode {self._episode_index}: {self.scenario} seed {self.seed} ({self.obs.command})")
        stamp = sec_to_stamp(self._stamp())
        self.route_pub.publish(xy_path_msg(self.backend.route_xy[::2], p["map_frame"], stamp))
        self.stop_lines_pub.publish(xy_path_msg(self.backend.stop_lines_xy, p["map_frame"], stamp))
        self.cmd_pub.publish(String(data=self.obs.command))
        for cam in getattr(self.backend.rig, "cameras", ()):
            tf = self._transform(stamp, p["base_frame"], f"{cam.name}_camera", cam.x, 0.0, cam.z, cam.yaw)
            self._send_tf(tf, True)
        self._publish(self.obs)

    def _stamp(self) -> float:
        return self._wall0 + self.obs.t

    def _finish_episode(self, error: str = "") -> None:
        o = self.obs
        seen = self._flags_seen
        self.episodes.append(dict(scenario=self.scenario, seed=self.seed, t=o.t, route_completion=o.route_completion,
                                  collision=bool(seen["collision"]), off_road=seen["off_road"] > 0,
                                  red_light=bool(seen["red_light"]), wrong_way=seen["wrong_way"] > 0, error=error))
        self.get_logger().info(f"episode done: {self.episodes[-1]}")
        self._episode_index += 1
        self.counters["episodes"] += 1

    @property
    def finished(self) -> bool:
        return self.p["max_episodes"] > 0 and len(self.episodes) >= self.p["max_episodes"]

    # ------------------------------------------------------------------ loop
    def _on_path(self, msg: Path) -> None:
        if len(msg.poses) < 2:
            self.counters["bad_path"] += 1
            return
        rows = []
        for ps in msg.poses:
            rows.append((ps.pose.position.x, ps.pose.position.y, yaw_from_quat(ps.pose.orientation)))
        arr = np.array(rows)
        t_plan = stamp_to_sec(msg.header.stamp)
        # the Path is time-parameterised: each pose carries the time it is for (planner: input time + k x step)
        dt = stamp_to_sec(msg.poses[0].header.stamp) - t_plan
        if not 0.0 < dt <= MAX_PLAN_STEP_S:
            self.counters["bad_path"] += 1
            return
        path = tracked_path(arr, dt)
        pose = min(self._poses, key=lambda s: abs(s[0] - t_plan), default=None)
        if pose is None or abs(pose[0] - t_plan) > 0.5:
            self.counters["path_unknown_stamp"] += 1
            return
        self._plan = (path, pose[1:], time.monotonic(), dt, t_plan)
        self.counters["paths_received"] += 1

    def _control_tick(self) -> None:
        e = self.obs.ego
        if self._plan is None or time.monotonic() - self._plan[2] > self.p["plan_timeout_s"]:
            # no fresh plan: brake to a stop rather than drive blind
            self.control = Control(-3.0 if e.speed > 0.1 else 0.0, 0.0)
            self.counters["control_no_plan"] += 1
            return
        path, plan_pose, _, plan_dt, t_plan = self._plan
        local = path_to_current_frame(path, plan_pose, (e.x, e.y, e.heading))
        self.control = self.tracker.control(local, e.speed, 1.0 / self.p["control_rate_hz"], plan_dt,
                                            self._stamp() - t_plan)

    def _next_episode(self) -> None:
        """Start the next episode; a backend that cannot reset is retried on the next tick (counted, logged)."""
        try:
            self._start_episode()
            self._restart_pending = False
        except Exception as exc:   # a simulator that fails must not take the planner and the recording with it
            self._restart_pending = True
            self.counters["backend_errors"] += 1
            self.get_logger().error(f"simulator reset failed ({type(exc).__name__}: {exc}): retrying")

    def _tick(self) -> None:
        if self.finished:
            return
        if self._restart_pending:
            self._next_episode()
            return
        command = self.obs.command
        try:
            self.obs = self.backend.step(self.control)
        except Exception as exc:   # the episode ends (counted, with the error), the next one starts
            self.counters["backend_errors"] += 1
            self.get_logger().error(f"simulator step failed ({type(exc).__name__}: {exc}): episode ended")
            self._finish_episode(error=f"{type(exc).__name__}: {exc}")
            if not self.finished:
                self._next_episode()
            return
        if self.obs.command != command:   # latched: republished when the route's next manoeuvre changes it
            self.cmd_pub.publish(String(data=self.obs.command))
        for k, v in vars(self.obs.flags).items():
            self._flags_seen[k] += int(v)
        self._publish(self.obs)
        if self.obs.done:
            self._finish_episode()
            if not self.finished:
                self._next_episode()

    def _publish(self, obs) -> None:
        p = self.p
        t = self._stamp()
        stamp = sec_to_stamp(t)
        # the simulation's clock, as carla-ros-bridge publishes it: nodes with use_sim_time judge the age of these
        # stamps on it, not on a wall clock the simulation falls behind when the machine is loaded
        self.clock_pub.publish(Clock(clock=stamp))
        e = obs.ego
        self._poses.append((t, e.x, e.y, e.heading))
        odom = Odometry()
        odom.header.stamp, odom.header.frame_id, odom.child_frame_id = stamp, p["map_frame"], p["base_frame"]
        odom.pose.pose.position.x, odom.pose.pose.position.y = e.x, e.y
        q = odom.pose.pose.orientation
        q.w, q.x, q.y, q.z = quat_from_yaw(e.heading)
        odom.twist.twist.linear.x, odom.twist.twist.angular.z = e.speed, e.yaw_rate
        self.odom_pub.publish(odom)
        self._send_tf(self._transform(stamp, p["map_frame"], p["base_frame"], e.x, e.y, 0.0, e.heading))
        for cam, img in obs.images.items():
            if cam in self.cam_pubs:
                self.cam_pubs[cam].publish(encode_image_msg(img, stamp, f"{cam}_camera"))
                self.info_pubs[cam].publish(self._camera_info(cam, img.shape, stamp))
        markers = MarkerArray()
        for a in obs.agents:
            m = Marker()
            m.header.stamp, m.header.frame_id = stamp, p["map_frame"]
            m.ns, m.id, m.type, m.action = "agents", int(a.id), Marker.CUBE, Marker.ADD
            m.pose.position.x, m.pose.position.y, m.pose.position.z = a.x, a.y, 0.75
            q = m.pose.orientation
            q.w, q.x, q.y, q.z = quat_from_yaw(a.heading)
            m.scale.x, m.scale.y, m.scale.z = a.length, a.width, 1.5
            m.color.b, m.color.a = 0.9, 1.0
            m.lifetime.nanosec = 300_000_000
            m.text = f"{a.speed:.3f}"
            markers.markers.append(m)
        self.agents_pub.publish(markers)
        self.counters["frames_published"] += 1

    def _camera_info(self, cam: str, shape, stamp) -> CameraInfo:
        spec = next(c for c in self.backend.rig.cameras if c.name == cam)
        info = CameraInfo()
        info.header.stamp, info.header.frame_id = stamp, f"{cam}_camera"
        info.height, info.width = int(shape[0]), int(shape[1])
        f = spec.focal
        info.distortion_model = "plumb_bob"
        info.d = [0.0] * 5
        info.k = [f, 0.0, info.width / 2, 0.0, f, info.height / 2, 0.0, 0.0, 1.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.p = [f, 0.0, info.width / 2, 0.0, 0.0, f, info.height / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
        return info
