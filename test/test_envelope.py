"""The safety envelope: a plan is slowed only where the perceived lead or light says the car could not stop."""
import math

import numpy as np
import pytest

from spanvla_ros.config import node_params
from spanvla_ros.model.perception import Percept
from spanvla_ros.planning.envelope import EnvelopeParams, LeadSpeedFit, constrain, limits, timed_by_speed
from spanvla_ros.sim.controller import speeds_at_poses

DT = 0.5
PARAMS = EnvelopeParams.from_mapping({**node_params("spanvla_planner"), "crossing_yield": True})


def following_gap(speed: float, p: EnvelopeParams = PARAMS) -> float:
    """The nearest gap a lead at the ego's ``speed`` may keep without binding: the distance the ego covers in the
    reaction time and the time gap, plus the standstill gap, measured from the front bumper."""
    return speed * (p.reaction_time_s + p.lead_time_gap_s) + p.standstill_gap_m - p.ego_front_m


def straight(speed: float, horizon: int = 8) -> np.ndarray:
    t = DT * np.arange(1, horizon + 1)
    return np.stack([speed * t, 0 * t, 0 * t, np.full_like(t, speed)], 1).astype(np.float32)


def lead(gap: float, closing: float, p: float = 0.9) -> Percept:
    return Percept(light=None, stop_line_m=None, lead_probability=p, lead_gap_m=gap, lead_closing_mps=closing)


def light(state: int, stop_line_m: float) -> Percept:
    probs = [0.0, 0.0, 0.0]
    probs[state] = 1.0
    return Percept(light=tuple(probs), stop_line_m=stop_line_m, lead_probability=0.0,   # type: ignore[arg-type]
                   lead_gap_m=math.nan, lead_closing_mps=math.nan)


def distance_to_path(poses: np.ndarray, traj: np.ndarray) -> np.ndarray:
    """Each pose's distance to the polyline from the origin through ``traj``'s poses."""
    dense = np.linspace(0, 1, 2000)[:, None]
    pts = np.vstack([[0.0, 0.0], traj[:, :2]])
    poly = np.concatenate([pts[i] + dense * (pts[i + 1] - pts[i]) for i in range(len(pts) - 1)])
    return np.min(np.linalg.norm(poses[:, None, :2] - poly[None], axis=2), axis=1)


def progress(traj: np.ndarray) -> np.ndarray:
    pts = np.vstack([[0.0, 0.0], traj[:, :2]])
    return np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))


@pytest.mark.parametrize("percept", [None, lead(40.0, 0.0), lead(following_gap(20.0) + 1.0, 0.0), lead(6.0, 5.0, p=0.2),
                                     light(0, 20.0), light(2, 8.0)])
def test_plans_the_envelope_does_not_bind_are_returned_unchanged(percept):
    """No perception, a lead keeping the ego's speed at a normal following gap (what a car mistaken for the lead
    looks like), an unlikely lead, a green light, a red light too close to stop at from 20 m/s."""
    plan = straight(20.0)
    out, cause = constrain(plan, DT, 20.0, percept, PARAMS, 0.0)
    assert cause == "" and out is plan


def test_an_old_percept_of_a_closing_lead_counts_the_distance_closed_since():
    """Frames 0.4 s older than the plan, lead closing at 15 m/s: it is 6 m nearer now; a lead at the ego's speed
    is where it was."""
    gap = 30.0
    now = progress(constrain(straight(15.0), DT, 15.0, lead(gap - 6.0, 15.0), PARAMS, 0.0)[0])
    old = progress(constrain(straight(15.0), DT, 15.0, lead(gap, 15.0), PARAMS, 0.4)[0])
    assert np.allclose(old, now, atol=1e-4)
    assert constrain(straight(20.0), DT, 20.0, lead(40.0, 0.0), PARAMS, 0.4)[1] == ""


