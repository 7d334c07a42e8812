"""The map of a scene as the scorers and the planner's inputs see it: drivable area, lanes with their headings, the
route and its stop line. Both simulator backends build one (``scene_map()``); the PDM-style scorer (eval.pdm) and
data generation read it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from shapely.geometry import LineString, Point, Polygon
from shapely.ops import unary_union
from shapely.prepared import prep

from ..geometry import arc_lengths


@dataclass
class Lane:
    centre: LineString
    headings: np.ndarray     # heading at each vertex of centre
    width: float

    def __post_init__(self):
        xy = np.asarray(self.centre.coords)
        self.arc = arc_lengths(xy)


def stop_line_points(route: LineString, stop_s: float | None) -> np.ndarray:
    """(K, 2) world points where the route crosses a stop line (what a route map gives the planner)."""
    if stop_s is None:
        return np.zeros((0, 2))
    return np.asarray(route.interpolate(stop_s).coords, np.float64)


@dataclass
class SceneMap:
    drivable: Polygon
    lanes: list[Lane]
    route: LineString
    stop_s: float | None = None          # route arc length of the ego's stop line

    def __post_init__(self):
        self._drivable = prep(self.drivable)

    def stop_lines_xy(self) -> np.ndarray:
        return stop_line_points(self.route, self.stop_s)

    def lane_info(self, x: float, y: float, heading: float):
        """(aligned lane deviation or None, on an opposing lane only?)"""
        p = Point(x, y)
        best_aligned, on_opposing = None, False
        for lane in self.lanes:
            d = lane.centre.distance(p)
            if d > lane.width / 2 + 0.3:
                continue
            i = min(int(np.searchsorted(lane.arc, lane.centre.project(p))), len(lane.headings) - 1)
            if math.cos(heading - lane.headings[i]) > 0:
                best_aligned = d if best_aligned is None else min(best_aligned, d)
            else:
                on_opposing = True
        return best_aligned, on_opposing and best_aligned is None


def build_drivable(lane_polygons) -> Polygon:
    return unary_union([p.buffer(0.05) for p in lane_polygons])
