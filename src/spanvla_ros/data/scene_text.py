"""Reasoning text for a training sample, written from the scene facts the simulator knows at that moment:
what matters (lead vehicle, a car cutting in, merging traffic, the signal, a drift off the lane centre),
why it matters (gap, closing speed, time to collision) and what the expert then did (from its future).
Several phrasings per fact, picked by the sample's own RNG, so the text is not one fixed template."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..sim.types import VEHICLE_LENGTH_M

LEAD_HALF_WIDTH_M = 1.8      # a vehicle whose centre is this near the ego's lane (or route) centre is in it
CUT_IN_REACH_M = 5.5         # ... and one this near, moving towards it, is cutting in
CUT_IN_SPEED_MPS = 0.4       # towards the lane, faster than this
LEAD_RANGE_M = 60.0
CUT_IN_RANGE_M = 30.0


@dataclass
class SceneFacts:
    speed: float
    lead_gap: float | None = None          # m, same lane ahead
    lead_closing: float = 0.0              # m/s, > 0 when the gap shrinks
    cut_in_side: str | None = None         # "left" | "right"
    cut_in_gap: float | None = None
    cut_in_closing: float = 0.0            # m/s, > 0 when the cutting-in car's gap shrinks
    merging_side: str | None = None
    light: str | None = None
    light_dist: float | None = None
    roundabout: bool = False
    intersection: bool = False
    lateral_offset: float = 0.0            # m from the lane centre, left > 0
    recovering: bool = False
    command: str = "follow lane"
    route_lead: tuple[float | None, float] | None = None   # (gap, closing) along the route, where it is known


def facts_from_state(ego_xyhv, agents, scenario: str, command: str, light=None, light_dist=None,
                     lateral_offset: float = 0.0, recovering: bool = False, route=None) -> SceneFacts:
    """What the simulator knows around the ego; ``route`` (shapely LineString): the lead label follows it
    (route_lead), the text's lead and cut-in stay along the heading."""
    x0, y0, h0, v0 = ego_xyhv
    c, s = math.cos(h0), math.sin(h0)
    f = SceneFacts(speed=v0, command=command, light=light, light_dist=light_dist, lateral_offset=lateral_offset,
                   recovering=recovering, roundabout=scenario.startswith("roundabout"),
                   intersection=scenario.startswith("intersection"))
    for (_, ax, ay, ah, av, *_rest) in agents:
        dx, dy = ax - x0, ay - y0
        lon, lat = c * dx + s * dy, -s * dx + c * dy
        v_lon = av * math.cos(ah - h0)
        v_lat = av * math.sin(ah - h0)
        if 0 < lon < LEAD_RANGE_M and abs(lat) < LEAD_HALF_WIDTH_M:
            if f.lead_gap is None or lon < f.lead_gap:
                f.lead_gap, f.lead_closing = lon - VEHICLE_LENGTH_M, v0 - v_lon
        elif (0 < lon < CUT_IN_RANGE_M and LEAD_HALF_WIDTH_M <= abs(lat) < CUT_IN_REACH_M
              and lat * v_lat < -CUT_IN_SPEED_MPS):
            f.cut_in_side, f.cut_in_gap = ("left" if lat > 0 else "right"), lon - VEHICLE_LENGTH_M
            f.cut_in_closing = v0 - v_lon
        elif scenario.startswith("merge") and -15 < lon < 50 and lat < -3.0:
            f.merging_side = "right"
    if route is not None:
        f.route_lead = route_lead(ego_xyhv, agents, route)
    return f


def route_lead(ego_xyhv, agents, route) -> tuple[float | None, float]:
    """The lead along the route the ego follows (a shapely LineString, as a map gives it), not straight along its
    heading: through a junction the car straight ahead is often oncoming or standing beside the turn, and the one
    the ego will meet is on the turn. The nearest vehicle ahead within LEAD_HALF_WIDTH_M of the route or, nearer,
    one within CUT_IN_REACH_M of it and moving towards it; (gap bumper to bumper along the route, closing speed:
    the ego's speed minus the vehicle's along the route), or (None, 0.0) when there is none."""
    from shapely.geometry import Point

    x0, y0, _, v0 = ego_xyhv
    s_ego = route.project(Point(x0, y0))
    best: tuple[float, float] | None = None
    for (_, ax, ay, ah, av, *_rest) in agents:
        here = Point(ax, ay)
        s_a, off = route.project(here), route.distance(here)
        ahead = s_a - s_ego
        if ahead <= 0.0 or off >= CUT_IN_REACH_M or s_a >= route.length:
            continue
        on_route = route.interpolate(s_a)
        tangent = np.subtract(route.interpolate(min(s_a + 1.0, route.length)).coords[0], on_route.coords[0])
        tangent /= max(float(np.linalg.norm(tangent)), 1e-6)
        velocity = av * np.array([math.cos(ah), math.sin(ah)])
        if off < LEAD_HALF_WIDTH_M:
            if ahead >= LEAD_RANGE_M:
                continue
        else:
            towards = np.subtract(on_route.coords[0], (ax, ay)) / off
            if ahead >= CUT_IN_RANGE_M or float(velocity @ towards) <= CUT_IN_SPEED_MPS:
                continue
        gap = ahead - VEHICLE_LENGTH_M
        if best is None or gap < best[0]:
            best = (gap, v0 - float(velocity @ tangent))
    return best if best is not None else (None, 0.0)


