"""Grounded perception: the front-camera tokens the heads read (fresh at control rate = the reasoner's own), the
lead head, the facts stated in reasoning text, the signal-stop labels, plan consistency, latency-modelled closed
loop and scenario files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spanvla_ros.model import SpanVLAConfig
from spanvla_ros.model.corpus import tokenizer_corpus
from spanvla_ros.model.policy import FreshPerception, SpanVLAPolicy
from spanvla_ros.model.tokenizer import train_tokenizer

PAST = np.array([[-12.0, 0.6, 0.06], [-8.0, 0.3, 0.04], [-4.0, 0.1, 0.02], [0.0, 0.0, 0.0]])


@pytest.fixture(scope="module")
def policy():
    tok = train_tokenizer(tokenizer_corpus(SpanVLAConfig(), n=120))
    return SpanVLAPolicy.build(SpanVLAConfig(traffic_lights=True, lead_perception=True), tok, seed=0)


def frames(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (112, 196, 3), dtype=np.uint8) for _ in range(n)]


def test_fresh_tokens_are_the_reasoners_front_tokens_and_positions_are_right(policy):
    imgs = frames(seed=1)
    r = policy.reason(imgs, "follow lane", 10.0, 0.0, PAST, max_new_tokens=3)
    rs = policy.reasoner
    assert r.bridge.front_features.shape == (1, 4, rs.front_tokens, rs.front_token_dim)
    fresh = FreshPerception(policy)
    front = [imgs[i] for i in rs.front_image_indices]
    tok = fresh.tokens(front, [0.0, 0.5, 1.0, 1.5], "front")
    assert torch.allclose(tok, r.bridge.front_features, atol=1e-5)
    # a new frame: only it is encoded; older ones come from the cache and the oldest is evicted
    tok2 = fresh.tokens(front[1:] + [imgs[0]], [0.5, 1.0, 1.5, 2.0], "front")
    assert torch.equal(tok2[0, :3], tok[0, 1:]) and sorted(st for _, st in fresh._cache) == [0.5, 1.0, 1.5, 2.0]
    # token positions: a bright patch at patch row 5, column 3 changes that token the most
    img = np.zeros((112, 196, 3), np.uint8)
    img[5 * 14:6 * 14, 3 * 14:4 * 14] = 255
    delta = (rs.vision_tokens([img]) - rs.vision_tokens([np.zeros_like(img)]))[0].norm(dim=-1)
    rows, cols = 112 // 14 - 1, 196 // 14 - 1
    assert torch.allclose(rs.front_token_rc[int(delta.argmax())] * torch.tensor([rows, cols]), torch.tensor([5.0, 3.0]))


def test_frames_between_the_history_picks_stay_cached_and_cameras_do_not_share_stamps(policy, monkeypatch):
    """At a camera rate above the history rate the picks move with the newest frame: every frame is still encoded
    once. The crossing head's views are each camera's newest frames in the order the training data has them."""
    fresh = FreshPerception(policy)
    encoded = []
    real = policy.reasoner.vision_tokens
    monkeypatch.setattr(policy.reasoner, "vision_tokens", lambda ims: encoded.append(len(ims)) or real(ims))
    imgs = frames(n=31, seed=3)
    for k in range(31):   # a 10 Hz camera for 3 s; 4 picks 0.5 s apart back from the newest (FrameHistory's)
        stamps = [round(max(0.0, 0.1 * k - 0.5 * j), 3) for j in range(3, -1, -1)]
        fresh.tokens([imgs[round(st * 10)] for st in stamps], stamps, "front")
    assert sum(encoded) == 31
    cams = policy.cfg.cameras
    images = frames(n=len(cams) * policy.cfg.history_frames, seed=4)   # time-major, as a sample's
    stamps = [0.5 * k for k in range(policy.cfg.history_frames)]
    histories = [(cam, ([images[k * len(cams) + c] for k in range(len(stamps))], stamps)) for c, cam in enumerate(cams)]
    views = FreshPerception(policy).crossing_views(histories)
    assert torch.allclose(views, policy.crossing_tokens(images), atol=1e-5)


def test_lead_features_condition_the_plan_and_fresh_frames_override_the_bridge(policy):
    r = policy.reason(frames(seed=2), "follow lane", 10.0, 0.0, PAST, max_new_tokens=3)
    expert = policy.expert
    with torch.no_grad():   # an untrained head says little: give it a strong opinion so its effect is visible
        expert.lead_head.out[-1].bias.copy_(torch.tensor([4.0, 0.3, 0.5]))
    ego = torch.from_numpy(policy.ego_vector(10.0, 0.0, 0.0, "follow lane"))[None]
    percept = expert.percept(r.bridge, ego)
    assert percept.shape == (1, 6) and not percept.requires_grad
    cond = expert.conditioning(ego, percept)
    assert cond.shape[1] == policy.cfg.ego_dim + 3 + 3
    assert not cond[0, -6:-3].any()            # no stop line ahead: the light probabilities are gated off
    assert cond[0, -3] > 0.9                    # P(lead)
    other = torch.from_numpy(np.stack(frames(n=4, seed=9)))
    fresh = policy.reasoner.vision_tokens(list(other.numpy()))[None]
    assert not torch.allclose(expert.percept(fresh, ego), percept)
    a = policy.plan(r.bridge, PAST, 10.0, 0.0, 0.0, "follow lane")
    b = policy.plan(r.bridge, PAST, 10.0, 0.0, 0.0, "follow lane")
    assert np.array_equal(a, b)                 # fixed noise: same inputs, same plan


def test_lead_head_learns_presence_gap_and_closing_from_where_the_lead_is():
    from spanvla_ros.model.perception import GAP_SCALE_M, PooledTokenHead, lead_metrics, lead_targets

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    N, D, F = 24, 16, 4
    rc = torch.stack(torch.meshgrid(torch.linspace(0, 1, 4), torch.linspace(0, 1, 6), indexing="ij"), -1).reshape(-1, 2)

    def scene(gap, closing):
        """Background tokens; a lead is a marker token whose row tells its distance in each frame."""
        x = torch.randn(F, N, D) * 0.3
        if gap is not None:
            for k in range(F):
                g = gap + closing * 0.5 * (F - 1 - k)
                row = int(np.clip(3 - g / 15, 0, 3))
                x[k, row * 6 + 2, 0] += 4.0
                x[k, row * 6 + 2, 1] += (g % 15) / 5
        return x

    facts = [dict(lead_gap=None, lead_closing=None) if i % 3 == 0 else
             dict(lead_gap=float(rng.uniform(5, 55)), lead_closing=float(rng.uniform(-3, 8))) for i in range(600)]
    X = torch.stack([scene(f["lead_gap"], f["lead_closing"] or 0.0) for f in facts])
    T = torch.tensor([lead_targets(f) for f in facts], dtype=torch.float32)
    speed = torch.full((len(facts),), 1.5)    # 15 m/s, normalised as in the expert's conditioning
    head = PooledTokenHead(D, N, F, hidden=32)
    head.fit(X[:500], rc)
    opt = torch.optim.Adam(head.parameters(), 3e-3)
    for _ in range(300):
        ii = torch.randint(0, 500, (64,))
        loss = PooledTokenHead.loss(head(X[ii], speed[ii]), T[ii])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = lead_metrics(head(X[500:], speed[500:]), T[500:])
    assert m["lead_f1"] > 0.95 and m["gap_mae_m"] < 0.25 * GAP_SCALE_M
    assert all(math.isnan(v) for v in lead_targets(None))          # unlabelled (older data): no loss
    assert lead_targets(dict(lead_gap=None))[0] == 0.0 and math.isnan(lead_targets(dict(lead_gap=None))[1])


def test_a_presence_weight_makes_a_missed_lead_cost_more_than_a_false_one():
    from spanvla_ros.model.perception import PooledTokenHead

    unsure = torch.tensor([[0.0, 0.3, 0.2]])            # P(lead) 0.5, the regressions on target
    lead, empty = torch.tensor([[1.0, 0.3, 0.2]]), torch.tensor([[0.0, math.nan, math.nan]])
    for weight in (2.0, 3.0):
        assert PooledTokenHead.loss(unsure, lead, weight) == pytest.approx(weight * PooledTokenHead.loss(unsure, lead))
        assert PooledTokenHead.loss(unsure, empty, weight) == pytest.approx(PooledTokenHead.loss(unsure, empty))


def test_crossing_traffic_labels_are_vehicles_coming_onto_the_ego_path():
    """An ego driving north at 8 m/s; a car from the east crossing its path 16 m ahead 2 s from now is crossing
    traffic (where and when); the lead in the lane, a car alongside in the next lane, one behind and one that
    crosses beyond the horizon are not."""
    from spanvla_ros.model.perception import CROSSING_SCALE_M, CROSSING_TIME_SCALE_S, crossing_targets

    dt, steps = 0.5, 9
    t = dt * np.arange(steps)
    future = [[8.0 * k, 0.0, 0.0, 8.0] for k in t[1:]]                     # ego frame: x ahead
    pose = [0.0, 0.0, math.pi / 2, 8.0]                                      # world: heading north (+y)

    def agent(x0, y0, heading, speed):
        return [[x0 + speed * math.cos(heading) * k, y0 + speed * math.sin(heading) * k, heading, speed] for k in t]

    def label(*agents):
        frames = [[a[k] for a in agents] for k in range(steps)]
        return crossing_targets(dict(pose=pose, future=future, agents_future=frames), dt)

    west = agent(20.0, 16.0, math.pi, 10.0)                                   # at x = 0 when t = 2 s
    present, where, when = label(west)
    assert present == 1.0
    assert abs(where * CROSSING_SCALE_M - 16.0) < 3.0 and when * CROSSING_TIME_SCALE_S == pytest.approx(2.0)
    lead = agent(0.0, 20.0, math.pi / 2, 5.0)
    alongside = agent(-4.0, 5.0, math.pi / 2, 8.0)
    behind = agent(0.0, -10.0, math.pi / 2, 12.0)
    late = agent(60.0, 16.0, math.pi, 10.0)                                   # reaches the path after 5.7 s
    assert label(lead, alongside, behind, late)[0] == 0.0
    assert label(lead, west)[0] == 1.0
    assert all(math.isnan(v) for v in crossing_targets(dict(pose=pose, future=future), dt))


def test_reasoning_facts_are_parsed_as_the_writer_states_them():
    from spanvla_ros.data.scene_text import describe, facts_from_state, perception_facts
    from spanvla_ros.eval.perception_eval import reasoning_fact_accuracy, stated_facts

    rng = np.random.default_rng(0)
    future = np.stack([np.arange(1, 9) * 5.0, np.zeros(8), np.zeros(8), np.full(8, 10.0)], 1)
    texts, facts = [], []
    for gap in (None, 6.0, 14.0, 33.0, 50.0):
        for light in (None, "red", "green", "yellow"):
            agents = [] if gap is None else [(1, gap + 5.0, 0.3, 0.0, 8.0)]
            f = facts_from_state((0.0, 0.0, 0.0, 10.0), agents, "intersection_straight", "go straight", light,
                                 20.0 if light else None)
            texts.append(describe(f, future, rng))
            facts.append(perception_facts(f))
    acc = reasoning_fact_accuracy(texts, facts)
    assert acc["text_lead_acc"] == 1.0 and acc["text_gap_bucket_acc"] == 1.0 and acc["text_light_acc"] == 1.0
    # a text that contradicts the scene is counted wrong
    wrong = reasoning_fact_accuracy(["the lane ahead is free, so keep speed and stay in lane."],
                                    [dict(lead_gap=12.0, lead_closing=5.0, light=None, light_dist=None)])
    assert wrong["text_lead_acc"] == 0.0 and wrong["text_gap_bucket_acc"] == 0.0
    assert stated_facts("the car in front is 27 meters away, so keep speed")["gap"] == 27.0


def test_the_lead_label_follows_the_route_not_the_heading():
    """Through a turn the car straight ahead is not the lead; the one on the turn is, with its speed along the
    route; a car moving onto the route nearer than that is; without a route the label is along the heading."""
    from shapely.geometry import LineString

    from spanvla_ros.data.scene_text import facts_from_state, perception_facts

    turn_left = LineString([(-10.0, 0.0), (20.0, 0.0), (20.0, 60.0)])
    ego = (0.0, 0.0, 0.0, 8.0)                      # x, y, heading, speed
    straight_on = (1, 30.0, 0.0, 0.0, 0.0)          # stopped beyond the corner, off the route
    on_the_turn = (2, 20.0, 15.0, math.pi / 2, 5.0)

    def lead(agents, route):
        return perception_facts(facts_from_state(ego, agents, "intersection_left", "turn left", route=route))

    along_heading = lead([straight_on, on_the_turn], None)
    assert along_heading["lead_gap"] == pytest.approx(25.0) and along_heading["lead_closing"] == pytest.approx(8.0)
    along_route = lead([straight_on, on_the_turn], turn_left)
    assert along_route["lead_gap"] == pytest.approx(30.0) and along_route["lead_closing"] == pytest.approx(3.0)
    assert lead([straight_on], turn_left)["lead_gap"] is None
    cutting_in = (3, 12.0, 4.0, -math.pi / 2, 2.0)  # 4 m beside the route, moving onto it
    standing_beside = (4, 12.0, 4.0, -math.pi / 2, 0.0)
    assert lead([on_the_turn, cutting_in], turn_left)["lead_gap"] == pytest.approx(7.0)
    assert lead([on_the_turn, standing_beside], turn_left)["lead_gap"] == pytest.approx(30.0)


def test_the_text_calls_a_gap_safe_only_beyond_two_seconds_of_headway():
    """A lead 9 m ahead at 10 m/s holding its distance is not "a safe gap" (the run view once showed that next to a
    car 9 m ahead); 40 m ahead it is; a closing lead is stated with its time to collision, at any speed."""
    from spanvla_ros.data.scene_text import SAFE_HEADWAY_S, lead_clause
    from spanvla_ros.eval.perception_eval import stated_facts

    rng = np.random.default_rng(0)
    near = {lead_clause(9.0, 0.0, 10.0, rng) for _ in range(20)} | {lead_clause(9.0, 0.0, 10.0)}
    assert all("safe" not in t and stated_facts(t)["gap"] == 9.0 for t in near)
    assert "safe" in lead_clause(SAFE_HEADWAY_S * 10.0 + 1.0, 0.0, 10.0)
    assert "safe" in lead_clause(6.0, 0.0, 0.0)                     # standing behind a stopped car
    assert "time to collision" in lead_clause(40.0, 10.0, 25.0)


def test_signal_stop_labels_stop_before_the_line_only_when_the_expert_rule_says_stop():
    from spanvla_ros.data.samples import STOP_MARGIN_M, stop_at_signal_future

    v = 8.0
    go = np.stack([v * 0.5 * np.arange(1, 9), np.zeros(8), np.zeros(8), np.full(8, v)], 1)   # drives through
    meta = dict(future=go.tolist(), speed=v, lights={0.0: "red"}, facts=dict(light_dist=15.0))
    stop = stop_at_signal_future(meta)
    assert stop is not None
    assert stop[-1, 0] == pytest.approx(15.0 - STOP_MARGIN_M, abs=0.05) and stop[-1, 3] == 0.0
    assert (np.diff(stop[:, 0]) >= -1e-6).all() and (np.diff(stop[:, 3]) <= 1e-6).all()
    assert stop[:, 0].max() <= 15.0 - STOP_MARGIN_M + 1e-3
    for lights, dist in (({0.0: "green"}, 15.0), ({0.0: "yellow"}, 5.0), ({0.0: "red"}, -3.0)):
        assert stop_at_signal_future(dict(meta, lights=lights, facts=dict(light_dist=dist))) is None
    assert stop_at_signal_future(dict(meta, lights={0.0: "yellow"})) is not None   # 15 m at 8 m/s: can stop
    already = go.copy()
    already[:, 0] = np.minimum(already[:, 0], 10.0)
    assert stop_at_signal_future(dict(meta, future=already.tolist())) is None      # logged future stops in time


def test_plan_displacement_measures_disagreement_over_the_overlap():
    from spanvla_ros.eval.closed_loop import plan_displacement

    t = 0.5 * np.arange(1, 9)
    prev = np.stack([10.0 * t, np.zeros(8)], 1)
    same_motion = np.stack([10.0 * (t + 0.1) , np.zeros(8)], 1) - [1.0, 0.0]   # 0.1 s later, ego 1 m further
    assert plan_displacement((0.0, prev), (0.1, same_motion + [1.0, 0.0]), 0.5) == pytest.approx(0.0, abs=1e-9)
    shifted = same_motion + [1.0, 2.0]
    assert plan_displacement((0.0, prev), (0.1, shifted), 0.5) == pytest.approx(2.0)
    assert plan_displacement((0.0, prev), (10.0, prev), 0.5) is None


def test_scenario_file_overrides_and_seed_ranges(tmp_path):
    from spanvla_ros.eval.closed_loop import seed_list
    from spanvla_ros.sim.scenarios import SCENARIOS, load_scenarios, resolve

    f = tmp_path / "mine.yaml"
    f.write_text("scenarios:\n"
                 "  - {name: lead_brake_early, base: lead_brake, ego_target_speed: 25, event_time_s: [1.0, 1.5],\n"
                 "     env_config: {lanes_count: 2}}\n"
                 "  - {base: highway, duration_s: 8}\n")
    a, b = load_scenarios(f)
    assert a.name == "lead_brake_early" and a.event == "lead_brake" and a.ego_target_speed == 25
    assert a.event_time_s == (1.0, 1.5) and a.env_config["lanes_count"] == 2
    assert a.env_config["vehicles_count"] == SCENARIOS["lead_brake"].env_config["vehicles_count"]
    assert b.name == "highway" and b.duration_s == 8
    assert resolve(str(f)) == [a, b] and [s.name for s in resolve("cut_in,merge")] == ["cut_in", "merge"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {base: highway, lanes: 2}\n")
    with pytest.raises(ValueError, match="unknown scenario fields"):
        load_scenarios(bad)
    assert seed_list("20000:20003") == [20000, 20001, 20002] and seed_list("2") == [10000, 10001]
    assert seed_list("5,7") == [5, 7]


def test_scenario_overrides_reach_the_simulator(tmp_path):
    pytest.importorskip("highway_env", reason="highway-env is not installed")
    import dataclasses

    from spanvla_ros.sim.highway_backend import HighwayEnvBackend
    from spanvla_ros.sim.scenarios import get

    backend = HighwayEnvBackend(render=False)
    sc = dataclasses.replace(get("lead_brake"), name="early", event_time_s=(1.0, 1.0), lead_brake_to_mps=(0.0, 0.0))
    backend.reset(sc, 10_000)
    assert backend.event_time == 1.0
    while backend.t < 1.05:
        backend.step(None)
    assert backend.event_vehicle.target_speed == 0.0 and backend.scenario.name == "early"
    backend.close()


def drive_without_control(policy, latency_s: float, until_s: float):
    """A PolicyDriver (reasoner every 1 s, bridges usable ``latency_s`` after their frames) on highway 10000, the
    simulator stepped without its controls: (t, the bridge in use or None) per step, and the driver."""
    pytest.importorskip("highway_env", reason="highway-env is not installed")
    from spanvla_ros.eval.closed_loop import PolicyDriver
    from spanvla_ros.sim.highway_backend import HighwayEnvBackend

    backend = HighwayEnvBackend()
    driver = PolicyDriver(policy, reason_every_s=1.0, reasoner_latency_s=latency_s)
    obs = backend.reset("highway", 10_000)
    driver.reset(obs, backend)
    seen = []
    while obs.t < until_s:
        driver.act(obs, backend)
        seen.append((obs.t, driver.bridge))
        obs = backend.step(None)
    backend.close()
    return seen, driver


def test_policy_driver_uses_a_bridge_only_after_the_reasoner_latency(policy):
    seen, driver = drive_without_control(policy, 0.35, 0.55)
    assert [t for t, bridge in seen if bridge is not None][0] == pytest.approx(0.4)   # reasoned at 0.0, usable 0.35
    assert driver.fresh is not None and len(driver.consistency) == len(seen) - 1


def test_policy_driver_with_a_reasoner_slower_than_its_period_still_publishes(policy):
    """A reasoner run of 1.5 s at a 1 s period: as in the node, the next run starts when this one is done, so
    every run's bridge is used (a new run must not replace the pending one before it is published)."""
    seen, driver = drive_without_control(policy, 1.5, 3.55)
    stamps: list[float] = []
    for _, bridge in seen:
        if bridge is not None and (not stamps or stamps[-1] != bridge.stamp):
            stamps.append(bridge.stamp)
    assert stamps == pytest.approx([0.0, 1.5])            # reasoned at 0.0 and 1.5, usable from 1.5 and 3.0 on
    assert [t for t, _ in driver.texts] == pytest.approx([0.0, 1.5, 3.0])


