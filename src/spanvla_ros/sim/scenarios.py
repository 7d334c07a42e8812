"""Driving scenarios on highway-env roads. Each one is a road + traffic from highway-env plus what makes it a
test: a cut-in, a braking lead vehicle, a merge, a roundabout entry, an intersection turn under a signal.

Directions are in the math frame (x forward, y left, CCW yaw) that the cameras and commands use.
Held-out evaluation uses seeds the data generator never uses (see TRAIN_SEEDS / HELDOUT_SEEDS)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

APPEARANCES = ("default", "random")


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
    # event ranges (uniform draws per seed); empty = the defaults of sim.highway_backend
    event_time_s: tuple = ()         # when the lead brakes / the cut-in starts
    event_gap_m: tuple = ()          # initial gap to the event vehicle
    lead_brake_to_mps: tuple = ()    # speed the braking lead slows to
    # how the cameras see the world: "default" (the renderer's own look) or "random" (a look drawn per seed,
    # sim.camera.Appearance.sample; traffic and labels are the same as at the default look). The highway-env
    # backend's renderer; CARLA renders its own world
    appearance: str = "default"

    def __post_init__(self):
        if self.appearance not in APPEARANCES:
            raise ValueError(f"scenario {self.name!r}: appearance {self.appearance!r} is not one of {APPEARANCES}")

    @property
    def expert_changes_lanes(self) -> bool:
        """The expert (IDM/MOBIL) changes lanes by its own choice only on the open highway."""
        return self.event == "" and self.env_id == "highway-v0"


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


def parse_seeds(text: str) -> list[int]:
    """'a:b' (range, b excluded) or 'a,b,c'."""
    if ":" in text:
        a, b = text.split(":")
        return list(range(int(a), int(b)))
    return [int(s) for s in text.split(",") if s]


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Scenarios from a YAML file: a list (or ``scenarios:`` list) of entries, each ``base`` (a built-in scenario)
    plus overrides of its fields; ``env_config`` entries are merged into the base's highway-env config.

        - name: lead_brake_hard
          base: lead_brake
          ego_target_speed: 25
          env_config: {lanes_count: 2}
          event_time_s: [1.5, 2.5]
          lead_brake_to_mps: [0, 1]
    """
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    entries = doc.get("scenarios", doc) if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a list of scenarios (base + overrides)")
    names = {f.name for f in dataclasses.fields(Scenario)}
    out = []
    for e in entries:
        e = dict(e)
        base = get(e.pop("base", e.get("name", "")))
        unknown = set(e) - names
        if unknown:
            raise ValueError(f"{path}: unknown scenario fields {sorted(unknown)} (known: {sorted(names)})")
        if "env_config" in e:
            e["env_config"] = {**base.env_config, **e["env_config"]}
        out.append(dataclasses.replace(base, **_ranges_as_tuples(e)))
    return out


_RANGE_FIELDS = ("event_time_s", "event_gap_m", "lead_brake_to_mps")


def _ranges_as_tuples(fields: dict) -> dict:
    return {k: tuple(float(x) for x in v) if k in _RANGE_FIELDS else v for k, v in fields.items()}


def spec_of(scenario: Scenario) -> dict | None:
    """What a dataset keeps to rebuild a scenario that is not a built-in one (a scenario file's): all its fields;
    None for a built-in, which its name identifies."""
    return None if SCENARIOS.get(scenario.name) == scenario else dataclasses.asdict(scenario)


def scenario_of(name: str, spec: dict | None = None) -> Scenario:
    """The scenario a dataset's episode ran: a built-in by ``name``, or rebuilt from its ``spec`` (spec_of)."""
    return get(name) if spec is None else Scenario(**_ranges_as_tuples(spec))


def is_scenario_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def resolve(spec: str) -> list[Scenario]:
    """A comma list of 'all', built-in names and YAML scenario files."""
    out: list[Scenario] = []
    for part in spec.split(","):
        if is_scenario_file(part):
            out += load_scenarios(part)
        else:
            out += list(SCENARIOS.values()) if part == "all" else [get(part)]
    return out
