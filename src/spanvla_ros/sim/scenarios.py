"""Driving scenarios on highway-env roads. Each one is a road + traffic from highway-env plus what makes it a
test: a cut-in, a braking lead vehicle, a merge, a roundabout entry, an intersection turn under a signal.

Directions are in the math frame (x forward, y left, CCW yaw) that the cameras and commands use.
Held-out evaluation uses seeds the data generator never uses (see TRAIN_SEEDS / HELDOUT_SEEDS)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scenario:
    name: str
    env_id: str
    env_config: dict = field(default_factory=dict)
    duration_s: float = 15.0
    route_length_m: float = 200.0
    ego_target_speed: float = 20.0
    event: str = ""                  # "cut_in" | "lead_brake" | ""
    traffic_light: bool = False
    destination: str = ""            # intersection / roundabout exit node (sets the command)


_HIGHWAY = dict(lanes_count=3, vehicles_count=12, vehicles_density=1.2, initial_lane_id=1, ego_spacing=1.5)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("highway", "highway-v0", _HIGHWAY, 15.0, 300.0, 22.0),
    Scenario("cut_in", "highway-v0", dict(_HIGHWAY, vehicles_count=6), 15.0, 280.0, 22.0, event="cut_in"),
    Scenario("lead_brake", "highway-v0", dict(_HIGHWAY, vehicles_count=6), 15.0, 250.0, 20.0, event="lead_brake"),
    Scenario("merge", "merge-v0", {}, 12.0, 280.0, 24.0),
    Scenario("roundabout", "roundabout-v0", {}, 15.0, 85.0, 8.0, destination="nxs"),
    Scenario("intersection_left", "intersection-v0", dict(initial_vehicle_count=4, spawn_probability=0.0),
             15.0, 80.0, 8.0, traffic_light=True, destination="o3"),
    Scenario("intersection_straight", "intersection-v0", dict(initial_vehicle_count=4, spawn_probability=0.0),
             15.0, 80.0, 8.0, traffic_light=True, destination="o2"),
    Scenario("intersection_right", "intersection-v0", dict(initial_vehicle_count=4, spawn_probability=0.0),
             15.0, 80.0, 8.0, traffic_light=True, destination="o1"),
]}

TRAIN_SEEDS = range(0, 1000)
HELDOUT_SEEDS = range(10_000, 10_100)


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
