"""CARLA backend against the real `carla==0.9.16` client API (needs a CARLA server; none runs on this machine).

Synchronous mode with a fixed time step: the server advances only on ``world.tick()``; every sensor callback
goes into a queue and is matched to the tick by frame number (older frames are dropped, a missing one raises).
Ego + 3 RGB cameras (front, front-left, front-right) + collision sensor; route from the map's waypoints;
vehicle control from the tracking controller (acceleration/steering angle -> throttle/brake/steer); with no
control the ego is driven by the Traffic Manager (the expert, for data).

CARLA is left-handed (y right, yaw clockwise, degrees); everything here is converted to the right-handed
frame the rest of the stack uses (y left, yaw CCW, radians).
"""
from __future__ import annotations

import math
import os
import queue
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..geometry import from_carla_xy, from_carla_yaw, to_carla_location, to_carla_yaw
from ..model.route import route_command
from .camera import DEFAULT_CAMERAS, CameraSpec
from .routes import RouteSpec
from .types import AgentState, Control, EgoState, Flags, Observation, TrafficLight

DEFAULT_MAX_STEER_RAD = math.radians(70.0)   # used only when the vehicle does not report its own
DEFAULT_SPEED_LIMIT_KMH = 30.0
LIGHT_RANGE_M = 50.0   # a stop line this far ahead on the route puts its light in the observation


TM_PATH_EVERY = 5      # route points (2 m apart) per Traffic Manager path location
ROUTE_WAYPOINT_REACHED_M = 3.0       # a route file's waypoint is passed when the lane route comes this near
ROUTE_MIN_AVERAGE_SPEED_MPS = 2.0    # time allowed for a route file's route: its length at this average speed


class CarlaSyncError(RuntimeError):
    pass