def perception_facts(f: SceneFacts) -> dict:
    """The facts a camera-only planner should perceive, as stored with each sample (JSON; None = absent). The lead
    is the vehicle the ego must keep its gap to: the nearest one in its lane or, if nearer, one moving into it
    (a cut-in is a lead from the moment it moves across, not from when it is in the lane: by then the gap is
    gone)."""
    def r(x):
        return None if x is None else round(float(x), 3)
    gap, closing = f.lead_gap, f.lead_closing
    if f.route_lead is not None:
        gap, closing = f.route_lead
    elif f.cut_in_gap is not None and (gap is None or f.cut_in_gap < gap):
        gap, closing = f.cut_in_gap, f.cut_in_closing
    return dict(lead_gap=r(gap), lead_closing=r(closing if gap is not None else None),
                light=f.light, light_dist=r(f.light_dist))


LIGHT_WORDS = frozenset({"red", "green", "yellow"})


def light_token_weight(weight: float):
    """Token string -> CE weight for SFT stage 1: ``weight`` for the light's colour, 1 otherwise. The colour is
    one token in ~30, and the prompt (speed, past trajectory) predicts it about as well as a glance at the frames,
    so with a plain mean the tiny VLM never learns to look (measured: P(red) 0.54 on red and on green scenes)."""
    def token_weight(token: str) -> float:
        return weight if token in LIGHT_WORDS else 1.0
    return token_weight


def _pick(rng, *options):
    return options[int(rng.integers(len(options)))]


def light_clause(state: str, dist: float, rng: np.random.Generator | None = None) -> str:
    """What the text says of a signal ``dist`` m ahead (front bumper to stop line); the first phrasing without rng."""
    options = (f"the traffic light is {state} {max(dist, 0):.0f} meters ahead",
               f"{state} light at the stop line in {max(dist, 0):.0f} meters")
    return options[0] if rng is None else _pick(rng, *options)


SAFE_HEADWAY_S = 2.0   # the two-second rule: a nearer lead is not called a safe gap


def lead_clause(gap: float, closing: float, speed: float, rng: np.random.Generator | None = None) -> str:
    """What the text says of the lead vehicle ``gap`` m ahead closing at ``closing`` m/s, the ego at ``speed``."""
    ttc = gap / closing if closing > 0.3 else math.inf
    if ttc < 6:
        options: tuple[str, ...] = (
            f"the lead vehicle is {gap:.0f} meters ahead and closing, time to collision {ttc:.1f} seconds",
            f"we close on the car ahead at {closing:.1f} m/s, gap {gap:.0f} meters")
    elif gap < SAFE_HEADWAY_S * speed:
        options = (f"the car in front is {gap:.0f} meters away",)
    else:
        options = (f"lead vehicle {gap:.0f} meters ahead, gap is safe", f"the car in front is {gap:.0f} meters away")
    return options[0] if rng is None else _pick(rng, *options)


def free_road_clause(rng: np.random.Generator | None = None) -> str:
    """What the text says when nothing it names is there: no lead, no cut-in, no signal ahead; the first phrasing
    without rng."""
    options = ("the lane ahead is free", "clear road, no vehicles nearby")
    return options[0] if rng is None else _pick(rng, *options)


def describe(f: SceneFacts, future: np.ndarray, rng: np.random.Generator) -> str:
    """future: (N, 4) expert trajectory x, y, heading, speed in the ego frame (0.5 s spacing)."""
    parts = []
    if f.recovering:
        side = "left" if f.lateral_offset > 0 else "right"
        parts.append(_pick(rng, f"we drifted {abs(f.lateral_offset):.1f} meters {side} of the lane center",
                           f"ego is off the lane center by {abs(f.lateral_offset):.1f} meters to the {side}"))
    if f.light is not None and f.light_dist is not None and f.light_dist > -2:
        parts.append(light_clause(f.light, f.light_dist, rng))
    if f.cut_in_side is not None:
        parts.append(_pick(rng, f"a car cuts in from the {f.cut_in_side} {f.cut_in_gap:.0f} meters ahead",
                           f"the vehicle on the {f.cut_in_side} is merging into our lane"))
    if f.lead_gap is not None:
        parts.append(lead_clause(f.lead_gap, f.lead_closing, f.speed, rng))
    if f.merging_side:
        parts.append(_pick(rng, "traffic is merging from the ramp on the right",
                           "a vehicle merges onto the highway from the right"))
    if f.roundabout:
        parts.append(_pick(rng, "we are at the roundabout, yield to circulating traffic",
                           "roundabout ahead, give way to cars inside"))
    if f.intersection and f.light is None:
        parts.append("intersection ahead")
    if not parts:
        parts.append(free_road_clause(rng))

    v_end, v_mid = float(future[-1, 3]), float(future[min(3, len(future) - 1), 3])
    dy, dh = float(future[-1, 1]), float(future[-1, 2])
    if v_mid < 0.5 and f.speed < 1.0:
        act = _pick(rng, "wait at the stop line", "stay stopped")
    elif v_end < 0.5:
        act = _pick(rng, "brake and stop", "slow down to a stop")
    elif v_mid < f.speed - 1.5:
        act = _pick(rng, "brake gently", "reduce speed", "slow down")
    elif v_mid > f.speed + 1.5:
        act = _pick(rng, "speed up", "accelerate")
    else:
        act = _pick(rng, "keep speed", "maintain speed")
    if dh > 0.6:
        lat = "turn left"
    elif dh < -0.6:
        lat = "turn right"
    elif f.recovering:
        lat = "steer back to the lane center"
    elif abs(dy) > 2.0:
        lat = "change lane to the " + ("left" if dy > 0 else "right")
    else:
        lat = _pick(rng, "stay in lane", "keep the lane")
    because = _pick(rng, "so", "therefore", "then")
    return f"{'; '.join(parts)}, {because} {act} and {lat}."
