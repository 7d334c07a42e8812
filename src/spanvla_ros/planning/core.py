"""The planner core, free of ROS: what spanvla_planner does between its subscriptions and its publishers.

Like the planner cores of Autoware's planning nodes, the node only converts messages and publishes; the logic
lives here so that the lockstep closed loop (eval.closed_loop) and rosbag replay (which drives the node) run the
logic that ships:

* sensor buffers: camera frame sets (all cameras within a skew) at the history rate, odometry history;
* the reasoner's inputs and its bridge (LatestBridge: swapped whole, read without a lock);
* fresh perception: the perception heads read the front camera's newest frames at every plan;
* the route and its stop lines (used only in the odometry's frame), the driving command;
* the safety envelope (planning.envelope): the plan slowed where the heads' lead or light says it cannot stop;
* staleness: no plan from stale odometry, a plan from a stale bridge or stale front frames marked degraded;
* counters of everything dropped, withheld or degraded.

Every parameter comes from the caller (params/spanvla.yaml through the node, or the closed-loop tool): no
defaults here.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import fields_from
from ..data.sensor_buffers import EgoHistory, FrameHistory
from ..model.bridge import BridgeSnapshot, LatestBridge
from ..model.perception import Percept
from ..model.policy import FreshPerception, SpanVLAPolicy
from ..model.reasoner import ReasoningResult
from .envelope import EnvelopeParams, LeadSpeedFit, constrain, timed_by_speed


@dataclass(frozen=True)
class PlannerParams:
    history_frames: int
    history_rate_hz: float
    max_camera_skew_s: float
    odom_timeout_s: float          # odometry received, or stamped, longer ago than this (caller's clock): no plan
    odom_jump_m: float             # odometry farther than this beyond what its speed explains: the histories restart
    bridge_stale_s: float          # a bridge (or newest front frame) older than this: plan marked degraded
    flow_steps: int
    max_new_tokens: int
    fresh_perception: bool
    envelope: EnvelopeParams

    @classmethod
    def from_mapping(cls, params: Mapping) -> PlannerParams:
        return cls(**fields_from(cls, params, "planner", exclude=("envelope",)),
                   envelope=EnvelopeParams.from_mapping(params))


@dataclass
class Plan:
    traj: np.ndarray               # (horizon, 4) x, y, heading, speed in the ego frame at ``stamp``
    stamp: float                   # odometry time the plan starts from
    degraded: bool
    reason: str                    # why degraded ("" if not)
    bridge: BridgeSnapshot | None
    bridge_age: float              # stamp - the bridge's frame time (inf without a bridge)
    perception_age: float          # stamp - the newest front frame the heads read (-1: no fresh perception)
    route_used: bool
    expert_latency_s: float
    percept: Percept | None = None
    limited_by: str = ""           # what the safety envelope slowed the model's plan for ("" if nothing)


Warn = Callable[[str, str], None]   # (key for throttling, message)


class PlannerCore:
    def __init__(self, policy: SpanVLAPolicy, params: PlannerParams, cameras: Sequence[str],
                 warn: Warn | None = None):
        cfg = policy.cfg
        if len(cameras) != len(cfg.cameras):
            raise ValueError(f"the model reads {len(cfg.cameras)} cameras {cfg.cameras}, got {list(cameras)}")
        if params.history_frames != cfg.history_frames or not math.isclose(1.0 / params.history_rate_hz,
                                                                            cfg.history_dt):
            raise ValueError(f"the model was trained on {cfg.history_frames} frames at {1 / cfg.history_dt:g} Hz; "
                             f"params say {params.history_frames} at {params.history_rate_hz:g} Hz")
        self.policy, self.params, self.cameras = policy, params, tuple(cameras)
        self.frames = FrameHistory(self.cameras, params.history_frames, 1.0 / params.history_rate_hz,
                                   params.max_camera_skew_s)
        self.ego = EgoHistory(keep_s=cfg.history_dt * cfg.past_poses + 1.0)
        self.bridge = LatestBridge()
        self.fresh = FreshPerception(policy) if policy.reads_front_camera and params.fresh_perception else None
        self.lead_fit = LeadSpeedFit()
        self.front_camera = self.cameras[policy.reasoner.front_camera]
        self.command = cfg.commands[0]
        self.route_xy: np.ndarray | None = None
        self.route_frame = ""
        self.stop_xy: np.ndarray | None = None
        self.stop_frame = ""
        self.odom_frame = ""
        self._odom_received: float | None = None
        self._odom_stamp = -math.inf
        self.counters: Counter = Counter()
        self._restart_stamp = -math.inf
        self.last_reasoning = ""
        self._warn = warn or (lambda key, msg: None)

    def set_params(self, params: PlannerParams) -> None:
        """New values for what can change at run time (the node's read-only parameters are refused before this)."""
        self.params = params

    # ------------------------------------------------------------------ inputs
    def add_image(self, camera: str, stamp: float, image: np.ndarray) -> None:
        self.frames.add(camera, stamp, image)

    def add_odometry(self, stamp: float, x: float, y: float, yaw: float, speed: float, frame: str,
                     received: float) -> bool:
        """False (and counted) for a non-finite pose or speed; ``received`` is the caller's clock."""
        if not all(map(math.isfinite, (x, y, yaw, speed))):
            self.counters["bad_odometry"] += 1
            return False
        last = self.ego.latest_sample()
        if last is not None and stamp > last[0]:
            reachable = max(speed, last[4]) * (stamp - last[0]) + self.params.odom_jump_m
            if math.hypot(x - last[1], y - last[2]) > reachable:
                self.restart(stamp)
        self.ego.add(stamp, x, y, yaw, speed)
        self.odom_frame, self._odom_received, self._odom_stamp = frame, received, stamp
        return True

    def restart(self, stamp: float) -> None:
        """The car is somewhere its odometry could not have driven to (a simulator's new episode, a relocalisation):
        the frames, odometry, lead track and bridge from before ``stamp`` describe another place, so plans start
        again from ``stamp`` as at start-up (counted, logged)."""
        self.ego.clear()
        self.frames.drop_before(stamp)
        self.lead_fit = LeadSpeedFit()
        self._restart_stamp = stamp
        self.counters["odometry_jumps"] += 1
        self._warn("odometry_jump", f"odometry jumped at {stamp:.2f}: histories and bridge restart")

    def set_route(self, xy: np.ndarray, frame: str) -> str | None:
        """Use this route polyline; returns why not (and counts it) if it is unusable."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        if len(xy) < 2 or not np.isfinite(xy).all():
            self.counters["bad_route"] += 1
            return f"route needs >= 2 finite poses, got {len(xy)}"
        keep = np.concatenate([[True], np.linalg.norm(np.diff(xy, axis=0), axis=1) > 1e-3])   # drop repeats
        self.route_xy, self.route_frame = xy[keep], frame
        self.counters["routes_received"] += 1
        return None

    def set_stop_lines(self, xy: np.ndarray, frame: str) -> str | None:
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            self.counters["bad_stop_lines"] += 1
            return "non-finite stop line position"
        self.stop_xy, self.stop_frame = xy, frame
        self.counters["stop_lines_received"] += 1
        return None

    def set_command(self, command: str) -> str | None:
        if command not in self.policy.cfg.commands:
            self.counters["bad_command"] += 1
            return f"unknown command {command!r} (known: {self.policy.cfg.commands})"
        self.command = command
        return None

    # ------------------------------------------------------------------ reasoner (low rate)
    def reason(self, cancel: Callable[[], bool] | None = None,
               run: Callable[..., ReasoningResult] | None = None) -> ReasoningResult | None:
        """One reasoner run on the newest complete frame set; None (counted) while inputs are missing. The caller
        publishes ``result.bridge`` to ``self.bridge`` when it becomes available (at once in real time; after the
        modelled latency in lockstep). ``run`` takes ``SpanVLAPolicy.reason``'s arguments (a ReasonerProcess's
        ``reason``); the policy's own by default."""
        hist = self.frames.history()
        ego = self.ego.state(self.policy.cfg.past_poses, self.policy.cfg.history_dt)
        if hist is None or ego is None:
            self.counters["reasoner_waiting"] += 1
            missing = self.frames.missing_cameras()
            self._warn("reasoner_waiting", "reasoner waiting: " + (f"no frames from {missing}" if missing else
                                                                   "no complete frame set" if hist is None else
                                                                   "no odometry"))
            return None
        images, stamp = hist
        past, speed, accel, _, _ = ego
        route = self._route(for_plan=False)
        r = (run or self.policy.reason)(images, self.command, speed, accel, past, stamp=stamp,
                               max_new_tokens=self.params.max_new_tokens, route_xy=route, pose=self.ego.latest_pose(),
                               stop_xy=self._stop_lines(for_plan=False) if route is not None else None,
                               cancel=cancel)
        self.counters["reasoner_runs"] += 1
        self.last_reasoning = r.text
        return r

    # ------------------------------------------------------------------ action expert (control rate)
    def odometry_fresh(self, now: float) -> bool:
        """Odometry arrived within the timeout and is itself that recent by its stamp: a stopped source and a
        backlog of old messages (a loaded machine, a stalled transport) both stop plans. ``now`` is the caller's
        clock, the stamps' time base (wall time on a car, the bag's or simulator's time otherwise)."""
        timeout = self.params.odom_timeout_s
        return (self._odom_received is not None and now - self._odom_received <= timeout
                and now - self._odom_stamp <= timeout)

    def _route(self, for_plan: bool = True) -> np.ndarray | None:
        """The route if usable with the current odometry; a plan without one is counted and logged."""
        if not self.policy.uses_route:
            return None
        if self.route_xy is None:
            if for_plan:
                self.counters["plans_without_route"] += 1
                self._warn("no_route", "no route: planning from cameras only")
            return None
        if self.route_frame and self.odom_frame and self.route_frame != self.odom_frame:
            # no tf2 here: frames are not chained, so a route in another frame cannot be used
            if not for_plan:
                return None
            self.counters["plans_without_route"] += 1
            self._warn("route_frame", f"route frame {self.route_frame!r} != odometry frame {self.odom_frame!r}: "
                                      "route ignored")
            return None
        return self.route_xy

    def _stop_lines(self, for_plan: bool = True) -> np.ndarray | None:
        if not self.policy.cfg.traffic_lights:
            return None
        if self.stop_xy is None or (self.stop_frame and self.route_frame and self.stop_frame != self.route_frame):
            if not for_plan:
                return None
            self.counters["plans_without_stop_lines"] += 1
            self._warn("no_stop_lines", "no stop lines in the route's frame: planning without them")
            return None
        return self.stop_xy

    def _crossing_views(self):
        """Every camera's newest frames' tokens for a crossing-traffic model whose yield is on (the head costs two
        side-camera encodes per frame set), None otherwise or while a camera has no frame."""
        if self.fresh is None or not (self.policy.cfg.crossing_perception and self.params.envelope.crossing_yield):
            return None
        histories = [(cam, self.frames.camera_history(cam)) for cam in self.cameras]
        if any(h is None for _, h in histories):
            return None
        return self.fresh.crossing_views(histories)

    def plan(self, now: float) -> Plan | None:
        """A plan from the newest odometry, or None (counted) when the odometry is stale or missing."""
        if not self.odometry_fresh(now):
            self.counters["plans_withheld_stale_odometry"] += 1
            self._warn("stale_odometry", "not planning: odometry is stale or missing")
            return None
        past, speed, accel, yaw_rate, stamp = self.ego.state(self.policy.cfg.past_poses, self.policy.cfg.history_dt)
        route = self._route()
        bridge = self.bridge.latest()
        if bridge is not None and bridge.stamp < self._restart_stamp:
            bridge = None    # a run on frames from before an odometry jump (restart)
        t0 = time.perf_counter()
        perception_age = -1.0
        percept = None
        front = None
        if self.fresh is not None:
            hist = self.frames.camera_history(self.front_camera)
            if hist is not None:
                front = self.fresh.tokens(*hist, camera=self.front_camera)
                perception_age = stamp - hist[1][-1]
        pose = self.ego.latest_pose()
        assert pose is not None    # the odometry is fresh
        if bridge is None:
            traj = self.policy.history_init(past, speed)
            degraded, reason, age = True, "no bridge yet: history-initialised trajectory only", math.inf
            if front is not None:
                # the reasoner's first bridge is a second or more away at start-up; the envelope already holds
                # the history-initialised plan to what the heads see in the newest frames
                percept = self.policy.perceive(front, speed, accel, yaw_rate, self.command, route_xy=route,
                                               pose=pose, stop_xy=self._stop_lines() if route is not None else None)
        else:
            traj, percept = self.policy.plan_perceived(
                bridge, past, speed, accel, yaw_rate, self.command, steps=self.params.flow_steps, route_xy=route,
                pose=pose, stop_xy=self._stop_lines() if route is not None else None, front=front,
                crossing=self._crossing_views())
            age = stamp - bridge.stamp
            stale = self.params.bridge_stale_s
            reason = (f"bridge stale: {age:.2f} s > {stale:.2f} s" if age > stale else
                      f"front camera stale: {perception_age:.2f} s > {stale:.2f} s" if perception_age > stale else "")
            degraded = bool(reason)
        # nothing perceived (no bridge and no fresh frames): the envelope leaves the plan as it is
        percept = self.lead_fit.update(stamp, pose, speed, percept, self.params.envelope)
        traj = timed_by_speed(traj, self.policy.cfg.dt, speed)
        traj, limited_by = constrain(traj, self.policy.cfg.dt, speed, percept, self.params.envelope,
                                     perception_age if front is not None else age)
        if limited_by:
            self.counters["plans_limited"] += 1
        self.counters["plans_published"] += 1
        self.counters["plans_degraded"] += int(degraded)
        return Plan(traj, stamp, degraded, reason, bridge, age, perception_age,
                    route is not None and bridge is not None, time.perf_counter() - t0, percept, limited_by)