def test_grounded_reasoning_states_what_the_heads_see(policy):
    """A grounded-reasoning model starts its text with the heads' facts in the text's own phrasing: the parser of
    the stated facts reads back exactly what the heads output, the light only with a stop line ahead, and with
    nothing seen that the lane ahead is free (no fact left to the decoder)."""
    import dataclasses

    from spanvla_ros.data.scene_text import free_road_clause
    from spanvla_ros.eval.perception_eval import stated_facts

    pol = SpanVLAPolicy(dataclasses.replace(policy.cfg, grounded_reasoning=True), policy.reasoner, policy.expert)
    with torch.no_grad():
        pol.expert.lead_head.out[-1].weight.zero_()
        pol.expert.lead_head.out[-1].bias.copy_(torch.tensor([5.0, 24.0 / 30.0, 0.5]))   # 24 m, closing 5 m/s
    imgs = frames(seed=4)
    front = pol.reasoner.vision_tokens([imgs[i] for i in pol.reasoner.front_image_indices])[None]
    route = np.stack([np.arange(-50.0, 150.0, 2.0), np.zeros(100)], 1)
    with_light = pol.perceived_text(front, 10.0, pol.route_input(route, (0, 0, 0), np.array([[22.5, 0.0]])))
    no_light = pol.perceived_text(front, 10.0, pol.route_input(route, (0, 0, 0), None))
    said = stated_facts(with_light)
    assert said["lead"] and said["gap"] == 24.0 and said["light"] in ("red", "green", "yellow")
    assert "20 meters" in with_light                       # 22.5 m to the line from the centre, 20 m from the bumper
    assert stated_facts(no_light)["light"] is None and stated_facts(no_light)["gap"] == 24.0
    r = pol.reason(imgs, "go straight", 10.0, 0.0, PAST, max_new_tokens=4, route_xy=route, pose=(0, 0, 0),
                   stop_xy=np.array([[22.5, 0.0]]))
    assert r.text.startswith(with_light)
    with torch.no_grad():
        pol.expert.lead_head.out[-1].bias[0] = -5.0                                      # no lead seen
    nothing = pol.perceived_text(front, 10.0, pol.route_input(route, (0, 0, 0), None))
    with torch.no_grad():
        pol.expert.lead_head.out[-1].bias[0] = 5.0                                       # as the tests after read it
    assert nothing == free_road_clause() and stated_facts(nothing) == dict(lead=False, gap=None, light=None)