def test_a_stopped_lead_is_not_reached():
    gap = 30.0
    out, cause = constrain(straight(15.0), DT, 15.0, lead(gap, 15.0), PARAMS, 0.0)
    assert cause.startswith("lead")
    s, stop = progress(out), gap + PARAMS.ego_front_m - PARAMS.standstill_gap_m   # the lead's rear, less the margin
    assert stop - 5.0 < s[-1] <= stop + 1e-6                                        # closes up without reaching it
    speeds = np.concatenate([[15.0], out[:, 3]])
    assert np.all(np.diff(speeds) <= 1e-6)
    assert np.all(-np.diff(speeds) / DT <= PARAMS.max_decel_mps2 + 1e-6)


def test_a_lead_read_within_the_near_gap_holds_a_stopped_car():
    """Nearer than lead_near_gap_m the head's gap is not to be trusted (it reads ~4 m at 1 m): a car standing
    behind a lead read there stays put, and moves up once the lead is read farther."""
    near = constrain(straight(2.0), DT, 0.0, lead(PARAMS.lead_near_gap_m - 0.5, 0.0), PARAMS, 0.0)
    assert near[1] and progress(near[0])[-1] <= 1e-6
    far_gap = PARAMS.lead_near_gap_m + 3.0
    far = progress(constrain(straight(2.0), DT, 0.0, lead(far_gap, 0.0), PARAMS, 0.0)[0])[-1]
    assert 0.5 < far <= far_gap + PARAMS.ego_front_m - PARAMS.standstill_gap_m + 1e-6


def test_a_lead_at_the_egos_speed_is_followed_at_the_time_gap():
    """At 20 m/s a lead keeping the ego's speed binds inside the reaction time plus the time gap, not beyond; with
    no time gap only the reaction distance counts, so the same lead does not bind."""
    assert PARAMS.lead_time_gap_s > 0.0
    inside = following_gap(20.0) - 3.0
    out, cause = constrain(straight(20.0), DT, 20.0, lead(inside, 0.0), PARAMS, 0.0)
    assert cause.startswith("lead") and progress(out)[-1] < progress(straight(20.0))[-1]
    no_gap = EnvelopeParams(**{**PARAMS.__dict__, "lead_time_gap_s": 0.0})
    assert inside > following_gap(20.0, no_gap)
    plan = straight(20.0)
    assert constrain(plan, DT, 20.0, lead(inside, 0.0), no_gap, 0.0) == (plan, "")


def test_a_braking_lead_slows_the_plan_by_how_fast_it_closes():
    slower = [progress(constrain(straight(20.0), DT, 20.0, lead(15.0, c), PARAMS, 0.0)[0])[-1]
              for c in (4.0, 8.0, 12.0)]
    assert slower[0] > slower[1] > slower[2]
    assert slower[0] < progress(straight(20.0))[-1]


def test_red_and_yellow_stop_at_the_line_when_the_car_can():
    for state in (1, 2):
        out, cause = constrain(straight(12.0), DT, 12.0, light(state, 30.0), PARAMS, 0.0)
        assert cause.split()[0] in ("red", "yellow")
        assert progress(out)[-1] <= 30.0 - PARAMS.ego_front_m - PARAMS.stop_line_margin_m + 1e-6
    # from 20 m/s a yellow 30 m ahead is too near for a comfortable stop: go on (no dilemma-zone stop)
    assert constrain(straight(20.0), DT, 20.0, light(1, 30.0), PARAMS, 0.0)[1] == ""
    # a car stopped at the line stays stopped while red
    out, cause = constrain(straight(3.0), DT, 0.0, light(2, PARAMS.ego_front_m + 0.3), PARAMS, 0.0)
    assert cause and progress(out)[-1] <= 1e-6


