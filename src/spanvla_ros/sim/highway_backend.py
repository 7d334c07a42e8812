"""highway-env backend (the embedded default world): real multi-agent traffic (IDM longitudinal + MOBIL lane
changes from highway-env) on highway, merge, roundabout and intersection roads, stepped at a fixed rate.

The ego is a highway-env vehicle whose ``act`` either applies the external Control (closed-loop driving by
the model through the tracking controller) or, with no control, drives itself with highway-env's IDM/MOBIL
plus a stop-line rule for our traffic light: that is the *expert* used to generate data. Other traffic does
not see the signal (highway-env's intersection yields by priority instead); only the ego is held to it.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np

from .camera import DEFAULT_APPEARANCE, DEFAULT_CAMERAS, Appearance, CameraRig
from .scenarios import Scenario, get
from .types import AgentState, Control, EgoState, Flags, Observation, TrafficLight, must_stop

MAX_BRAKE = 8.0
STOP_DT = 0.05   # the backend's sub-step
LIGHT_CYCLE = (("green", 7.0), ("yellow", 2.0), ("red", 7.0))
SIGNAL_PAST_LINE_M = 24.0    # highway-env's intersection is 22 m across (2 x outer distance 11 m)
SIGNAL_RIGHT_M = 2.5
APPEARANCE_STREAM = 1   # seeds the look's generator beside the episode seed


def _ego_class():
    from highway_env.vehicle.behavior import IDMVehicle

    class EgoVehicle(IDMVehicle):
        """IDM/MOBIL expert unless an external control is set."""
        external: Control | None = None
        stop_distance = None   # callable -> metres to a stop line the ego must respect, or None

        def act(self, action=None):
            if self.external is not None:
                steer = float(np.clip(self.external.steering, -self.MAX_STEERING_ANGLE, self.MAX_STEERING_ANGLE))
                self.action = {"acceleration": float(self.external.acceleration), "steering": steer}
            else:
                super().act()
                d = self.stop_distance() if self.stop_distance else None
                if d is not None:
                    self.action["acceleration"] = min(self.action["acceleration"], self.idm_to_stop(d))
            # brakes stop the car; they never drive it backwards (highway-env's model would)
            acc = max(float(self.action["acceleration"]), -MAX_BRAKE)
            if self.speed + acc * STOP_DT < 0.0:
                acc = -self.speed / STOP_DT
            self.action["acceleration"] = acc

        def take_over(self) -> None:
            """The expert drives from where an external driver left the car: its lane-following state (target lane,
            the route's remaining roads) still points where the expert last drove, and highway-env would steer
            back there or, finding a route that does not start at the current road, take a random exit."""
            self.external = None
            self.target_lane_index = self.lane_index
            route: list = list(getattr(self, "route", None) or [])
            roads = [r[:2] for r in route]
            if self.lane_index[:2] in roads:
                self.route = route[roads.index(self.lane_index[:2]):]

        def idm_to_stop(self, gap: float) -> float:
            v, v0 = max(self.speed, 0.0), max(self.target_speed, 1.0)
            braking = 2 * math.sqrt(self.COMFORT_ACC_MAX * -self.COMFORT_ACC_MIN)
            s_star = self.DISTANCE_WANTED + v * self.TIME_WANTED + v * v / braking
            return float(self.COMFORT_ACC_MAX * (1 - (v / v0) ** 4 - (s_star / max(gap, 0.1)) ** 2))

    return EgoVehicle


def _sample_lane(lane, ss: np.ndarray, centre: np.ndarray):
    """Centre, left and right edge points of a highway-env lane at arc lengths ss, and its widths there."""
    w = np.array([lane.width_at(x) for x in ss])
    left = np.array([lane.position(x, -wi / 2) for x, wi in zip(ss, w)])
    right = np.array([lane.position(x, wi / 2) for x, wi in zip(ss, w)])
    return centre, left, right, w


class HighwayEnvBackend:
    name = "highway-env"

    def __init__(self, cameras=DEFAULT_CAMERAS, control_dt: float = 0.1, substeps: int = 2, render: bool = True):
        self.rig = CameraRig(cameras)
        self.cameras = tuple(c.name for c in cameras)
        self.dt, self.substeps, self.render_images = control_dt, substeps, render
        self._envs: dict[str, Any] = {}
        # set by reset(); a backend is stepped only after it
        self.scenario: Scenario
        self.light_pose: tuple[float, float, float] | None = None
        self.look: Appearance = DEFAULT_APPEARANCE
        self._vid: dict[int, int] = {}

    @property
    def scenario_name(self) -> str:
        return self.scenario.name

    @property
    def target_speed_mps(self) -> float:
        return self.scenario.ego_target_speed

    # ------------------------------------------------------------------ episode
    def reset(self, scenario: str | Scenario, seed: int) -> Observation:
        import gymnasium as gym
        import highway_env  # noqa: F401  (registers the environments)

        sc = get(scenario) if isinstance(scenario, str) else scenario
        self.scenario, self.seed = sc, seed
        key = sc.name
        if key not in self._envs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._envs[key] = gym.make(sc.env_id, config=dict(sc.env_config))
        env = self._envs[key].unwrapped
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env.reset(seed=seed)
        self.env, self.road = env, env.road
        self.rng = np.random.default_rng(seed)
        # its own stream: the same seed gives the same traffic at every look
        self.look = (Appearance.sample(np.random.default_rng([seed, APPEARANCE_STREAM]))
                     if sc.appearance == "random" else DEFAULT_APPEARANCE)
        old = env.vehicle
        ego = _ego_class().create_from(old)
        ego.target_speed = sc.ego_target_speed * (1.0 + 0.1 * self.rng.uniform(-1, 1))
        if sc.destination:
            ego.plan_route_to(sc.destination)
        ego.enable_lane_change = sc.expert_changes_lanes
        self.road.vehicles[self.road.vehicles.index(old)] = ego
        env.vehicle, env.controlled_vehicles = ego, [ego]
        self.ego = ego
        self.t, self._prev_speed, self._prev_heading = 0.0, ego.speed, ego.heading
        self._build_route(sc)
        self._setup_event(sc)
        self._light_offset = float(self.rng.uniform(0, sum(d for _, d in LIGHT_CYCLE)))
        ego.stop_distance = self._stop_distance if sc.traffic_light else None
        self._red_violation = False
        self._vid.clear()
        return self._observe()

    def _build_route(self, sc: Scenario) -> None:
        net, ego = self.road.network, self.ego
        lane_index = ego.lane_index
        lane = net.get_lane(lane_index)
        s = max(0.0, lane.local_coordinates(ego.position)[0])
        pts: list[np.ndarray] = []
        self.stop_s: float | None = None
        total = 0.0
        for _ in range(20):
            ss = np.arange(s, lane.length, 1.0)
            pts.extend(lane.position(x, 0.0) for x in ss)
            total += max(0.0, lane.length - s)
            if sc.traffic_light and self.stop_s is None and lane_index[1].startswith("ir"):
                self.stop_s = total   # the approach lane ends at the stop line
            if total >= sc.route_length_m + 20:
                break
            nxt = net.next_lane(lane_index, route=list(ego.route or []) or None,
                                position=lane.position(lane.length, 0.0), np_random=self.rng)
            if nxt == lane_index:
                break
            lane_index, lane, s = nxt, net.get_lane(nxt), 0.0
        from shapely.geometry import LineString

        from .scene_map import stop_line_points

        self.route_xy = np.array(pts)
        self.route = LineString(self.route_xy)
        self.stop_lines_xy = stop_line_points(self.route, self.stop_s)
        self.route_length = min(sc.route_length_m, self.route.length - 5.0)
        heading = np.unwrap(np.arctan2(np.diff(self.route_xy[:, 1]), np.diff(self.route_xy[:, 0])))
        turn = heading[-1] - heading[0] if len(heading) else 0.0
        self.command = ("turn left" if turn > 0.6 else "turn right" if turn < -0.6 else
                        "go straight" if sc.traffic_light else "follow lane")
        if sc.traffic_light and self.stop_s is not None:
            p = np.array(self.route.interpolate(self.stop_s).coords[0])
            h = heading[min(int(self.stop_s), len(heading) - 1)]
            # A far-side signal, as real intersections place them: across the junction, right of the lane, where a
            # driver (and a forward camera) stopped at the line still sees it. (Earlier it stood 1 m past the line:
            # out of the camera's vertical field of view from the last ~6 m, so the colour was unknowable there.)
            ahead, right = SIGNAL_PAST_LINE_M, SIGNAL_RIGHT_M
            self.light_pose = (p[0] + ahead * math.cos(h) + right * math.sin(h),
                               p[1] + ahead * math.sin(h) - right * math.cos(h), h)
        else:
            self.light_pose = None

    def _setup_event(self, sc: Scenario) -> None:
        from highway_env.vehicle.behavior import IDMVehicle

        self.event_vehicle, self.event_time = None, None
        if sc.event not in ("cut_in", "lead_brake"):
            return
        ego, net = self.ego, self.road.network
        lane = net.get_lane(ego.lane_index)
        s_ego = lane.local_coordinates(ego.position)[0]
        for v in list(self.road.vehicles):  # clear the stage around the ego
            if v is not ego and abs(lane.local_coordinates(v.position)[0] - s_ego) < 60:
                self.road.vehicles.remove(v)
        if sc.event == "lead_brake":
            gap = self.rng.uniform(*(sc.event_gap_m or (25, 40)))
            v = IDMVehicle(self.road, lane.position(s_ego + gap, 0.0), heading=lane.heading_at(s_ego + gap),
                           speed=ego.speed * self.rng.uniform(0.85, 1.0), target_lane_index=ego.lane_index)
            v.enable_lane_change = False
            v.target_speed = v.speed
            self.event_time = self.rng.uniform(*(sc.event_time_s or (2.5, 5.0)))
        else:
            side = ego.lane_index[:2] + (ego.lane_index[2] + (1 if ego.lane_index[2] == 0 else -1),)
            side_lane = net.get_lane(side)
            gap = self.rng.uniform(*(sc.event_gap_m or (8, 16)))
            v = IDMVehicle(self.road, side_lane.position(s_ego + gap, 0.0), heading=side_lane.heading_at(s_ego + gap),
                           speed=ego.speed * self.rng.uniform(0.8, 0.95), target_lane_index=side)
            v.enable_lane_change = False
            v.target_speed = v.speed
            self.event_time = self.rng.uniform(*(sc.event_time_s or (1.5, 4.0)))
        self.road.vehicles.append(v)
        self.event_vehicle = v

    def _fire_event(self) -> None:
        v, sc = self.event_vehicle, self.scenario
        if v is None or self.event_time is None or self.t < self.event_time:
            return
        if sc.event == "lead_brake":
            v.target_speed = float(self.rng.uniform(*(sc.lead_brake_to_mps or (0.0, 4.0))))
            v.COMFORT_ACC_MIN = -6.0
        else:
            v.target_lane_index = self.ego.lane_index
        self.event_time = None

    # ------------------------------------------------------------------ stepping
    def light_state(self, t: float | None = None) -> str:
        t = (self.t if t is None else t) + self._light_offset
        t %= sum(d for _, d in LIGHT_CYCLE)
        for state, d in LIGHT_CYCLE:
            if t < d:
                return state
            t -= d
        return "red"

    def progress(self) -> float:
        from shapely.geometry import Point

        return float(self.route.project(Point(*self.ego.position)))

    def _stop_distance(self):
        if self.stop_s is None:
            return None
        gap = self.stop_s - self.progress() - self.ego.LENGTH / 2
        return max(gap, 0.1) if must_stop(self.light_state(), gap, self.ego.speed) else None

    def step(self, control: Control | None = None) -> Observation:
        ego = self.ego
        if control is None and ego.external is not None:
            ego.take_over()
        ego.external = control
        before = self.progress()
        for _ in range(self.substeps):
            self._fire_event()
            self.road.act()
            self.road.step(self.dt / self.substeps)
        self.t = round(self.t + self.dt, 6)
        after = self.progress()
        if (self.stop_s is not None and before + ego.LENGTH / 2 <= self.stop_s < after + ego.LENGTH / 2
                and self.light_state() == "red"):
            self._red_violation = True
        return self._observe()

    @property
    def duration_s(self) -> float:
        return self.scenario.duration_s

    def lateral_offset_m(self) -> float:
        lane = self.road.network.get_lane(self.ego.lane_index)
        return float(lane.local_coordinates(self.ego.position)[1])

    def stop_line_distance_m(self, obs: Observation) -> float | None:
        return None if self.stop_s is None else self.stop_s - obs.route_progress - obs.ego.length / 2

    def fork(self) -> HighwayEnvBackend:
        """An independent copy of the running episode (road, traffic, signal, event state) without rendering: what
        the expert would do from this exact state can be rolled out on it (DAgger labels) without touching this one."""
        memo = {id(self.rig): self.rig, id(self._envs): {}}
        clone = copy.deepcopy(self, memo)
        clone.render_images = False
        return clone

    def expert_control(self) -> Control:
        """The control the expert would apply now (for logging recovery behaviour)."""
        return Control(self.ego.action.get("acceleration", 0.0), self.ego.action.get("steering", 0.0))

    # ------------------------------------------------------------------ observation
    def lanes(self):
        return self.road.network.lanes_list()

    def _flags(self) -> Flags:
        ego = self.ego
        on, aligned = False, False
        for lane in self.lanes():
            if lane.on_lane(ego.position, margin=0.3):
                on = True
                s, _ = lane.local_coordinates(ego.position)
                if math.cos(ego.heading - lane.heading_at(s)) > 0.0:
                    aligned = True
                    break
        return Flags(collision=bool(ego.crashed), off_road=not on, wrong_way=on and not aligned,
                     red_light=self._red_violation)

    def _agents(self, radius=150.0) -> list[AgentState]:
        out = []
        for v in self.road.vehicles:
            if v is self.ego or np.linalg.norm(v.position - self.ego.position) > radius:
                continue
            vid = self._vid.setdefault(id(v), len(self._vid) + 1)
            out.append(AgentState(vid, float(v.position[0]), float(v.position[1]), float(v.heading), float(v.speed),
                                  float(v.LENGTH), float(v.WIDTH)))
        return out

    def _observe(self) -> Observation:
        ego = self.ego
        accel = (ego.speed - self._prev_speed) / self.dt if self.t > 0 else 0.0
        yaw_rate = math.remainder(ego.heading - self._prev_heading, 2 * math.pi) / self.dt if self.t > 0 else 0.0
        self._prev_speed, self._prev_heading = ego.speed, ego.heading
        es = EgoState(float(ego.position[0]), float(ego.position[1]), float(ego.heading), float(ego.speed),
                      float(accel), float(yaw_rate), float(ego.LENGTH), float(ego.WIDTH))
        agents = self._agents()
        light = None
        if self.light_pose is not None:
            light = TrafficLight(self.light_pose[0], self.light_pose[1], self.light_pose[2], self.light_state(),
                                 self.stop_s if self.stop_s is not None else math.nan)
        flags = self._flags()
        images = self.render(es, agents, light) if self.render_images else {}
        prog = self.progress()
        done = flags.collision or prog >= self.route_length or self.t >= self.duration_s - 1e-6
        return Observation(self.t, es, agents, images, flags, self.command, prog, self.route_length, light, done,
                           info={"scenario": self.scenario.name, "seed": self.seed})

    def lane_polylines_ego(self, ego: EgoState, window=(-30.0, 140.0)):
        c, s = math.cos(ego.heading), math.sin(ego.heading)
        origin = np.array([ego.x, ego.y])
        rot = np.array([[c, -s], [s, c]])   # world = rot @ ego
        out = []
        for lane in self.lanes():
            s0 = lane.local_coordinates(origin)[0]
            lo, hi = max(0.0, s0 + window[0]), min(lane.length, s0 + window[1])
            if hi - lo < 0.5:
                lo, hi = 0.0, min(lane.length, 200.0)
            ss = np.append(np.arange(lo, hi, 1.0), hi)
            centre = np.array([lane.position(x, 0.0) for x in ss])
            if np.linalg.norm(centre - origin, axis=1).min() > 160:
                continue   # out of sight: skip before sampling its edges (this runs every rendered frame)
            _, left, right, _ = _sample_lane(lane, ss, centre)
            out.append(((centre - origin) @ rot, (left - origin) @ rot, (right - origin) @ rot,
                        tuple(int(t) for t in lane.line_types)))
        return out

    def scene_map(self):
        """Static geometry of this episode for PDM-style scoring: drivable area, lanes near the route, route."""
        from shapely.geometry import LineString, Polygon

        from .scene_map import Lane, SceneMap, build_drivable

        lo, hi = self.route_xy.min(0) - 80.0, self.route_xy.max(0) + 80.0
        lanes, polys = [], []
        for lane in self.lanes():
            if lane.length > 1000.0:   # highway-env's straight roads are 10 km long: sample the episode's window
                s0 = lane.local_coordinates(self.route_xy[0])[0]
                ss = np.arange(max(0.0, s0 - 80.0), min(lane.length, s0 + self.route.length + 80.0), 2.0)
            else:
                ss = np.append(np.arange(0.0, lane.length, 1.0), lane.length)
            centre = np.array([lane.position(x, 0.0) for x in ss])
            keep = ((centre >= lo) & (centre <= hi)).all(1)
            if keep.sum() < 2:
                continue
            ss = ss[keep]
            centre, left, right, w = _sample_lane(lane, ss, centre[keep])
            polys.append(Polygon(np.concatenate([left, right[::-1]])).buffer(0))
            lanes.append(Lane(LineString(centre), np.array([lane.heading_at(x) for x in ss]), float(w.mean())))
        return SceneMap(build_drivable(polys), lanes, self.route, self.stop_s)

    def light_timeline(self, horizon_s: float, dt: float) -> dict[float, str]:
        if self.stop_s is None:
            return {}
        return {k * dt: self.light_state(self.t + k * dt) for k in range(int(round(horizon_s / dt)) + 1)}

    def render(self, ego: EgoState, agents, light, look: Appearance | None = None) -> dict[str, np.ndarray]:
        """The cameras' frames of this state, at the episode's look or at ``look`` (the same scene seen another
        way: data.look_pairs)."""
        look = self.look if look is None else look
        c, s = math.cos(ego.heading), math.sin(ego.heading)
        boxes = []
        for a in agents:
            dx, dy = a.x - ego.x, a.y - ego.y
            boxes.append((c * dx + s * dy, -s * dx + c * dy, a.heading - ego.heading, a.length, a.width, 1.5,
                          look.vehicle_rgb(a.id)))
        lt = None
        if light is not None:
            dx, dy = light.x - ego.x, light.y - ego.y
            lt = (c * dx + s * dy, -s * dx + c * dy, light.state)
        return self.rig.render(self.lane_polylines_ego(ego), boxes, lt, look, int(round(self.t / self.dt)))

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