class CarlaBackend:
    name = "carla"

    def __init__(self, host: str | None = None, port: int | None = None, town: str | None = None,
                 cameras: tuple[CameraSpec, ...] = DEFAULT_CAMERAS, control_dt: float = 0.1, num_traffic: int = 20,
                 route_length_m: float = 300.0, duration_s: float = 60.0, carla_module=None, timeout_s: float = 10.0):
        self.carla = carla_module or __import__("carla")
        self.host = host or os.environ.get("CARLA_HOST", "localhost")
        self.port = int(port or os.environ.get("CARLA_PORT", "2000"))
        self.client = self.carla.Client(self.host, self.port)
        self.client.set_timeout(timeout_s)
        self.world = self.client.load_world(town) if town else self.client.get_world()
        self.cameras = tuple(c.name for c in cameras)
        self.camera_specs = cameras
        self.rig = SimpleNamespace(cameras=cameras)   # same shape as the highway backend's camera rig
        self.dt, self.num_traffic = control_dt, num_traffic
        self.route_length, self._duration = route_length_m, duration_s
        self._episode_duration = duration_s
        self._original_settings = self.world.get_settings()
        self._actors: list[Any] = []
        self._queues: dict[str, Any] = {}
        self._prev: tuple[float, float] | None = None   # (yaw, speed) of the last observation
        self.ego: Any = None
        self.max_steer_rad = DEFAULT_MAX_STEER_RAD
        self.route: Any = None                           # shapely LineString of the episode's route, once reset
        self.tm = self.client.get_trafficmanager()

    @property
    def target_speed_mps(self) -> float:
        """The ego's current speed limit (the Traffic Manager drives at it), else 30 km/h (towns' default)."""
        limit = self.ego.get_speed_limit() if self.ego is not None and hasattr(self.ego, "get_speed_limit") else 0.0
        return (limit or DEFAULT_SPEED_LIMIT_KMH) / 3.6

    @property
    def duration_s(self) -> float:
        return self._episode_duration

    # ------------------------------------------------------------------ setup
    def _sync(self, on: bool) -> None:
        s = self.world.get_settings()
        s.synchronous_mode = on
        s.fixed_delta_seconds = self.dt if on else None
        self.world.apply_settings(s)
        self.tm.set_synchronous_mode(on)

    def reset(self, scenario, seed: int) -> Observation:
        """One episode: ``scenario`` a leaderboard route (sim.routes.RouteSpec: its town, weather, start and
        waypoints) or a name (a random spawn point and the road ahead of it); ``seed`` places the traffic."""
        c = self.carla
        self._destroy()
        route = scenario if isinstance(scenario, RouteSpec) else None
        if route is not None and route.town and not self.world.get_map().name.endswith(route.town):
            self.world = self.client.load_world(route.town)
        self._sync(True)
        self.tm.set_random_device_seed(seed)
        self.scenario_name = route.name if route else str(getattr(scenario, "name", scenario))
        self.seed = seed
        rng = np.random.default_rng(seed)
        cmap = self.world.get_map()
        spawns = cmap.get_spawn_points()
        lib = self.world.get_blueprint_library()
        if route is not None:
            if route.weather:
                self.world.set_weather(c.WeatherParameters(**route.weather))
            start = cmap.get_waypoint(c.Location(*route.waypoints[0])).transform
            loc = start.location
            ego_tf = c.Transform(c.Location(x=loc.x, y=loc.y, z=loc.z + 0.5), start.rotation)
        else:
            ego_tf = spawns[int(rng.integers(len(spawns)))]
        self.ego = self.world.spawn_actor(lib.find("vehicle.lincoln.mkz_2020"), ego_tf)
        self._actors.append(self.ego)
        # steer in [-1, 1] maps onto the vehicle's own maximum front-wheel angle (degrees in its physics control)
        wheels = getattr(self.ego.get_physics_control(), "wheels", None) if hasattr(self.ego, "get_physics_control") \
            else None
        self.max_steer_rad = math.radians(wheels[0].max_steer_angle) if wheels else DEFAULT_MAX_STEER_RAD
        for cam in self.camera_specs:
            bp = lib.find("sensor.camera.rgb")
            bp.set_attribute("image_size_x", str(cam.width))
            bp.set_attribute("image_size_y", str(cam.height))
            bp.set_attribute("fov", str(math.degrees(cam.hfov)))
            tf = c.Transform(c.Location(x=cam.x, z=cam.z), c.Rotation(yaw=to_carla_yaw(cam.yaw)))
            self._attach(cam.name, bp, tf)
        self._attach("collision", lib.find("sensor.other.collision"), c.Transform())
        others = [s for s in spawns if math.hypot(s.location.x - ego_tf.location.x,
                                                   s.location.y - ego_tf.location.y) > 10.0]
        for i in rng.permutation(len(others))[: self.num_traffic]:
            v = self.world.try_spawn_actor(lib.find("vehicle.audi.a2"), others[int(i)])
            if v is not None:
                v.set_autopilot(True, self.tm.get_port())
                self._actors.append(v)
        self.t, self._collided, self._red = 0.0, False, False
        self._bumper_s: float | None = None   # the front bumper's route arc length at the last observation
        self._prev = None
        self.frame = self.world.tick()
        self._build_route(cmap, route)
        return self._observe(self._collect(self.frame))

    def _attach(self, name, bp, tf) -> None:
        sensor = self.world.spawn_actor(bp, tf, attach_to=self.ego)
        q: queue.Queue = queue.Queue()
        sensor.listen(q.put)
        self._queues[name] = q
        self._actors.append(sensor)

    def _build_route(self, cmap, spec: RouteSpec | None = None) -> None:
        """The lane-level route from the ego's waypoint, 2 m apart: through a route file's waypoints (at each
        branch the successor nearest the next one; done at the last), else straight on for route_length_m."""
        wp = cmap.get_waypoint(self.ego.get_location())
        targets = [(x, y) for x, y, _ in spec.waypoints[1:]] if spec else []
        limit = (sum(math.dist(a[:2], b[:2]) for a, b in zip(spec.waypoints, spec.waypoints[1:])) * 2 + 100
                 if spec else self.route_length + 20)

        def dist(w, target) -> float:
            return math.hypot(w.transform.location.x - target[0], w.transform.location.y - target[1])

        pts, junctions, total = [], [], 0.0
        while total < limit:
            loc = wp.transform.location
            pts.append(from_carla_xy(loc.x, loc.y))
            if getattr(wp, "is_junction", False):
                junctions.append(total)
            while targets and dist(wp, targets[0]) < ROUTE_WAYPOINT_REACHED_M:
                targets.pop(0)
            if spec and not targets:
                break
            nxt = wp.next(2.0)
            if not nxt:
                break
            wp = min(nxt, key=lambda w: dist(w, targets[0])) if targets else nxt[0]
            total += 2.0
        from shapely.geometry import LineString
        self.route_xy = np.array(pts)
        self.route = LineString(self.route_xy) if len(pts) > 1 else None
        self.route_length_m = total if spec else min(self.route_length, total)
        # a route file's route is as long as it is: the time allowed grows with it (at least the configured one)
        self._episode_duration = max(self._duration, total / ROUTE_MIN_AVERAGE_SPEED_MPS) if spec \
            else self._duration
        self._junction_s = np.array(junctions)
        self.command = route_command(self.route_xy, 0.0, self._junction_s) if self.route is not None else "follow lane"
        self.stop_lines_xy = self._route_stop_lines()
        if self.route is not None:
            # the Traffic Manager drives the expert (no control): it follows this route, not random junction
            # branches, and keeps its lane (as the leaderboard's route following does)
            self.tm.set_path(self.ego, [to_carla_location(self.carla, x, y) for x, y in
                                        self.route_xy[::TM_PATH_EVERY]])
            self.tm.auto_lane_change(self.ego, False)

    def _route_stop_lines(self) -> np.ndarray:
        """Stop lines of the traffic lights whose stop waypoints lie on the route (within half a lane); keeps each
        one's arc length and light (self._stops) for the red-light test and the light observation."""
        from shapely.geometry import Point

        self._stops: list[tuple[float, Any]] = []
        if self.route is None:
            return np.zeros((0, 2))
        on_route = []   # (arc length, point, light)
        for tl in self.world.get_actors().filter("traffic.traffic_light*"):
            for w in tl.get_stop_waypoints():
                p = from_carla_xy(w.transform.location.x, w.transform.location.y)
                if self.route.distance(Point(p)) < 1.75:
                    on_route.append((float(self.route.project(Point(p))), p, tl))
        on_route.sort(key=lambda stop: stop[0])
        self._stops = [(s, tl) for s, _, tl in on_route]
        return np.array([p for _, p, _ in on_route]).reshape(-1, 2)

    def _next_stop(self, bumper_s: float | None) -> tuple[float, Any] | None:
        """The first route stop line (arc length, light) not yet passed by the front bumper."""
        return next(((s, tl) for s, tl in self._stops if bumper_s is None or s >= bumper_s - 1.0), None)

    @staticmethod
    def _light_state(tl) -> str | None:
        """"red" / "yellow" / "green"; None for a light that is off or unknown (not an infraction to pass)."""
        state = str(tl.get_state()).split(".")[-1].lower()
        return state if state in ("red", "yellow", "green") else None

    # ------------------------------------------------------------------ stepping
    def _collect(self, frame: int) -> dict:
        """Sensor data of exactly this frame; older frames in the queues are discarded."""
        out = {}
        for name, q in self._queues.items():
            if name == "collision":
                while not q.empty():
                    ev = q.get_nowait()
                    if ev.frame <= frame:
                        self._collided = True
                continue
            while True:
                try:
                    data = q.get(timeout=2.0)
                except queue.Empty:
                    raise CarlaSyncError(f"camera {name} delivered no image for frame {frame}") from None
                if data.frame == frame:
                    out[name] = data
                    break
                if data.frame > frame:
                    raise CarlaSyncError(f"camera {name} is ahead: frame {data.frame} > {frame}")
        return out

    def step(self, control: Control | None = None) -> Observation:
        c = self.carla
        if control is None:
            self.ego.set_autopilot(True, self.tm.get_port())
        else:
            self.ego.set_autopilot(False, self.tm.get_port())
            acc = float(control.acceleration)
            steer = float(np.clip(-control.steering / self.max_steer_rad, -1.0, 1.0))   # CARLA: right > 0
            self.ego.apply_control(c.VehicleControl(throttle=float(np.clip(acc / 3.0, 0.0, 1.0)),
                                                    brake=float(np.clip(-acc / 8.0, 0.0, 1.0)), steer=steer))
        self.frame = self.world.tick()
        self.t = round(self.t + self.dt, 6)
        return self._observe(self._collect(self.frame))

    # ------------------------------------------------------------------ observation
    def _observe(self, data: dict) -> Observation:
        c = self.carla
        tf, vel = self.ego.get_transform(), self.ego.get_velocity()
        (x, y), yaw = from_carla_xy(tf.location.x, tf.location.y), from_carla_yaw(tf.rotation.yaw)
        speed = math.hypot(vel.x, vel.y)
        if self._prev is None:
            accel = yaw_rate = 0.0
        else:
            accel = (speed - self._prev[1]) / self.dt
            yaw_rate = math.remainder(yaw - self._prev[0], 2 * math.pi) / self.dt
        self._prev = (yaw, speed)
        ext = self.ego.bounding_box.extent
        ego = EgoState(x, y, yaw, speed, accel, yaw_rate, 2 * ext.x, 2 * ext.y)
        images = {}
        for name in self.cameras:
            img = data.get(name)
            if img is not None:
                bgra = np.frombuffer(img.raw_data, np.uint8).reshape(img.height, img.width, 4)
                images[name] = np.ascontiguousarray(bgra[:, :, 2::-1])
        agents = []
        for a in self.world.get_actors().filter("vehicle.*"):
            if a.id == self.ego.id:
                continue
            at, av, ae = a.get_transform(), a.get_velocity(), a.bounding_box.extent
            ax, ay = from_carla_xy(at.location.x, at.location.y)
            agents.append(AgentState(a.id, ax, ay, from_carla_yaw(at.rotation.yaw), math.hypot(av.x, av.y),
                                     2 * ae.x, 2 * ae.y))
        cmap = self.world.get_map()
        wp = cmap.get_waypoint(tf.location, project_to_road=False, lane_type=c.LaneType.Driving)
        off_road = wp is None
        # as CARLA's wrong-lane criterion: not inside junctions, where overlapping lanes give an arbitrary one
        wrong_way = (not off_road and not getattr(wp, "is_junction", False)
                     and math.cos(math.radians(wp.transform.rotation.yaw - tf.rotation.yaw)) < 0)
        progress, light = 0.0, None
        if self.route is not None:
            from shapely.geometry import Point
            progress = float(self.route.project(Point(x, y)))
            self.command = route_command(self.route_xy, progress, self._junction_s)
            # CARLA's RunningRedLightTest: the front bumper crosses a stop line while its light is red (not "inside
            # the trigger box while red": that box lies before the line, where a correct stop happens)
            bumper = progress + ext.x
            for stop_s, tl in self._stops:
                if self._bumper_s is not None and self._bumper_s < stop_s <= bumper \
                        and self._light_state(tl) == "red":
                    self._red = True
            self._bumper_s = bumper
            stop = self._next_stop(bumper)
            state = self._light_state(stop[1]) if stop and stop[0] - bumper < LIGHT_RANGE_M else None
            if stop and state is not None:
                sx, sy = self.route.interpolate(stop[0]).coords[0]
                light = TrafficLight(sx, sy, yaw, state, stop[0])
        flags = Flags(self._collided, off_road, wrong_way, self._red)
        done = self._collided or progress >= self.route_length_m or self.t >= self.duration_s
        return Observation(self.t, ego, agents, images, flags, self.command, progress, self.route_length_m, light, done,
                           info={"frame": self.frame, "scenario": self.scenario_name, "seed": self.seed})

    def scene_map(self):
        """Drivable area and lanes along the route, from the map's waypoints (for PDM-style scoring)."""
        from shapely.geometry import LineString, Polygon

        from .scene_map import Lane, SceneMap, build_drivable

        cmap = self.world.get_map()
        polys, lanes = [], []
        for px, py in self.route_xy[::5]:
            wp = cmap.get_waypoint(to_carla_location(self.carla, px, py, 0.0))
            for w in (wp, wp.get_left_lane(), wp.get_right_lane()):
                if w is None or w.lane_type != self.carla.LaneType.Driving:
                    continue
                nxt = w.next(5.0)
                if not nxt:
                    continue
                a, b = w.transform.location, nxt[0].transform.location
                (ax, ay), (bx, by) = from_carla_xy(a.x, a.y), from_carla_xy(b.x, b.y)
                h = math.atan2(by - ay, bx - ax)
                half = w.lane_width / 2
                dx, dy = -math.sin(h) * half, math.cos(h) * half
                polys.append(Polygon([(ax + dx, ay + dy), (bx + dx, by + dy), (bx - dx, by - dy), (ax - dx, ay - dy)]))
                lanes.append(Lane(LineString([(ax, ay), (bx, by)]), np.array([h, h]), w.lane_width))
        return SceneMap(build_drivable(polys), lanes, self.route, self._stops[0][0] if self._stops else None)

    def lateral_offset_m(self) -> float:
        tf = self.ego.get_transform()
        wp = self.world.get_map().get_waypoint(tf.location)
        if wp is None:
            return 0.0
        c = wp.transform.location
        h = from_carla_yaw(wp.transform.rotation.yaw)
        (ex, ey), (cx, cy) = from_carla_xy(tf.location.x, tf.location.y), from_carla_xy(c.x, c.y)
        dx, dy = ex - cx, ey - cy
        return -math.sin(h) * dx + math.cos(h) * dy

    def stop_line_distance_m(self, obs: Observation) -> float | None:
        stop = self._next_stop(self._bumper_s)
        return None if stop is None or self._bumper_s is None else stop[0] - self._bumper_s

    def light_timeline(self, horizon_s: float, dt: float) -> dict:
        """The next light's state over the horizon, held as it is now: CARLA does not expose a light's schedule to
        a client, so a change within the horizon is not foreseen (PDM traffic-light compliance then scores the
        plan against the light as seen)."""
        stop = self._next_stop(self._bumper_s)
        state = self._light_state(stop[1]) if stop else None
        if state is None:
            return {}
        return {round(k * dt, 6): state for k in range(int(round(horizon_s / dt)) + 1)}

    def _destroy(self) -> None:
        for a in reversed(self._actors):
            if hasattr(a, "stop"):
                a.stop()
            a.destroy()
        self._actors, self._queues = [], {}

    def close(self) -> None:
        self._destroy()
        self.world.apply_settings(self._original_settings)
        self.tm.set_synchronous_mode(False)