def test_fork_rollout_is_what_the_expert_does_from_that_state():
    """DAgger labels: a fork of a running episode, driven by the expert, follows exactly the path the episode
    itself takes when the expert drives on from that state, and leaves the episode untouched."""
    pytest.importorskip("highway_env", reason="highway-env is not installed")
    from spanvla_ros.data.generate import expert_rollout
    from spanvla_ros.sim.highway_backend import HighwayEnvBackend
    from spanvla_ros.sim.types import Control

    b = HighwayEnvBackend(render=False)
    b.reset("lead_brake", 3)
    for _ in range(15):                      # someone else drives for a while: a state the expert would not reach
        b.step(Control(1.0, 0.01))
    before = (b.t, tuple(b.ego.position))
    labels = expert_rollout(b, 20)
    assert (b.t, tuple(b.ego.position)) == before
    for k in range(1, 21):
        obs = b.step(None)
        assert labels[k]["ego"] == pytest.approx((obs.ego.x, obs.ego.y, obs.ego.heading, obs.ego.speed))
    b.close()


@pytest.mark.slow
def test_dagger_episode_samples_the_policys_states_with_expert_labels(tmp_path):
    pytest.importorskip("highway_env", reason="highway-env is not installed")
    from conftest import REPO
    from spanvla_ros.data.bag_io import read_episode
    from spanvla_ros.data.generate import generate

    idx = generate(tmp_path, ["lead_brake"], [3], kinds=("dagger",), progress=False,
                   policy=str(REPO / "checkpoints" / "spanvla_default"))
    samples = idx["samples"]
    assert samples and {s["kind"] for s in samples} == {"dagger"}
    log = read_episode(tmp_path / samples[0]["bag"], ("front",))
    for s in samples:                        # the sample's state is the policy's, from the recorded drive
        j = int(np.argmin(np.abs(log.odom[:, 0] - s["stamp"])))
        assert log.odom[j, 1:3] == pytest.approx(s["pose"][:2], abs=1e-3)
        assert np.asarray(s["future"]).shape == (8, 4) and s["facts"] is not None