def test_on_yellow_the_envelope_stops_where_the_expert_did():
    """The labels come from the expert's rule (sim.types.must_stop: stop on yellow where a comfortable stop reaches
    the line); an envelope that stopped where the expert went on cost a whole red phase at the line. Over gaps
    and speeds of an intersection approach the two decide alike, up to the envelope's half-metre tolerance."""
    from spanvla_ros.sim.types import must_stop

    disagree = []
    for speed in np.arange(2.0, 14.01, 1.0):
        for gap in np.arange(1.0, 40.01, 1.0):     # front bumper to the line
            stops = any(lim.cause.startswith("yellow")
                        for lim in limits(light(1, gap + PARAMS.ego_front_m), speed, PARAMS, 0.0))
            if stops != must_stop("yellow", gap, speed) and abs(speed ** 2 / (2 * PARAMS.yellow_stop_decel_mps2)
                                                                - gap) > 0.5:
                disagree.append((speed, gap))
    assert not disagree


def crossing(p: float, stop_line_m: float | None, where: float = 20.0, when: float = 1.5) -> Percept:
    return Percept(light=(1.0, 0.0, 0.0), stop_line_m=stop_line_m, lead_probability=0.0, lead_gap_m=math.nan,
                   lead_closing_mps=math.nan, crossing_probability=p, crossing_where_m=where, crossing_when_s=when)


def test_crossing_traffic_holds_the_car_at_the_stop_line_it_can_still_stop_at():
    line = 30.0
    out, cause = constrain(straight(12.0), DT, 12.0, crossing(0.9, line), PARAMS, 0.0)
    assert cause.startswith("crossing")
    assert progress(out)[-1] <= line - PARAMS.ego_front_m - PARAMS.stop_line_margin_m + 1e-6
    # stopped at the line on green: stays while the crossing car is seen, goes when it is not
    at_line = PARAMS.ego_front_m + PARAMS.stop_line_margin_m
    assert progress(constrain(straight(3.0), DT, 0.0, crossing(0.9, at_line), PARAMS, 0.0)[0])[-1] <= 1e-6
    for percept in (crossing(0.2, line),              # unlikely
                    crossing(0.9, None),              # no stop line ahead: past it, or no junction on the route
                    crossing(0.9, 12.0)):             # from 12 m/s the line is too near to stop at: clear the junction
        plan = straight(12.0)
        assert constrain(plan, DT, 12.0, percept, PARAMS, 0.0) == (plan, "")
    plan = straight(12.0)
    no_yield = EnvelopeParams(**{**PARAMS.__dict__, "crossing_yield": False})
    assert constrain(plan, DT, 12.0, crossing(0.9, line), no_yield, 0.0) == (plan, "")


def test_the_car_goes_when_it_clears_the_crossing_cars_path_first():
    """Gap acceptance: 20 m to the conflict point, at 12 m/s the ego's rear is past it in ~1.8 s (+ 1 s margin); a
    car arriving in 5 s leaves time, one arriving in 2.5 s does not; from a standstill 5 s is too short (~6 s)."""
    plan = straight(12.0)
    assert constrain(plan, DT, 12.0, crossing(0.9, 40.0, where=20.0, when=5.0), PARAMS, 0.0) == (plan, "")
    assert constrain(straight(12.0), DT, 12.0, crossing(0.9, 40.0, where=20.0, when=2.5), PARAMS, 0.0)[1]
    assert constrain(straight(3.0), DT, 0.0, crossing(0.9, 10.0, where=20.0, when=5.0), PARAMS, 0.0)[1]
    # where or when unread (NaN): hold
    assert constrain(straight(12.0), DT, 12.0, crossing(0.9, 40.0, where=math.nan, when=9.0), PARAMS, 0.0)[1]


def test_the_slowed_plan_keeps_the_path():
    t = DT * np.arange(1, 9)
    heading = 0.05 * t
    curve = np.stack([10 * np.sin(heading) / 0.05, 10 * (1 - np.cos(heading)) / 0.05, heading,
                      np.full_like(t, 10.0)], 1).astype(np.float32)
    out, cause = constrain(curve, DT, 10.0, lead(12.0, 10.0), PARAMS, 0.0)
    assert cause
    assert distance_to_path(out, curve).max() < 0.05


