"""spanvla_planner: VLM reasoner at low rate and flow-matching action expert at control rate, one process,
sharing the bridge in memory.

The reasoner runs in its own worker thread at its own rate, so a reasoner run (hundreds of ms) never blocks
the control timer, which runs with the subscriptions on the node's executor; torch releases the GIL in its
kernels. (Two callback groups on rclpy's MultiThreadedExecutor were tried first: its wait loop spins on
the GIL and starved the sensor callbacks to a few Hz on this 2-core machine.)
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter

import numpy as np
import rclpy
from nav_msgs.msg import Odometry, Path
from geometry_msgs.msg import PoseStamped
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from transforms3d.euler import euler2quat, quat2euler
from visualization_msgs.msg import Marker, MarkerArray

from spanvla_ros.config import resolve_share_path
from spanvla_ros.data.bag_io import path_xy
from spanvla_ros.data.sensor_buffers import EgoHistory, FrameHistory
from spanvla_ros.model.bridge import LatestBridge
from spanvla_ros.model.policy import SpanVLAPolicy
from spanvla_ros.msg import PlanStatus, Reasoning
from spanvla_ros.ros.images import ImageDecodeError, decode_compressed_msg, decode_image_msg
from spanvla_ros.ros.stamps import sec_to_stamp, stamp_to_sec

DEFAULT_CHECKPOINT = "checkpoints/spanvla_default"


class PlannerNode(Node):
    def __init__(self, policy: SpanVLAPolicy | None = None, name: str = "spanvla_planner", **node_kw):
        super().__init__(name, **node_kw)
        p = self._declare_params()
        self.policy = policy or SpanVLAPolicy.from_pretrained(resolve_share_path(p["checkpoint"] or DEFAULT_CHECKPOINT),
                                                              device=p["device"])
        cfg = self.policy.cfg
        cams = tuple(p["camera_names"])
        if len(cams) != len(cfg.cameras) or len(p["camera_topics"]) != len(cams):
            raise ValueError(f"camera_names/camera_topics must list {len(cfg.cameras)} cameras")
        self.frames = FrameHistory(cams, p["history_frames"], 1.0 / p["history_rate_hz"], p["max_camera_skew_s"])
        self.ego = EgoHistory(keep_s=cfg.history_dt * cfg.past_poses + 1.0)
        self.bridge = LatestBridge()
        self.command = "follow lane"
        self.route_xy: np.ndarray | None = None    # world polyline, in self.route_frame
        self.route_frame = ""
        self.stop_xy: np.ndarray | None = None     # the route's stop lines (world points), in self.stop_frame
        self.stop_frame = ""
        self._odom_frame = ""
        self.counters: Counter = Counter()
        self.bad_messages = 0
        self.reasoner_latencies: list[float] = []
        self.expert_latencies: list[float] = []
        self._odom_rx_monotonic: float | None = None
        self._last_reasoning = ""
        self._lock = threading.Lock()

        if p["image_transport"] not in ("raw", "compressed"):
            raise ValueError(f"image_transport must be raw or compressed, got {p['image_transport']!r}")
        for cam, topic in zip(cams, p["camera_topics"]):
            if p["image_transport"] == "compressed":   # image_transport naming: <topic>/compressed
                self.create_subscription(CompressedImage, topic + "/compressed", lambda m, c=cam: self._on_image(c, m),
                                         qos_profile_sensor_data)
            else:
                self.create_subscription(Image, topic, lambda m, c=cam: self._on_image(c, m), qos_profile_sensor_data)
        self.create_subscription(Odometry, p["odom_topic"], self._on_odom, 20)
        # the command is latched by its publisher (route-level, changes rarely)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.create_subscription(String, p["command_topic"], self._on_command, latched)
        # the mission route (lane centre to follow), latched like the carla-ros-bridge waypoint topic
        self.create_subscription(Path, p["route_topic"], self._on_route, latched)
        # the route's stop lines (a Path of points, empty when the route has none), latched like the route
        self.create_subscription(Path, p["stop_lines_topic"], self._on_stop_lines, latched)
        self.pub_path = self.create_publisher(Path, p["path_topic"], 5)
        self.pub_status = self.create_publisher(PlanStatus, p["status_topic"], 5)
        self.pub_markers = self.create_publisher(MarkerArray, p["markers_topic"], 5)
        self.pub_reasoning = self.create_publisher(Reasoning, p["reasoning_topic"], 5)
        self.pub_reasoning_text = self.create_publisher(String, p["reasoning_text_topic"], 5)
        # Plans are made when odometry arrives (no wait for a timer phase: input -> Path latency is transport +
        # compute), at most at control rate; the timer fills in when odometry is slower than the control rate.
        self._period = 1.0 / p["control_rate_hz"]
        self._last_plan_monotonic = -math.inf
        self.create_timer(self._period, lambda: self._maybe_plan(1.25))
        self._stop = threading.Event()
        self._reasoner_thread = threading.Thread(target=self._reasoner_loop, name="spanvla_reasoner", daemon=True)
        self._reasoner_thread.start()
        self.get_logger().info(f"model {self.policy.model_id}: reasoner {p['reasoner_rate_hz']} Hz, "
                               f"expert {p['control_rate_hz']} Hz, bridge layers {self.policy.reasoner.layer_ids}")

    def _declare_params(self) -> dict:
        defaults = dict(camera_names=["front", "front_left", "front_right"],
                        camera_topics=["/carla/ego_vehicle/rgb_front/image", "/carla/ego_vehicle/rgb_front_left/image",
                                       "/carla/ego_vehicle/rgb_front_right/image"],
                        odom_topic="/carla/ego_vehicle/odometry", command_topic="/spanvla/command",
                        route_topic="/carla/ego_vehicle/route", stop_lines_topic="/carla/ego_vehicle/stop_lines",
                        base_frame="base_link", image_transport="raw", checkpoint="", device="cpu", reasoner_rate_hz=1.0,
                        control_rate_hz=20.0, history_frames=4, history_rate_hz=2.0, max_camera_skew_s=0.05,
                        odom_timeout_s=0.5, bridge_stale_s=2.5, flow_steps=5, max_new_tokens=40,
                        path_topic="/spanvla/path", reasoning_topic="/spanvla/reasoning",
                        reasoning_text_topic="/spanvla/reasoning_text", status_topic="/spanvla/plan_status",
                        markers_topic="/spanvla/markers")
        self.params = {k: self.declare_parameter(k, v).value for k, v in defaults.items()}
        return self.params

    # ------------------------------------------------------------------ inputs
    def _bad(self, reason: str, detail: str) -> None:
        self.bad_messages += 1
        self.counters[f"bad_{reason}"] += 1
        self.get_logger().warning(f"dropped message ({reason}): {detail}", throttle_duration_sec=2.0)

    def _on_image(self, camera: str, msg) -> None:
        try:
            img = decode_compressed_msg(msg) if isinstance(msg, CompressedImage) else decode_image_msg(msg)
        except ImageDecodeError as exc:
            self._bad(exc.reason, f"{camera}: {exc}")
            return
        self.frames.add(camera, stamp_to_sec(msg.header.stamp), img)

    def _on_odom(self, msg: Odometry) -> None:
        q = msg.pose.pose.orientation
        yaw = quat2euler((q.w, q.x, q.y, q.z))[2]
        v = msg.twist.twist.linear
        if not all(map(math.isfinite, (msg.pose.pose.position.x, msg.pose.pose.position.y, yaw, v.x, v.y))):
            self._bad("odometry", "non-finite pose or twist")
            return
        self.ego.add(stamp_to_sec(msg.header.stamp), msg.pose.pose.position.x, msg.pose.pose.position.y, yaw,
                     math.hypot(v.x, v.y))
        self._odom_frame = msg.header.frame_id
        self._odom_rx_monotonic = time.monotonic()
        self._maybe_plan(0.5)

    def _maybe_plan(self, min_gap_periods: float) -> None:
        if time.monotonic() - self._last_plan_monotonic >= min_gap_periods * self._period:
            self._control()

    def _on_route(self, msg: Path) -> None:
        xy = path_xy(msg)
        if len(xy) < 2 or not np.isfinite(xy).all():
            self._bad("route", f"route needs >= 2 finite poses, got {len(xy)}")
            return
        keep = np.concatenate([[True], np.linalg.norm(np.diff(xy, axis=0), axis=1) > 1e-3])   # drop repeats
        self.route_xy, self.route_frame = xy[keep], msg.header.frame_id
        self.counters["routes_received"] += 1
        self.get_logger().info(f"route: {len(self.route_xy)} poses in frame {self.route_frame!r}")

    def _on_stop_lines(self, msg: Path) -> None:
        xy = path_xy(msg)
        if not np.isfinite(xy).all():
            self._bad("stop_lines", "non-finite stop line position")
            return
        self.stop_xy, self.stop_frame = xy, msg.header.frame_id
        self.counters["stop_lines_received"] += 1
        self.get_logger().info(f"stop lines: {len(xy)} on the route, frame {self.stop_frame!r}")

    def _stop_lines_for_plan(self):
        """The route's stop lines for a traffic-light model, None if unknown (the model then reads the light
        but not where to stop: counted)."""
        if not self.policy.cfg.traffic_lights:
            return None
        if self.stop_xy is None or (self.stop_frame and self.route_frame and self.stop_frame != self.route_frame):
            self.counters["plans_without_stop_lines"] += 1
            self.get_logger().warning(f"no stop lines on {self.params['stop_lines_topic']} in the route's frame: "
                                      "planning without them", throttle_duration_sec=5.0)
            return None
        return self.stop_xy

    def _route_for_plan(self):
        """The route if it can be used with the current odometry, else None (and why, counted and logged)."""
        if not self.policy.uses_route:
            return None
        if self.route_xy is None:
            self.counters["plans_without_route"] += 1
            self.get_logger().warning(f"no route on {self.params['route_topic']}: planning from cameras only",
                                      throttle_duration_sec=5.0)
            return None
        if self.route_frame and self._odom_frame and self.route_frame != self._odom_frame:
            # no tf2 wheel here: frames are not chained, so a route in another frame cannot be used
            self.counters["plans_without_route"] += 1
            self.get_logger().warning(f"route frame {self.route_frame!r} != odometry frame {self._odom_frame!r}: "
                                      "route ignored", throttle_duration_sec=5.0)
            return None
        return self.route_xy

    def _on_command(self, msg: String) -> None:
        if msg.data in self.policy.cfg.commands:
            self.command = msg.data
        else:
            self._bad("command", f"unknown command {msg.data!r} (known: {self.policy.cfg.commands})")

    def destroy_node(self):
        self._stop.set()
        self._reasoner_thread.join(timeout=10.0)
        return super().destroy_node()

    # ------------------------------------------------------------------ reasoner (low rate, own thread)
    def _reasoner_loop(self) -> None:
        period = 1.0 / self.params["reasoner_rate_hz"]
        next_t = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            next_t = max(next_t + period, time.monotonic())
            try:
                self._reason()
            except Exception as exc:  # a bad frame set must not kill the reasoner thread
                self.counters["reasoner_errors"] += 1
                self.get_logger().error(f"reasoner run failed: {exc!r}", throttle_duration_sec=2.0)

    def _reason(self) -> None:
        hist = self.frames.history()
        ego = self.ego.state(self.policy.cfg.past_poses, self.policy.cfg.history_dt)
        if hist is None or ego is None:
            self.counters["reasoner_waiting"] += 1
            missing = self.frames.missing_cameras()
            self.get_logger().info(f"reasoner waiting: {'no frames from ' + str(missing) if missing else 'no complete frame set' if hist is None else 'no odometry'}",
                                   throttle_duration_sec=5.0)
            return
        images, stamp = hist
        past, speed, accel, _, _ = ego
        r = self.policy.reason(images, self.command, speed, accel, past, stamp=stamp,
                               max_new_tokens=self.params["max_new_tokens"])
        self.bridge.publish(r.bridge)
        self.reasoner_latencies.append(r.latency_s)
        self.counters["reasoner_runs"] += 1
        self._last_reasoning = r.text
        msg = Reasoning()
        msg.header.stamp = sec_to_stamp(stamp)
        msg.header.frame_id = self.params["base_frame"]
        msg.text, msg.command = r.text, self.command
        msg.generation_latency = float(r.latency_s)
        msg.num_tokens, msg.num_vision_tokens = len(r.token_ids), r.num_vision_tokens
        msg.model_id = self.policy.model_id
        self.pub_reasoning.publish(msg)
        self.pub_reasoning_text.publish(String(data=r.text))

    # ------------------------------------------------------------------ action expert (control rate)
    def _control(self) -> None:
        p = self.params
        self._last_plan_monotonic = time.monotonic()
        if self._odom_rx_monotonic is None or time.monotonic() - self._odom_rx_monotonic > p["odom_timeout_s"]:
            self.counters["plans_withheld_stale_odometry"] += 1
            self.get_logger().warning("not planning: odometry is stale or missing", throttle_duration_sec=2.0)
            return
        ego = self.ego.state(self.policy.cfg.past_poses, self.policy.cfg.history_dt)
        past, speed, accel, yaw_rate, stamp = ego
        route = self._route_for_plan()
        bridge = self.bridge.latest()
        t0 = time.perf_counter()
        if bridge is None:
            traj = self.policy.history_init(past, speed)
            degraded, reason, age = True, "no bridge yet: history-initialised trajectory only", float("inf")
        else:
            traj = self.policy.plan(bridge, past, speed, accel, yaw_rate, self.command, steps=p["flow_steps"],
                                    route_xy=route, pose=self.ego.latest_pose(),
                                    stop_xy=self._stop_lines_for_plan() if route is not None else None)
            age = stamp - bridge.stamp
            degraded = age > p["bridge_stale_s"]
            reason = f"bridge stale: {age:.2f} s > {p['bridge_stale_s']:.2f} s" if degraded else ""
        dt = time.perf_counter() - t0
        self.expert_latencies.append(dt)
        self.counters["plans_published"] += 1
        self.counters["plans_degraded"] += int(degraded)
        header_stamp = sec_to_stamp(stamp)
        self.pub_path.publish(self._path_msg(traj, header_stamp))
        st = PlanStatus()
        st.header.stamp, st.header.frame_id = header_stamp, p["base_frame"]
        st.bridge_age = float(age) if math.isfinite(age) else -1.0
        st.reasoner_latency = float(bridge.latency_s) if bridge else 0.0
        st.expert_latency = float(dt)
        st.flow_steps = int(p["flow_steps"])
        st.route_used = route is not None and bridge is not None
        st.degraded, st.degraded_reason = degraded, reason
        st.plans_published, st.bad_messages = self.counters["plans_published"], self.bad_messages
        self.pub_status.publish(st)
        self.pub_markers.publish(self._markers(traj, header_stamp, degraded))

    def _path_msg(self, traj: np.ndarray, stamp) -> Path:
        path = Path()
        path.header.stamp, path.header.frame_id = stamp, self.params["base_frame"]
        for x, y, h, _ in traj:
            ps = PoseStamped()
            ps.header = path.header
            ps.pose.position.x, ps.pose.position.y = float(x), float(y)
            w, qx, qy, qz = euler2quat(0.0, 0.0, float(h))
            ps.pose.orientation.w, ps.pose.orientation.x, ps.pose.orientation.y, ps.pose.orientation.z = w, qx, qy, qz
            path.poses.append(ps)
        return path

    def _markers(self, traj: np.ndarray, stamp, degraded: bool) -> MarkerArray:
        line = Marker()
        line.header.stamp, line.header.frame_id = stamp, self.params["base_frame"]
        line.ns, line.id, line.type, line.action = "plan", 0, Marker.LINE_STRIP, Marker.ADD
        line.scale.x = 0.3
        line.color.r, line.color.g, line.color.b, line.color.a = (1.0, 0.5, 0.0, 1.0) if degraded else (0.1, 1.0, 0.1, 1.0)
        line.pose.orientation.w = 1.0
        for x, y, _, _ in traj:
            pt = PoseStamped().pose.position
            pt.x, pt.y = float(x), float(y)
            line.points.append(pt)
        text = Marker()
        text.header = line.header
        text.ns, text.id, text.type, text.action = "reasoning", 1, Marker.TEXT_VIEW_FACING, Marker.ADD
        text.pose.position.x, text.pose.position.z, text.pose.orientation.w = 5.0, 3.0, 1.0
        text.scale.z = 0.8
        text.color.r = text.color.g = text.color.b = text.color.a = 1.0
        text.text = (self._last_reasoning or "(no reasoning yet)")[:120]
        return MarkerArray(markers=[line, text])
