"""The ROS-free planner core the node and the closed loop share: inputs, staleness, gating, counters."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from helpers.planner_inputs import CAMS, feed, perception_policy
from spanvla_ros.config import node_params
from spanvla_ros.model import SpanVLAConfig
from spanvla_ros.model.corpus import tokenizer_corpus
from spanvla_ros.model.policy import SpanVLAPolicy
from spanvla_ros.model.tokenizer import train_tokenizer
from spanvla_ros.planning.core import PlannerCore, PlannerParams


@pytest.fixture(scope="module")
def policy():
    return perception_policy()


@pytest.fixture
def params():
    return PlannerParams.from_mapping(node_params("spanvla_planner"))


def test_params_come_from_the_params_file_and_must_match_the_model(policy, params):
    assert params.history_frames == policy.cfg.history_frames and params.fresh_perception
    with pytest.raises(KeyError, match="missing"):
        PlannerParams.from_mapping({"flow_steps": 5})
    with pytest.raises(ValueError, match="trained on 4 frames"):
        PlannerCore(policy, dataclasses.replace(params, history_rate_hz=4.0), CAMS)
    with pytest.raises(ValueError, match="cameras"):
        PlannerCore(policy, params, CAMS[:2])


def test_plans_degrade_and_withhold_as_inputs_age(policy, params):
    core = PlannerCore(policy, params, CAMS)
    assert core.plan(now=0.0) is None and core.counters["plans_withheld_stale_odometry"] == 1
    feed(core, 0.0, 1.6)
    first = core.plan(now=1.6)
    assert first.degraded and "no bridge" in first.reason and first.bridge is None
    r = core.reason()
    assert r is not None and r.bridge.front_features.shape[1] == 4
    core.bridge.publish(r.bridge)
    fresh = core.plan(now=1.6)
    assert not fresh.degraded and fresh.bridge_age == pytest.approx(0.0) and fresh.perception_age == pytest.approx(0.0)
    assert fresh.traj.shape == (8, 4) and np.isfinite(fresh.traj).all()
    # odometry keeps coming, cameras stop: the plan is made but marked, first for the front camera, then the bridge
    for k in range(1, 40):
        t = 1.6 + 0.1 * k
        core.add_odometry(t, 10.0 * t, 0.0, 0.0, 10.0, "map", received=t)
    late = core.plan(now=5.5)
    assert late.degraded and late.bridge_age > params.bridge_stale_s
    assert core.plan(now=5.5 + params.odom_timeout_s + 0.1) is None       # odometry stale: withheld
    assert core.counters["plans_degraded"] == 2 and core.counters["plans_withheld_stale_odometry"] == 2


def test_an_odometry_jump_restarts_the_histories_and_drops_the_old_bridge(policy, params):
    """A simulator's next episode (or a relocalisation) puts the car where its odometry could not have driven: from
    there plans use no frame, odometry or bridge from before, as at start-up. Driving fast is not a jump."""
    core = PlannerCore(policy, params, CAMS)
    feed(core, 0.0, 2.0, speed=30.0)
    assert core.counters["odometry_jumps"] == 0
    core.bridge.publish(core.reason().bridge)
    assert not core.plan(now=2.0).degraded
    t = 2.1
    core.add_odometry(t, 500.0, 40.0, 1.0, 20.0, "map", received=t)
    assert core.counters["odometry_jumps"] == 1
    plan = core.plan(now=t)
    assert plan.degraded and plan.bridge is None
    past = core.ego.state(policy.cfg.past_poses, policy.cfg.history_dt)[0]
    assert np.abs(past[:, 1]).max() < 1e-6 and past[0, 0] == pytest.approx(-20.0 * policy.cfg.history_dt
                                                                             * (policy.cfg.past_poses - 1))
    assert core.frames.camera_history(CAMS[0]) is None and core.reason() is None
    rng = np.random.default_rng(1)
    for c in CAMS:
        core.add_image(c, t, rng.integers(0, 255, (112, 196, 3), dtype=np.uint8))
    fresh = core.reason()
    assert fresh is not None and fresh.bridge.stamp == t
    core.bridge.publish(fresh.bridge)
    assert core.plan(now=t).bridge is fresh.bridge


def test_before_the_first_bridge_the_envelope_holds_the_plan_to_what_the_heads_see(policy, params):
    import copy

    import torch

    from spanvla_ros.model.perception import CLOSING_SCALE_MPS, GAP_SCALE_M

    seeing = copy.deepcopy(policy)
    last = seeing.expert.lead_head.out[-1]          # the lead head reads a lead 4 m ahead, closing at 5 m/s
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([10.0, 4.0 / GAP_SCALE_M, 5.0 / CLOSING_SCALE_MPS]))
    core = PlannerCore(seeing, params, CAMS)
    feed(core, 0.0, 1.6)
    plan = core.plan(now=1.6)
    assert plan.degraded and "no bridge" in plan.reason and plan.bridge is None
    assert plan.percept.lead_probability > 0.99 and plan.percept.lead_gap_m == pytest.approx(4.0, abs=0.01)
    assert plan.limited_by and core.counters["plans_limited"] == 1
    unlimited = seeing.history_init(*core.ego.state(seeing.cfg.past_poses, seeing.cfg.history_dt)[:2])
    assert (plan.traj[:, 3] <= unlimited[:, 3] + 1e-6).all() and (plan.traj[:, 0] < unlimited[:, 0]).all()
    assert plan.traj[:, 3].min() < 1.0 < unlimited[:, 3].min()       # it brakes for the lead first
    # and without fresh perception there is nothing to hold it to: the history-initialised plan as it is
    blind = PlannerCore(seeing, dataclasses.replace(params, fresh_perception=False), CAMS)
    feed(blind, 0.0, 1.6)
    as_is = blind.plan(now=1.6)
    assert as_is.percept is None and not as_is.limited_by
    np.testing.assert_allclose(as_is.traj, unlimited)


def test_route_stop_lines_and_command_are_gated(policy, params):
    core = PlannerCore(policy, params, CAMS)
    feed(core, 0.0, 1.6, frame="odom")
    core.bridge.publish(core.reason().bridge)
    assert core.plan(1.6).route_used is False and core.counters["plans_without_route"] == 1
    assert core.set_route(np.array([[0.0, 0.0]]), "odom") is not None           # one pose: rejected, counted
    route = np.stack([np.arange(0.0, 200.0, 2.0), np.zeros(100)], 1)
    assert core.set_route(route, "map") is None
    assert core.plan(1.6).route_used is False                                   # other frame than odometry
    core.set_route(route, "odom")
    core.set_stop_lines(np.array([[40.0, 0.0]]), "odom")
    plan = core.plan(1.6)
    assert plan.route_used and core.counters["plans_without_stop_lines"] == 0
    assert core.set_command("fly") is not None and core.command == policy.cfg.commands[0]
    assert core.set_command("turn left") is None and core.command == "turn left"
    assert not core.add_odometry(2.0, float("nan"), 0.0, 0.0, 1.0, "odom", 2.0) and core.counters["bad_odometry"] == 1


def test_a_reasoner_run_stops_at_the_next_decode_step_when_cancelled(policy, params):
    from spanvla_ros.model.errors import ReasoningCancelled

    core = PlannerCore(policy, params, CAMS)
    feed(core, 0.0, 1.6)
    steps = []

    def cancel_after_three():
        steps.append(1)
        return len(steps) > 3

    with pytest.raises(ReasoningCancelled):
        core.reason(cancel=cancel_after_three)
    assert len(steps) == 4 and core.counters["reasoner_runs"] == 0   # asked before each step; none after True
    assert core.reason(cancel=lambda: False) is not None and core.counters["reasoner_runs"] == 1


def test_a_backlog_of_old_odometry_does_not_make_plans(policy, params):
    """Odometry that arrives now but was stamped long ago (a queue drained late) is as stale as none."""
    core = PlannerCore(policy, params, CAMS)
    feed(core, 0.0, 1.6)
    assert core.plan(now=1.6) is not None
    core.add_odometry(1.7, 17.0, 0.0, 0.0, 10.0, "map", received=5.0)   # received now, stamped 3.3 s ago
    assert core.plan(now=5.0) is None and core.counters["plans_withheld_stale_odometry"] == 1


def test_the_safety_envelope_acts_on_what_the_heads_perceive(policy, params, monkeypatch):
    """The core runs the model's plan through the envelope with the heads' percept of the same plan: a stopped
    lead perceived 15 m ahead at 10 m/s slows the plan short of it (marked, counted); with the envelope off, or the
    lead not perceived, the model's plan is published as it is."""
    import math

    from spanvla_ros.model.perception import Percept

    core = PlannerCore(policy, params, CAMS)
    feed(core, 0.0, 1.6)
    r = core.reason()
    core.bridge.publish(r.bridge)
    model_plan = policy.plan(r.bridge, *core.ego.state(4, 0.5)[:4], "follow lane")
    model_plan[:, 0], model_plan[:, 3] = 10.0 * 0.5 * np.arange(1, 9), 10.0      # keep 10 m/s straight on
    seen = {"percept": Percept(None, None, 0.9, 15.0, 10.0)}
    monkeypatch.setattr(policy, "plan_perceived", lambda *a, **k: (model_plan.copy(), seen["percept"]))
    limited = core.plan(now=1.6)
    assert limited.limited_by.startswith("lead") and core.counters["plans_limited"] == 1
    assert limited.traj[-1, 0] < 15.0 + params.envelope.ego_front_m and limited.traj[-1, 0] < model_plan[-1, 0]
    seen["percept"] = Percept(None, None, 0.1, math.nan, math.nan)
    assert np.array_equal(core.plan(now=1.6).traj, model_plan)
    seen["percept"] = Percept(None, None, 0.9, 15.0, 10.0)
    core.set_params(dataclasses.replace(params, envelope=dataclasses.replace(params.envelope,
                                                                            safety_envelope=False)))
    off = core.plan(now=1.6)
    assert off.limited_by == "" and np.array_equal(off.traj, model_plan) and core.counters["plans_limited"] == 1



