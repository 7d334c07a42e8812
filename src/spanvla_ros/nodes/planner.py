"""spanvla_planner: VLM reasoner at low rate and flow-matching action expert at control rate, sharing the bridge.

The reasoner is driven by its own worker thread at its own rate, so a reasoner run (hundreds of ms) never blocks
the control timer, which runs with the subscriptions on the node's executor. With ``reasoner_process`` (the
default) the run itself happens in a process of its own (planning.reasoner_process) and its bridge comes back
through a pipe: in one process the decode loop and the plans share one interpreter lock, and a plan that takes
8 ms alone took up to 35 ms while the reasoner generated. (Two callback groups on rclpy's MultiThreadedExecutor
were tried first: its wait loop spins on the GIL and starved the sensor callbacks to a few Hz on this 2-core
machine.)
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry, Path
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from visualization_msgs.msg import Marker, MarkerArray

from spanvla_ros.config import resolve_share_path, set_torch_threads
from spanvla_ros.data.bag_io import odometry_row, path_xy
from spanvla_ros.geometry import quat_from_yaw
from spanvla_ros.model.errors import ReasoningCancelled
from spanvla_ros.model.policy import SpanVLAPolicy
from spanvla_ros.msg import PlanStatus, Reasoning
from spanvla_ros.planning.core import Plan, PlannerCore, PlannerParams
from spanvla_ros.planning.reasoner_process import ReasonerProcess
from spanvla_ros.ros import topics
from spanvla_ros.ros.images import ImageDecodeError, decode_compressed_msg, decode_image_msg
from spanvla_ros.ros.params import check_changes, declare_from_schema
from spanvla_ros.ros.stamps import sec_to_stamp, stamp_to_sec

DEFAULT_CHECKPOINT = "checkpoints/spanvla_default"
DIAGNOSTICS_PERIOD_S = 1.0
REASONER_INPUT_POLL_S = 0.05   # while the reasoner waits for its first frames, odometry and route


class PlannerNode(Node):
    def __init__(self, policy: SpanVLAPolicy | None = None, name: str = "spanvla_planner", **node_kw):
        super().__init__(name, **node_kw)
        p = self._declare_params()
        set_torch_threads(p["torch_threads"])
        # the reasoner process loads the same checkpoint, or is handed a policy built in memory (pickled across)
        self._reasoner_source: Any = policy
        if policy is None:
            self._reasoner_source = resolve_share_path(p["checkpoint"] or DEFAULT_CHECKPOINT)
            policy = SpanVLAPolicy.from_pretrained(self._reasoner_source, device=p["device"], dtype=p["dtype"])
        self.policy = policy
        self.reasoner_process = self._start_reasoner_process() if p["reasoner_process"] else None
        cams = tuple(p["camera_names"])
        self._warned: dict[str, float] = {}
        self.core = PlannerCore(self.policy, PlannerParams.from_mapping(p), cams, warn=self._warn)
        self.counters = self.core.counters
        self.bad_messages = 0
        self.reasoner_latencies: list[float] = []
        self.expert_latencies: list[float] = []

        if p["image_transport"] not in ("raw", "compressed"):
            raise ValueError(f"image_transport must be raw or compressed, got {p['image_transport']!r}")
        # node-relative topics (spanvla_ros.ros.topics), remapped onto the names on the wire by whoever starts us
        for cam in cams:
            if p["image_transport"] == "compressed":   # image_transport naming: <topic>/compressed
                self.create_subscription(CompressedImage, topics.camera(cam) + topics.COMPRESSED,
                                         lambda m, c=cam: self._on_image(c, m), qos_profile_sensor_data)
            else:
                self.create_subscription(Image, topics.camera(cam), lambda m, c=cam: self._on_image(c, m),
                                         qos_profile_sensor_data)
        self.create_subscription(Odometry, topics.ODOMETRY, self._on_odom, 20)
        # the command is latched by its publisher (route-level, changes rarely)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.create_subscription(String, topics.COMMAND, self._on_command, latched)
        # the mission route (lane centre to follow), latched like the carla-ros-bridge waypoint topic
        self.create_subscription(Path, topics.ROUTE, self._on_route, latched)
        # the route's stop lines (a Path of points, empty when the route has none), latched like the route
        self.create_subscription(Path, topics.STOP_LINES, self._on_stop_lines, latched)
        self.pub_path = self.create_publisher(Path, topics.PATH, 5)
        self.pub_status = self.create_publisher(PlanStatus, topics.STATUS, 5)
        self.pub_markers = self.create_publisher(MarkerArray, topics.MARKERS, 5)
        self.pub_reasoning = self.create_publisher(Reasoning, topics.REASONING, 5)
        self.pub_reasoning_text = self.create_publisher(String, topics.REASONING_TEXT, 5)
        # Plans are made when odometry arrives (no wait for a timer phase: input -> Path latency is transport +
        # compute), at most at control rate; the timer fills in when odometry is slower than the control rate.
        self._period = 1.0 / p["control_rate_hz"]
        self._last_plan_monotonic = -math.inf
        self.create_timer(self._period, lambda: self._maybe_plan(1.25))
        # health the standard way (diagnostic_msgs on /diagnostics, 1 Hz): input rates, plan state, bridge age
        from diagnostic_msgs.msg import DiagnosticArray
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._received: Counter = Counter()
        self._last_plan: Plan | None = None
        self._diagnostics_t = self._now()
        self.create_timer(DIAGNOSTICS_PERIOD_S, self._publish_diagnostics)
        self._stop = threading.Event()
        self._reasoner_thread = threading.Thread(target=self._reasoner_loop, name="spanvla_reasoner", daemon=True)
        self._reasoner_thread.start()
        self.get_logger().info(f"model {self.policy.model_id}: reasoner {p['reasoner_rate_hz']} Hz, "
                               f"expert {p['control_rate_hz']} Hz, bridge layers {self.policy.reasoner.layer_ids}, "
                               f"fresh perception {'on' if self.core.fresh else 'off'}, reasoner "
                               + (f"process {self.reasoner_process.pid}" if self.reasoner_process else "in process"))

    def _declare_params(self) -> dict[str, Any]:
        """From params/spanvla.schema.yaml (descriptors, no defaults: the params file gives every value); changes
        at run time are checked against the schema and applied where the node can take them (not read-only)."""
        self.params = declare_from_schema(self, "spanvla_planner")
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        return self.params

    def _check_parameters(self, changes) -> SetParametersResult:
        reason = check_changes("spanvla_planner", self.params, changes)
        return SetParametersResult(successful=not reason, reason=reason)

    def _apply_parameters(self, changes) -> None:
        self.params.update({p.name: p.value for p in changes})
        self.core.set_params(PlannerParams.from_mapping(self.params))
        self.get_logger().info("parameters set: " + ", ".join(f"{p.name}={p.value}" for p in changes))

    def _publish_diagnostics(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        now = self._now()
        span = max(now - self._diagnostics_t, 1e-6)
        self._diagnostics_t = now
        plan, c = self._last_plan, self.counters
        if not self.core.odometry_fresh(now):
            level, message = DiagnosticStatus.ERROR, "not planning: odometry stale or missing"
        elif plan is None:
            level, message = DiagnosticStatus.WARN, "no plan yet"
        elif plan.degraded:
            level, message = DiagnosticStatus.WARN, f"plans degraded: {plan.reason}"
        else:
            level, message = DiagnosticStatus.OK, "planning"
        values: dict[str, object] = {f"{name} rate (Hz)": f"{self._received[name] / span:.1f}"
                  for name in (*self.core.cameras, "odometry")}
        values.update({"plans published": c["plans_published"], "plans degraded": c["plans_degraded"],
                       "plans limited (safety envelope)": c["plans_limited"],
                       "plans withheld (stale odometry)": c["plans_withheld_stale_odometry"],
                       "reasoner runs": c["reasoner_runs"], "dropped messages": self.bad_messages,
                       "reasoner process restarts": c["reasoner_process_restarts"],
                       "odometry jumps (histories restarted)": c["odometry_jumps"],
                       "bridge age (s)": f"{plan.bridge_age:.2f}" if plan else "-",
                       "perception age (s)": f"{plan.perception_age:.2f}" if plan else "-",
                       "model": self.policy.model_id})
        self._received.clear()
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: planning", message=message,
                                  hardware_id=self.params["device"],
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = sec_to_stamp(now)
        self.pub_diagnostics.publish(msg)

    def _now(self) -> float:
        """The node's clock in seconds: wall time, or the bag's / simulator's time under use_sim_time (/clock),
        so odometry staleness is judged on the time the data was recorded in."""
        return self.get_clock().now().nanoseconds * 1e-9

    # ------------------------------------------------------------------ inputs
    def _warn(self, key: str, message: str) -> None:
        """The core's warnings, throttled per kind (rclpy throttles per call site, which would let one kind
        of warning hide another)."""
        now = time.monotonic()
        if now - self._warned.get(key, -math.inf) >= 5.0:
            self._warned[key] = now
            self.get_logger().warning(message)

    def _bad(self, reason: str, detail: str, counted: bool = False) -> None:
        """A rejected input message: counted by reason (unless the core already did) and logged."""
        self.bad_messages += 1
        if not counted:
            self.counters[f"bad_{reason}"] += 1
        self.get_logger().warning(f"dropped message ({reason}): {detail}", throttle_duration_sec=2.0)

    def _on_image(self, camera: str, msg) -> None:
        try:
            img = decode_compressed_msg(msg) if isinstance(msg, CompressedImage) else decode_image_msg(msg)
        except ImageDecodeError as exc:
            self._bad(exc.reason, f"{camera}: {exc}")
            return
        self.core.add_image(camera, stamp_to_sec(msg.header.stamp), img)
        self._received[camera] += 1

    def _on_odom(self, msg: Odometry) -> None:
        if not self.core.add_odometry(*odometry_row(msg), msg.header.frame_id, self._now()):
            self.bad_messages += 1
            self.get_logger().warning("dropped message (odometry): non-finite pose or twist", throttle_duration_sec=2.0)
            return
        self._received["odometry"] += 1
        self._maybe_plan(0.5)

    def _maybe_plan(self, min_gap_periods: float) -> None:
        if time.monotonic() - self._last_plan_monotonic >= min_gap_periods * self._period:
            self._control()

    def _on_route(self, msg: Path) -> None:
        error = self.core.set_route(path_xy(msg), msg.header.frame_id)
        if error:
            self._bad("route", error, counted=True)
        else:
            n = 0 if self.core.route_xy is None else len(self.core.route_xy)
            self.get_logger().info(f"route: {n} poses in frame {msg.header.frame_id!r}")

    def _on_stop_lines(self, msg: Path) -> None:
        error = self.core.set_stop_lines(path_xy(msg), msg.header.frame_id)
        if error:
            self._bad("stop_lines", error, counted=True)
        else:
            n = 0 if self.core.stop_xy is None else len(self.core.stop_xy)
            self.get_logger().info(f"stop lines: {n} on the route, frame {msg.header.frame_id!r}")

    def _on_command(self, msg: String) -> None:
        error = self.core.set_command(msg.data)
        if error:
            self._bad("command", error, counted=True)

    def destroy_node(self):
        # the reasoner stops at its next decode step; a prefill (seconds for a 3B-class VLM on a CPU) is not
        # interruptible, so wait for it rather than let the interpreter exit with the thread inside torch
        if hasattr(self, "_reasoner_thread"):   # absent when construction failed (e.g. a missing parameter)
            self._stop.set()
            self._reasoner_thread.join()
        if getattr(self, "reasoner_process", None) is not None:
            self.reasoner_process.close()
        return super().destroy_node()

    # ------------------------------------------------------------------ reasoner (low rate, own thread)
    def _reasoner_loop(self) -> None:
        # the first run as soon as frames, odometry and the route are there (the lockstep loop's first run is at
        # its first step, with the route), without a route after one period; until the first bridge the safety
        # envelope holds the history-initialised plan to what the heads see (PlannerCore.plan)
        # after an odometry jump (PlannerCore.restart) the same: the next run as soon as the new place's frames are in
        next_t = time.monotonic()
        route_deadline = next_t + 1.0 / self.params["reasoner_rate_hz"]
        restarts_seen = 0
        while not self._stop.wait(min(REASONER_INPUT_POLL_S, max(0.0, next_t - time.monotonic()))):
            if self.core.counters["odometry_jumps"] != restarts_seen:
                restarts_seen, next_t = self.core.counters["odometry_jumps"], time.monotonic()
            if time.monotonic() < next_t:
                continue
            if self.policy.uses_route and self.core.route_xy is None and time.monotonic() < route_deadline:
                next_t = time.monotonic() + REASONER_INPUT_POLL_S
                continue
            scheduled = max(next_t + 1.0 / self.params["reasoner_rate_hz"], time.monotonic())   # set at run time
            try:
                ran = self._reason()
            except ReasoningCancelled:
                return
            except Exception as exc:  # a bad frame set must not kill the reasoner thread
                ran = True
                self.counters["reasoner_errors"] += 1
                self.get_logger().error(f"reasoner run failed: {exc!r}", throttle_duration_sec=2.0)
            next_t = scheduled if ran else time.monotonic() + REASONER_INPUT_POLL_S

    def _start_reasoner_process(self) -> ReasonerProcess:
        p = self.params
        return ReasonerProcess(self._reasoner_source, p["reasoner_torch_threads"], p["device"], p["dtype"])

    def _reason(self) -> bool:
        """One reasoner run and its bridge and messages; False when the inputs are not there yet."""
        if self.reasoner_process is not None and not self.reasoner_process.alive():
            # killed from outside (out of memory, a signal): plans go on from the last bridge, marked degraded
            # once it is stale, until a new process answers
            self.counters["reasoner_process_restarts"] += 1
            self.get_logger().error("the reasoner process exited; starting a new one")
            self.reasoner_process.close()
            self.reasoner_process = self._start_reasoner_process()
        r = self.core.reason(cancel=self._stop.is_set,
                             run=self.reasoner_process.reason if self.reasoner_process else None)
        if r is None:
            return False
        self.core.bridge.publish(r.bridge)
        self.reasoner_latencies.append(r.latency_s)
        msg = Reasoning()
        msg.header.stamp = sec_to_stamp(r.bridge.stamp)
        msg.header.frame_id = self.params["base_frame"]
        msg.text, msg.command = r.text, self.core.command
        msg.generation_latency = float(r.latency_s)
        msg.num_tokens, msg.num_vision_tokens = len(r.token_ids), r.num_vision_tokens
        msg.model_id = self.policy.model_id
        self.pub_reasoning.publish(msg)
        self.pub_reasoning_text.publish(String(data=r.text))
        return True

    # ------------------------------------------------------------------ action expert (control rate)
    def _control(self) -> None:
        self._last_plan_monotonic = time.monotonic()
        plan = self.core.plan(self._now())
        if plan is None:
            return
        self._last_plan = plan
        self.expert_latencies.append(plan.expert_latency_s)
        header_stamp = sec_to_stamp(plan.stamp)
        self.pub_path.publish(self._path_msg(plan.traj, plan.stamp))
        st = PlanStatus()
        st.header.stamp, st.header.frame_id = header_stamp, self.params["base_frame"]
        st.bridge_age = float(plan.bridge_age) if math.isfinite(plan.bridge_age) else -1.0
        st.perception_age = float(plan.perception_age)
        st.reasoner_latency = float(plan.bridge.latency_s) if plan.bridge else 0.0
        st.expert_latency = float(plan.expert_latency_s)
        st.flow_steps = int(self.params["flow_steps"])
        st.route_used = plan.route_used
        st.degraded, st.degraded_reason = plan.degraded, plan.reason
        st.limited_by = plan.limited_by
        st.plans_published, st.bad_messages = self.counters["plans_published"], self.bad_messages
        self.pub_status.publish(st)
        self.pub_markers.publish(self._markers(plan.traj, header_stamp, plan.degraded))

    def _path_msg(self, traj: np.ndarray, stamp: float) -> Path:
        """The plan in the base frame at its input time; each pose stamped with the time it is for (the plan's
        steps are ``dt`` apart), so the Path is time-parameterised on its own."""
        path = Path()
        path.header.stamp, path.header.frame_id = sec_to_stamp(stamp), self.params["base_frame"]
        for k, (x, y, h, _) in enumerate(traj):
            ps = PoseStamped()
            ps.header.stamp = sec_to_stamp(stamp + (k + 1) * self.policy.cfg.dt)
            ps.header.frame_id = path.header.frame_id
            ps.pose.position.x, ps.pose.position.y = float(x), float(y)
            w, qx, qy, qz = quat_from_yaw(float(h))
            ps.pose.orientation.w, ps.pose.orientation.x, ps.pose.orientation.y, ps.pose.orientation.z = w, qx, qy, qz
            path.poses.append(ps)
        return path

    def _markers(self, traj: np.ndarray, stamp, degraded: bool) -> MarkerArray:
        line = Marker()
        line.header.stamp, line.header.frame_id = stamp, self.params["base_frame"]
        line.ns, line.id, line.type, line.action = "plan", 0, Marker.LINE_STRIP, Marker.ADD
        line.scale.x = 0.3
        rgba = (1.0, 0.5, 0.0, 1.0) if degraded else (0.1, 1.0, 0.1, 1.0)
        line.color.r, line.color.g, line.color.b, line.color.a = rgba
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
        text.text = (self.core.last_reasoning or "(no reasoning yet)")[:120]
        return MarkerArray(markers=[line, text])
