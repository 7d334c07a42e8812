"""A duck-typed stand-in for the `carla` module (0.9.16 API subset the backend uses): a straight two-lane road
along +x, synchronous ticking, sensors that deliver per frame (plus a stale frame first, to check matching),
and a log of every call the tests assert on."""
from __future__ import annotations

import enum
import math
import random
import threading
import time
from types import SimpleNamespace

import numpy as np


class Location:
    def __init__(self, x=0.0, y=0.0, z=0.0):
        self.x, self.y, self.z = x, y, z


class Rotation:
    def __init__(self, pitch=0.0, yaw=0.0, roll=0.0):
        self.pitch, self.yaw, self.roll = pitch, yaw, roll


class Transform:
    def __init__(self, location=None, rotation=None):
        self.location, self.rotation = location or Location(), rotation or Rotation()


class Vector3D(Location):
    pass


class VehicleControl:
    def __init__(self, throttle=0.0, steer=0.0, brake=0.0):
        self.throttle, self.steer, self.brake = throttle, steer, brake


class LaneType:
    Driving = "Driving"


class TrafficLightState(enum.Enum):
    """An enum as carla.TrafficLightState is (str() gives "TrafficLightState.Red")."""
    Red, Yellow, Green, Off, Unknown = range(5)


JUNCTION_X = (600.0, 630.0)   # the straight road crosses a junction here


class Waypoint:
    def __init__(self, x, lane):
        self.transform = Transform(Location(x, -3.5 * lane), Rotation(yaw=0.0))
        self.lane_width, self.lane_type, self.lane = 3.5, LaneType.Driving, lane
        self.is_junction = JUNCTION_X[0] <= x <= JUNCTION_X[1]

    def next(self, d):
        return [Waypoint(self.transform.location.x + d, self.lane)] if self.transform.location.x < 1000 else []

    def get_left_lane(self):
        return Waypoint(self.transform.location.x, self.lane - 1) if self.lane > 0 else None

    def get_right_lane(self):
        return Waypoint(self.transform.location.x, self.lane + 1) if self.lane < 1 else None


class Map:
    name = "Carla/Maps/Town01"

    def get_spawn_points(self):
        return [Transform(Location(10.0 + 30 * i, -3.5 * (i % 2)), Rotation()) for i in range(6)]

    def get_waypoint(self, loc, project_to_road=True, lane_type=None):
        lane = int(round(-loc.y / 3.5))
        if not project_to_road and (abs(loc.y + 3.5 * lane) > 1.75 or lane not in (0, 1)):
            return None
        return Waypoint(loc.x, min(max(lane, 0), 1))


MAX_STEER_DEG = 55.0   # not CARLA's common 70: a backend that assumes 70 steers this car wrongly


class Actor:
    _next_id = 1

    def __init__(self, world, bp, tf, parent=None):
        self.world, self.bp, self.parent = world, bp, parent
        self.id = Actor._next_id
        Actor._next_id += 1
        self.tf = Transform(Location(tf.location.x, tf.location.y, tf.location.z), Rotation(yaw=tf.rotation.yaw))
        self.speed, self.destroyed, self.callback, self.autopilot = 0.0, False, None, False
        self.controls = []
        self.bounding_box = SimpleNamespace(extent=Vector3D(2.4, 1.0, 0.8))
        self.type_id = bp.id

    def get_transform(self):
        return self.tf

    def get_location(self):
        return self.tf.location

    def get_velocity(self):
        yaw = math.radians(self.tf.rotation.yaw)
        return Vector3D(self.speed * math.cos(yaw), self.speed * math.sin(yaw), 0.0)

    def listen(self, cb):
        self.callback = cb

    def stop(self):
        self.callback = None

    def destroy(self):
        self.destroyed = True
        self.world.actors.remove(self)

    def set_autopilot(self, on, port=None):
        self.autopilot = on
        self.world.log.append(("autopilot", self.id, on))

    def apply_control(self, ctrl):
        self.controls.append(ctrl)
        self.world.log.append(("control", self.id, ctrl.throttle, ctrl.steer, ctrl.brake))

    def get_physics_control(self):
        """Like carla.VehiclePhysicsControl: the front wheels' max steer angle in degrees (vehicle-specific)."""
        return SimpleNamespace(wheels=[SimpleNamespace(max_steer_angle=MAX_STEER_DEG)] * 4)

    def _light_box(self):
        """As in CARLA, a light's trigger box lies before its stop line (here the last 15 m of the approach)."""
        front = self.tf.location.x + self.bounding_box.extent.x
        return next((tl for tl in self.world.traffic_lights if 0.0 <= tl.x - front <= 15.0), None)

    def is_at_traffic_light(self):
        return self._light_box() is not None

    def get_traffic_light_state(self):
        tl = self._light_box()
        return tl.state if tl else TrafficLightState.Green