def test_a_crossing_model_reads_every_camera_when_its_yield_is_on(params):
    """With crossing_yield on, each plan's percept carries the crossing head's reading of all three cameras'
    newest frames; off, the side cameras are not encoded at all."""
    tok = train_tokenizer(tokenizer_corpus(SpanVLAConfig(), n=80))
    pol = SpanVLAPolicy.build(SpanVLAConfig(traffic_lights=True, lead_perception=True, crossing_perception=True),
                              tok, seed=0)
    on = dataclasses.replace(params, envelope=dataclasses.replace(params.envelope, crossing_yield=True))
    for p, reads in ((on, True), (dataclasses.replace(on, envelope=dataclasses.replace(on.envelope,
                                                                                       crossing_yield=False)), False)):
        core = PlannerCore(pol, p, CAMS)
        feed(core, 0.0, 1.6)
        core.bridge.publish(core.reason().bridge)
        plan = core.plan(now=1.6)
        assert (plan.percept.crossing_probability is not None) == reads
        assert {cam for cam, _ in core.fresh._cache} == (set(CAMS) if reads else {"front"})


def test_frames_are_fitted_to_the_model_input_size_where_they_are_read(policy):
    """An HD frame reads as the model-size frame fitted from it; a model-size frame is used as it is."""
    rng = np.random.default_rng(3)
    hd = np.repeat(np.repeat(rng.integers(0, 255, (108, 192, 3), dtype=np.uint8), 10, 0), 10, 1)   # 1920x1080
    small = policy.reasoner.fit_image(hd)
    assert small.shape == (policy.cfg.image_height, policy.cfg.image_width, 3)
    assert np.array_equal(np.asarray(policy.reasoner._resize(hd)), small)
    assert policy.reasoner.fit_image(small) is small