def test_multi_frame_light_head_reads_older_frames_and_single_frame_does_not():
    tok = train_tokenizer(tokenizer_corpus(SpanVLAConfig(), n=60))
    r = None
    for frames_read in (1, 4):
        pol = SpanVLAPolicy.build(SpanVLAConfig(traffic_lights=True, light_frames=frames_read), tok, seed=0)
        r = r or pol.reason(frames(seed=6), "go straight", 6.0, 0.0, PAST, max_new_tokens=3)
        front = r.bridge.front_features
        older_changed = front.clone()
        older_changed[:, 0] = torch.flip(older_changed[:, 0], dims=[1]) * 3.0
        with torch.no_grad():
            same = torch.allclose(pol.expert.light_logits(front), pol.expert.light_logits(older_changed))
        assert same == (frames_read == 1)


def test_a_views_readings_are_all_the_heads_take_from_it():
    """view_readings per view reproduce what the heads compute over several views at once (the light head pools
    all its frames' tokens together: each frame weighs by its log-sum-exp); the side cameras' views are read by the
    crossing head alone."""
    from spanvla_ros.model.perception import pooled_readings

    tok = train_tokenizer(tokenizer_corpus(SpanVLAConfig(), n=60))
    pol = SpanVLAPolicy.build(SpanVLAConfig(traffic_lights=True, light_frames=4, lead_perception=True,
                                            junction_lead_head=True, crossing_perception=True), tok, seed=0)
    expert = pol.expert
    front = pol.reason(frames(seed=3), "go straight", 6.0, 0.0, PAST, max_new_tokens=3).bridge.front_features
    with torch.no_grad():
        per_frame = pooled_readings(expert._light_token_outputs(front))            # (1, 4, 1 + classes)
        weights = torch.softmax(per_frame[..., 0], -1)[..., None]
        assert torch.allclose((weights * per_frame[..., 1:]).sum(1), expert.light_logits(front), atol=1e-5)
        views = front[0]
        hidden = expert.lead_head.view_readings(views).shape[-1]
        assert expert.view_readings(views, front=True).shape == (4, 3 * hidden + 1 + 3)
        assert torch.equal(expert.view_readings(views, front=False), expert.crossing_head.view_readings(views))