class Blueprint:
    def __init__(self, id):
        self.id, self.attributes = id, {}

    def set_attribute(self, k, v):
        self.attributes[k] = v


class BlueprintLibrary:
    def find(self, id):
        return Blueprint(id)


class Settings:
    def __init__(self):
        self.synchronous_mode, self.fixed_delta_seconds = False, None


class ActorList(list):
    def filter(self, pattern):
        prefix = pattern.rstrip("*")
        return ActorList(a for a in self if a.type_id.startswith(prefix))


class TrafficLight:
    """A map actor (never destroyed by the backend) with a stop waypoint on each of the two lanes at x."""
    type_id = "traffic.traffic_light"

    def __init__(self, x):
        self.x, self.state = x, TrafficLightState.Green

    def get_state(self):
        return self.state

    def get_stop_waypoints(self):
        return [Waypoint(self.x, lane) for lane in (0, 1)]


class World:
    def __init__(self):
        self.settings, self.frame, self.actors, self.log = Settings(), 100, ActorList(), []
        self.traffic_lights = [TrafficLight(300.0)]
        self.collide_at_frame = None
        self.tm: TrafficManager | None = None

    def get_settings(self):
        s = Settings()
        s.synchronous_mode, s.fixed_delta_seconds = self.settings.synchronous_mode, self.settings.fixed_delta_seconds
        return s

    def apply_settings(self, s):
        self.settings = s
        self.log.append(("settings", s.synchronous_mode, s.fixed_delta_seconds))

    def get_map(self):
        return Map()

    def set_weather(self, weather):
        self.log.append(("weather", weather))

    def get_blueprint_library(self):
        return BlueprintLibrary()

    def spawn_actor(self, bp, tf, attach_to=None):
        """As CARLA's: a vehicle cannot be spawned where another one stands (RuntimeError)."""
        if attach_to is None and bp.id.startswith("vehicle") and any(
                a.parent is None and a.type_id.startswith("vehicle")
                and math.hypot(a.tf.location.x - tf.location.x, a.tf.location.y - tf.location.y) < 3.0
                for a in self.actors):
            raise RuntimeError("Spawn failed because of collision at spawn position")
        a = Actor(self, bp, tf, attach_to)
        self.actors.append(a)
        return a

    def try_spawn_actor(self, bp, tf):
        try:
            return self.spawn_actor(bp, tf)
        except RuntimeError:
            return None

    def get_actors(self):
        return ActorList(self.actors + self.traffic_lights)

    def tick(self):
        assert self.settings.synchronous_mode, "tick() outside synchronous mode"
        dt = self.settings.fixed_delta_seconds
        for a in self.actors:
            if a.parent is None and a.type_id.startswith("vehicle"):
                if a.controls and not a.autopilot:
                    c = a.controls[-1]
                    a.speed = max(0.0, a.speed + (3.0 * c.throttle - 8.0 * c.brake) * dt)
                    a.tf.rotation.yaw += math.degrees(c.steer * 0.2 * dt)
                elif a.autopilot:
                    a.speed = min(10.0, a.speed + 2.0 * dt)
                x_before = a.tf.location.x
                yaw = math.radians(a.tf.rotation.yaw)
                a.tf.location.x += a.speed * math.cos(yaw) * dt
                a.tf.location.y += a.speed * math.sin(yaw) * dt
                if a.autopilot and self.tm is not None and x_before < JUNCTION_X[0] <= a.tf.location.x:
                    self.tm.choose_branch(a)
        self.frame += 1
        self.log.append(("tick", self.frame))
        # as on a server, sensor data comes on the client's own threads after tick() returns, not inside it
        threading.Thread(target=self._deliver, args=(self.frame, [a for a in self.actors if a.callback]),
                         daemon=True).start()
        return self.frame

    def _deliver(self, frame, sensors) -> None:
        time.sleep(0.001)
        for a in sensors:
            if a.callback is None:
                continue
            if a.bp.id == "sensor.camera.rgb":
                w, h = int(a.bp.attributes["image_size_x"]), int(a.bp.attributes["image_size_y"])
                stale = np.zeros((h, w, 4), np.uint8)
                a.callback(SimpleNamespace(frame=frame - 1, width=w, height=h, raw_data=stale.tobytes()))
                img = np.zeros((h, w, 4), np.uint8)
                img[..., 0], img[..., 2] = 200, 10     # BGRA: blue-ish in BGR order -> must come out as R=10, B=200
                img[0, 0, :3] = frame % 256
                a.callback(SimpleNamespace(frame=frame, width=w, height=h, raw_data=img.tobytes()))
            elif a.bp.id == "sensor.other.collision" and self.collide_at_frame == frame:
                a.callback(SimpleNamespace(frame=frame))


