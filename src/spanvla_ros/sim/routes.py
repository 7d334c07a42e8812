"""CARLA leaderboard route files: the standard closed-loop evaluation's routes, read without a CARLA install.

Two layouts are read, as the leaderboard and Bench2Drive write them:

* leaderboard 1.0: ``<routes><route id town><waypoint x y z pitch roll yaw/>...</route></routes>``;
* leaderboard 2.0 / Bench2Drive: ``<route id town>`` with ``<waypoints><position x y z/>...</waypoints>``,
  ``<weathers><weather route_percentage ... cloudiness .../></weathers>`` and ``<scenarios><scenario name type>
  <trigger_point x y z yaw/>...</scenario></scenarios>``.

Coordinates stay as in the file (CARLA's left-handed world); the CARLA backend converts them.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RouteScenario:
    name: str
    type: str
    trigger: tuple[float, float, float]          # x, y, z (CARLA frame)


@dataclass(frozen=True)
class RouteSpec:
    id: str
    town: str
    waypoints: tuple[tuple[float, float, float], ...]   # x, y, z (CARLA frame), in driving order
    weather: dict[str, float] = field(default_factory=dict)   # carla.WeatherParameters fields at the route start
    scenarios: tuple[RouteScenario, ...] = ()

    @property
    def name(self) -> str:
        return f"route_{self.id}"


def _xyz(el: ET.Element) -> tuple[float, float, float]:
    return float(el.get("x", 0.0)), float(el.get("y", 0.0)), float(el.get("z", 0.0))


def _weather(route: ET.Element) -> dict[str, float]:
    """The weather at the route's start: its own <weather> (1.0 style) or the first of <weathers> (2.0)."""
    el = route.find("weathers/weather")
    if el is None:
        el = route.find("weather")
    if el is None:
        return {}
    return {k: float(v) for k, v in el.attrib.items() if k not in ("route_percentage", "id")}


def parse_routes(text: str, source: str = "<string>") -> list[RouteSpec]:
    root = ET.fromstring(text)
    if root.tag != "routes":
        raise ValueError(f"{source}: a route file's root is <routes>, not <{root.tag}>")
    out = []
    for r in root.findall("route"):
        points = r.findall("waypoints/position") or r.findall("waypoint")
        if len(points) < 2:
            raise ValueError(f"{source}: route {r.get('id')} has {len(points)} waypoints (needs >= 2)")
        scenarios = tuple(RouteScenario(s.get("name", ""), s.get("type", ""), _xyz(trigger))
                          for s in r.findall("scenarios/scenario") if (trigger := s.find("trigger_point")) is not None)
        out.append(RouteSpec(str(r.get("id")), str(r.get("town", "")), tuple(_xyz(p) for p in points),
                             _weather(r), scenarios))
    if not out:
        raise ValueError(f"{source}: no <route> in the file")
    return out


def load_routes(path: str | Path, ids: str = "") -> list[RouteSpec]:
    """Routes of a leaderboard / Bench2Drive XML file; ``ids``: a comma list to keep (default all)."""
    routes = parse_routes(Path(path).read_text(), str(path))
    if ids:
        keep = set(ids.split(","))
        missing = keep - {r.id for r in routes}
        if missing:
            raise ValueError(f"{path}: no route with id {sorted(missing)}")
        routes = [r for r in routes if r.id in keep]
    return routes