def test_the_published_poses_carry_the_plans_speeds_along_its_path():
    """A Path carries poses only: the poses are moved along the model's path to where its speeds take the car, so
    the speeds read back from their spacing are the plan's; a plan whose poses already agree is kept."""
    t = DT * np.arange(1, 9)
    heading = 0.05 * t
    curve = np.stack([10 * np.sin(heading) / 0.05, 10 * (1 - np.cos(heading)) / 0.05, heading,
                      np.full_like(t, 10.0)], 1).astype(np.float32)
    assert np.allclose(timed_by_speed(curve, DT, 10.0), curve, atol=0.02)
    lagging = curve.copy()            # the model's poses: the second step short of its speeds
    lagging[:, 3] = 10.0 + 0.5 * t
    lagging[1:, :2] -= lagging[1:2, :2] - (lagging[0, :2] + 0.9 * (lagging[1, :2] - lagging[0, :2]))
    out = timed_by_speed(lagging, DT, 10.0)
    assert np.allclose(out[:, 3], lagging[:, 3])
    read_back = speeds_at_poses(out[:, :2], DT)
    assert np.abs(read_back[:-1] - lagging[:-1, 3]).max() < 0.15
    assert speeds_at_poses(lagging[:, :2], DT)[1] < lagging[1, 3] - 0.5
    on_path = out[np.linalg.norm(out[:, :2], axis=1) <= np.linalg.norm(lagging[-1, :2])]
    assert distance_to_path(on_path, lagging).max() < 0.05
    beyond = timed_by_speed(straight(10.0), DT, 20.0)         # faster than the poses: on along the last heading
    assert np.allclose(beyond[:, 1], 0.0) and beyond[-1, 0] > straight(10.0)[-1, 0]


def test_switched_off_it_never_changes_a_plan():
    off = EnvelopeParams(**{**PARAMS.__dict__, "safety_envelope": False})
    plan = straight(15.0)
    assert constrain(plan, DT, 15.0, lead(5.0, 15.0), off, 0.0) == (plan, "")


def test_the_lead_speed_fitted_to_its_read_gaps_overrides_a_lagging_closing_speed():
    """Ego at 20 m/s, the lead read at gaps shrinking 1 m per 0.1 s (closing 10 m/s) while the head's closing
    speed says 2 m/s: after the window the envelope acts on ~10 m/s, unless the lead is read farther than
    lead_fit_max_gap_m; a lead holding its gap keeps the head's reading; a frame without a lead starts over;
    window 0 switches the fit off."""
    fit, off = LeadSpeedFit(), EnvelopeParams(**{**PARAMS.__dict__, "lead_fit_window_s": 0.0})
    acted = []
    for k in range(12):
        t = 0.1 * k
        acted.append(fit.update(t, (20.0 * t, 0.0, 0.0), 20.0, lead(19.0 - 10.0 * t, 2.0), PARAMS))
    assert acted[0].lead_closing_mps == 2.0
    assert acted[-1].lead_closing_mps == pytest.approx(10.0, abs=0.2)
    assert LeadSpeedFit().update(0.0, (0.0, 0.0, 0.0), 20.0, lead(20.0, 2.0), off).lead_closing_mps == 2.0
    far = LeadSpeedFit()   # beyond lead_fit_max_gap_m the read gap is not trusted to move with the lead
    for k in range(12):
        t = 0.1 * k
        out = far.update(t, (20.0 * t, 0.0, 0.0), 20.0, lead(PARAMS.lead_fit_max_gap_m + 15.0 - 10.0 * t, 2.0), PARAMS)
    assert out.lead_closing_mps == 2.0
    steady = LeadSpeedFit()
    for k in range(12):
        t = 0.1 * k
        out = steady.update(t, (20.0 * t, 0.0, 0.0), 20.0, lead(15.0, 0.5), PARAMS)
    assert out.lead_closing_mps == 0.5
    assert fit.update(1.2, (24.0, 0.0, 0.0), 20.0, lead(20.0, 0.0, p=0.1), PARAMS).lead_closing_mps == 0.0
    assert fit.update(1.3, (26.0, 0.0, 0.0), 20.0, lead(18.0, 2.0), PARAMS).lead_closing_mps == 2.0   # new fit