def test_the_heads_reading_error_is_one_mean_per_look():
    """HeadReadings.error over the student's views at two looks (look-major) gives each look its own error against
    the teacher's views: zero where a look's tokens are the teacher's, and the same for a look whether it comes
    alone or beside another, so a loss can weigh the default look apart from the drawn one."""
    from spanvla_ros.train.look_invariance import HeadReadings

    tok = train_tokenizer(tokenizer_corpus(SpanVLAConfig(), n=60))
    pol = SpanVLAPolicy.build(SpanVLAConfig(traffic_lights=True, light_frames=4, lead_perception=True,
                                            crossing_perception=True), tok, seed=0)
    cameras = list(pol.cfg.cameras) * 2
    front = pol.cfg.cameras[pol.reasoner.front_camera]
    with torch.no_grad():
        target = pol.reasoner.encode_images(frames(n=len(cameras), seed=4))
    heads = HeadReadings(pol.expert, front, target, cameras)
    drifted = target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = heads.error(torch.cat([drifted, target]), target, cameras)
        alone = heads.error(drifted, target, cameras)
    assert both.shape == (2,) and alone.shape == (1,)
    assert both[1] == 0.0 and both[0] > 0.0
    assert torch.allclose(both[0], alone[0])


def test_the_expert_takes_over_where_someone_else_drove_it_past_a_junction():
    """DAgger labels at a roundabout: the car is driven from outside (here with exactly the expert's own controls)
    onto the next roads; the expert taking over on a fork then drives on as it would have itself, not back
    towards the lane it last chose nor, with a route that no longer starts at its road, out of a random exit."""
    pytest.importorskip("highway_env", reason="highway-env is not installed")
    from spanvla_ros.data.generate import expert_rollout
    from spanvla_ros.sim.highway_backend import HighwayEnvBackend
    from spanvla_ros.sim.types import Control

    expert, driven = HighwayEnvBackend(render=False), HighwayEnvBackend(render=False)
    expert.reset("roundabout", 5)
    driven.reset("roundabout", 5)
    first_road = driven.ego.lane_index[:2]
    while driven.t < 4.0:
        expert.step(None)
        driven.step(Control(*[expert.ego.action[k] for k in ("acceleration", "steering")]))
    assert driven.ego.lane_index[:2] != first_road
    labels = expert_rollout(driven, 40)
    own = [expert.step(None).ego for _ in range(40)]
    gaps = [math.hypot(lab["ego"][0] - e.x, lab["ego"][1] - e.y) for lab, e in zip(labels[1:], own)]
    assert max(gaps) < 1.0, gaps            # without the take-over: 6.4 m
    expert.close()
    driven.close()