class TrafficManager:
    """Like CARLA's: a vehicle on autopilot takes a random branch at a junction (here: straight on, or a right turn
    off the road) unless set_path gave it locations past the junction; set_path and lane changes are logged."""

    def __init__(self, world):
        self.world, self.paths, self.rng = world, {}, random.Random(0)
        world.tm = self

    def set_synchronous_mode(self, on):
        self.world.log.append(("tm_sync", on))

    def set_random_device_seed(self, s):
        self.rng = random.Random(s)

    def set_path(self, actor, path):
        self.paths[actor.id] = [(loc.x, loc.y) for loc in path]
        self.world.log.append(("tm_path", actor.id, len(path)))

    def auto_lane_change(self, actor, enable):
        self.world.log.append(("tm_lane_change", actor.id, enable))

    def choose_branch(self, actor):
        path = self.paths.get(actor.id, [])
        if any(x > JUNCTION_X[1] and abs(y - actor.tf.location.y) < 1.75 for x, y in path):
            return                                        # the path goes straight through
        if self.rng.random() < 0.5:
            actor.tf.rotation.yaw += 90.0                 # CARLA yaw is clockwise: a right turn

    def get_port(self):
        return 8000


class Client:
    last = None

    def __init__(self, host, port):
        self.host, self.port, self.world = host, port, World()
        Client.last = self

    def set_timeout(self, t):
        pass

    def get_world(self):
        return self.world

    def load_world(self, town):
        self.world.log.append(("load_world", town))
        return self.world

    def get_trafficmanager(self, port=8000):
        return TrafficManager(self.world)


class WeatherParameters(SimpleNamespace):
    """carla.WeatherParameters takes its fields as keywords (cloudiness, precipitation, sun_altitude_angle, ...)."""


def module():
    return SimpleNamespace(Client=Client, Location=Location, Rotation=Rotation, Transform=Transform,
                           VehicleControl=VehicleControl, LaneType=LaneType, TrafficLightState=TrafficLightState,
                           WeatherParameters=WeatherParameters)
