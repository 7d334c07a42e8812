"""SpanVLA model core: reasoner -> bridge -> flow-matching expert, on a freshly built tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spanvla_ros.model import CheckpointError, SpanVLAConfig, bridge_layer_ids
from spanvla_ros.model.ar_baseline import ARActionDecoder, MotionCodebook
from spanvla_ros.model.corpus import tokenizer_corpus
from spanvla_ros.model.expert import flow_pair
from spanvla_ros.model.policy import SpanVLAPolicy
from spanvla_ros.model.tokenizer import train_tokenizer
from spanvla_ros.model.trajectory import history_trajectory, normalise

PAST = np.array([[-12.0, 0.6, 0.06], [-8.0, 0.3, 0.04], [-4.0, 0.1, 0.02], [0.0, 0.0, 0.0]])


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_corpus(SpanVLAConfig(), n=120))


@pytest.fixture(scope="module")
def policy(tokenizer):
    return SpanVLAPolicy.build(SpanVLAConfig(), tokenizer, seed=0)


def frames(n=12, seed=0, h=90, w=160):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_bridge_layer_ids_follow_stride():
    assert bridge_layer_ids(6, 2) == (1, 3, 5)
    assert bridge_layer_ids(6, 1) == (0, 1, 2, 3, 4, 5)
    assert bridge_layer_ids(6, 3) == (2, 5)
    assert bridge_layer_ids(7, 2) == (0, 2, 4, 6)
    with pytest.raises(ValueError):
        bridge_layer_ids(6, 0)


def test_full_path_shapes_and_dtypes(policy):
    r = policy.reason(frames(), "turn left", 8.0, -0.5, PAST, stamp=12.5, max_new_tokens=6, keep_cache=True)
    b = r.bridge
    cfg, rs = policy.cfg, policy.reasoner
    assert r.num_vision_tokens == 12 * (cfg.image_height // 28) * (cfg.image_width // 28)
    assert b.layer_ids == (1, 3, 5) and b.num_layers == 3 and b.stamp == 12.5
    assert b.keys[0].shape == (1, rs.num_kv_heads, b.seq_len, rs.head_dim) and b.keys[0].dtype == torch.float32
    assert b.seq_len == r.cache.get_seq_length()  # vision + prompt + reasoning + action token
    assert len(r.token_ids) <= 7 and r.token_ids[-1] == rs.action_token_id
    assert int(b.next_position[0]) > r.num_vision_tokens // 12  # text positions continue after the 3D vision grid
    assert not any(t.requires_grad for t in b.keys + b.values)
    traj = policy.plan(b, PAST, 8.0, -0.5, 0.02, "turn left")
    assert traj.shape == (cfg.horizon, 4) and traj.dtype == np.float32 and np.isfinite(traj).all()


def test_reasoning_that_repeats_one_token_is_ended_with_the_action_token(policy):
    from spanvla_ros.model.reasoner import MAX_TOKEN_REPEATS, degenerate

    assert degenerate([5, 7, 7, 7, 7]) and not degenerate([7, 7, 7, 5]) and not degenerate([7] * 3)
    # an untrained VLM decodes greedily into one token again and again: the text ends there, not at the budget
    r = policy.reason(frames(seed=4), "follow lane", 8.0, 0.0, PAST, max_new_tokens=40)
    body = r.token_ids[:-1]
    assert r.token_ids[-1] == policy.reasoner.action_token_id and len(body) < 40 and not r.hit_action_token
    assert degenerate(body) and not any(degenerate(body[:k]) for k in range(len(body)))
    assert MAX_TOKEN_REPEATS <= len(body)


def test_bridge_is_exactly_the_selected_cache_layers(tokenizer):
    cfg = SpanVLAConfig(bridge_layer_stride=3)
    pol = SpanVLAPolicy.build(cfg, tokenizer, seed=1)
    r = pol.reason(frames(), "follow lane", 5.0, 0.0, PAST, max_new_tokens=3, keep_cache=True)
    assert r.bridge.layer_ids == (2, 5) and pol.expert.num_layers == 2
    for k, v, i in zip(r.bridge.keys, r.bridge.values, r.bridge.layer_ids):
        assert torch.equal(k, r.cache.layers[i].keys) and torch.equal(v, r.cache.layers[i].values)


def test_history_init_at_t0_is_history_and_untrained_expert_returns_it(policy):
    a = torch.randn(2, 8, 4)
    his = torch.randn(2, 8, 4)
    x_t, target = flow_pair(a, his, torch.zeros(2))
    assert torch.equal(x_t, his) and torch.allclose(target, a - his)
    x_1, _ = flow_pair(a, his, torch.ones(2))
    assert torch.allclose(x_1, a)
    # zero-initialised output layer: velocity 0, so 5 Euler steps leave the history trajectory unchanged
    r = policy.reason(frames(), "follow lane", 8.0, 0.0, PAST, max_new_tokens=2)
    traj = policy.plan(r.bridge, PAST, 8.0, 0.0, 0.0, "follow lane")
    expected = history_trajectory(PAST, 8.0, 0.5, 8, 0.5)
    assert np.allclose(traj, expected, atol=1e-5)
    assert expected[-1, 1] < -1.0  # heading fell over the past poses (a right turn); the CTRV rollout keeps turning


def test_flow_matching_overfits_a_target_trajectory(policy):
    torch.manual_seed(0)
    expert = SpanVLAPolicy.make_expert(policy.cfg, policy.reasoner)
    r = policy.reason(frames(seed=3), "turn right", 6.0, 0.0, PAST, max_new_tokens=2)
    bridge = r.bridge.expand(32)
    a_his = torch.from_numpy(history_trajectory(PAST, 6.0, 0.5, 8, 0.5))[None].repeat(32, 1, 1)
    target = torch.from_numpy(history_trajectory(np.array([[0, 0, 0.3], [0, 0, 0.0]]), 5.0, 0.5, 8, 0.5))
    target = target[None].repeat(32, 1, 1)  # a right turn while the history curves left
    ego = torch.from_numpy(policy.ego_vector(6.0, 0.0, 0.0, "turn right"))[None].repeat(32, 1)
    opt = torch.optim.Adam(expert.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = expert.flow_loss(bridge, target, a_his, ego)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:5])
    with torch.no_grad():
        out = expert.sample(r.bridge, a_his[:1], ego[:1], steps=5)[0]
    ade = torch.linalg.norm(out[:, :2] - target[0, :, :2], dim=-1).mean().item()
    assert ade < 0.5, ade
    assert torch.linalg.norm(a_his[0, :, :2] - target[0, :, :2], dim=-1).mean().item() > 3.0


def test_noise_start_ablation_is_stochastic(tokenizer):
    pol = SpanVLAPolicy.build(SpanVLAConfig(flow_init="noise"), tokenizer, seed=2)
    r = pol.reason(frames(), "follow lane", 8.0, 0.0, PAST, max_new_tokens=2)
    a_his = torch.zeros(1, 8, 4)
    ego = torch.zeros(1, pol.cfg.ego_dim)
    s1 = pol.expert.sample(r.bridge, a_his, ego, generator=torch.Generator().manual_seed(1))
    s2 = pol.expert.sample(r.bridge, a_his, ego, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(s1, s2)
    his_n = normalise(torch.from_numpy(history_trajectory(PAST, 8.0, 0.5, 8, 0.5))[None], pol.cfg.action_scale)
    x0 = pol.expert.initial_state(his_n, torch.Generator().manual_seed(0))
    assert x0.shape == his_n.shape and not torch.allclose(x0, his_n)


def test_stochastic_sampler_gives_log_probs(policy):
    r = policy.reason(frames(), "follow lane", 8.0, 0.0, PAST, max_new_tokens=2)
    a_his = torch.from_numpy(history_trajectory(PAST, 8.0, 0.5, 8, 0.5))[None].repeat(4, 1, 1)
    ego = torch.zeros(4, policy.cfg.ego_dim)
    out, lp = policy.expert.sample(r.bridge.expand(4), a_his, ego, step_std=0.2, return_log_prob=True,
                                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 8, 4) and lp.shape == (4,) and torch.isfinite(lp).all()
    assert not torch.allclose(out[0], out[1])


def test_teacher_forced_batch_and_sft_step_reduces_loss(policy):
    import copy

    rs = copy.copy(policy.reasoner)
    rs.model = copy.deepcopy(policy.reasoner.model).train()
    prompts = [rs.prompt("follow lane", 8.0, 0.0, PAST[:, :2]), rs.prompt("turn left", 3.0, 1.0, PAST[:, :2])]
    texts = ["the lead vehicle is braking, keep distance.", "clear road, turn left at the junction."]
    imgs = [frames(seed=5), frames(seed=6)]
    opt = torch.optim.Adam(rs.model.parameters(), lr=3e-3)
    loss0, bridge = rs.teacher_forced(imgs, prompts, texts)
    assert bridge.batch_size == 2 and bridge.key_mask.shape == (2, bridge.seq_len)
    assert bridge.key_mask[0].sum() != bridge.key_mask[1].sum()  # different lengths, right padding masked
    for _ in range(15):
        loss, _ = rs.teacher_forced(imgs, prompts, texts, with_bridge=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * loss0.item()


def test_token_weight_moves_the_loss_onto_the_weighted_words(policy):
    """A uniform weight keeps the plain mean; a huge weight on the colour word leaves (almost) only that word's
    CE, which equals the next-token CE after the prefix (same causal logits)."""
    from spanvla_ros.data.scene_text import light_token_weight

    rs = policy.reasoner
    prompt = rs.prompt("turn left", 5.0, -1.0, PAST[:, :2])
    imgs = [frames(seed=7)]
    text = "the traffic light is red 12 meters ahead, then brake and stop."
    with torch.no_grad():
        plain, _ = rs.teacher_forced(imgs, [prompt], [text], with_bridge=False)
        uniform, _ = rs.teacher_forced(imgs, [prompt], [text], with_bridge=False,
                                       vocab_weights=rs.vocab_weights(lambda t: 1.0))
        colour, _ = rs.teacher_forced(imgs, [prompt], [text], with_bridge=False,
                                      vocab_weights=rs.vocab_weights(light_token_weight(1e6)))
        logits = rs._forward(rs.encode(imgs, [prompt + "the traffic light is"]))[0].logits[0, -1]
    red_ce = torch.nn.functional.cross_entropy(logits[None].float(),
                                               torch.tensor([rs.tokenizer.convert_tokens_to_ids("Ġred")]))
    assert torch.allclose(plain, uniform, atol=1e-5)
    assert abs(colour.item() - red_ce.item()) < 1e-3 and abs(colour.item() - plain.item()) > 1e-2


def test_save_load_roundtrip_is_identical(policy, tmp_path):
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = SpanVLAPolicy.from_pretrained(tmp_path / "ckpt")
    assert loaded.model_id.startswith("ckpt@")
    with torch.no_grad():
        for p in loaded.expert.out.parameters():  # make the expert's output non-trivial in both copies
            p.add_(0.01)
        for p in policy.expert.out.parameters():
            p.add_(0.01)
    try:
        a = policy.reason(frames(seed=9), "turn right", 7.0, 0.2, PAST, max_new_tokens=8)
        b = loaded.reason(frames(seed=9), "turn right", 7.0, 0.2, PAST, max_new_tokens=8)
        assert a.token_ids == b.token_ids and a.text == b.text
        assert all(torch.equal(x, y) for x, y in zip(a.bridge.keys, b.bridge.keys))
        ta = policy.plan(a.bridge, PAST, 7.0, 0.2, 0.0, "turn right")
        tb = loaded.plan(b.bridge, PAST, 7.0, 0.2, 0.0, "turn right")
        assert np.array_equal(ta, tb)
    finally:
        with torch.no_grad():
            for p in policy.expert.out.parameters():
                p.sub_(0.01)


def test_checkpoint_errors_are_clear(policy, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SpanVLAPolicy.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="spanvla.json is missing"):
        SpanVLAPolicy.from_pretrained(tmp_path / "empty")
    ck = tmp_path / "ck"
    policy.save_pretrained(ck)
    data = (ck / "expert.safetensors").read_bytes()
    (ck / "expert.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="expert.safetensors"):
        SpanVLAPolicy.from_pretrained(ck)
    (ck / "spanvla.json").write_text('{"horizon": 8, "bogus": 1}')
    with pytest.raises(CheckpointError, match="corrupt"):
        SpanVLAPolicy.from_pretrained(ck)
    (ck / "spanvla.json").write_text("{}")
    (ck / "vlm" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        SpanVLAPolicy.from_pretrained(ck)


def test_wrong_image_count_and_type(policy):
    with pytest.raises(ValueError, match="expected 12 images"):
        policy.reason(frames(11), "follow lane", 8.0, 0.0, PAST)
    bad = frames()
    bad[4] = bad[4][:, :, 0]
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        policy.reason(bad, "follow lane", 8.0, 0.0, PAST)


def test_ar_baseline_codebook_and_decoding(policy):
    cb = MotionCodebook(dt=0.5)
    target = history_trajectory(PAST, 8.0, 0.5, 8, 0.5)
    recon = cb.decode(cb.encode(target))
    assert np.linalg.norm(recon[:, :2] - target[:, :2], axis=1).max() < 0.5
    ar = ARActionDecoder(policy.reasoner, cb)
    assert ar.reasoner.model is not policy.reasoner.model  # the SpanVLA VLM keeps its vocabulary
    prompt = ar.reasoner.prompt("follow lane", 8.0, 0.0, PAST[:, :2])
    r = ar.reasoner.reason(frames(), prompt, max_new_tokens=3, keep_cache=True)
    seq_before = r.cache.get_seq_length()
    traj, secs = ar.decode_trajectory(r, 10)
    assert traj.shape == (10, 4) and secs > 0
    assert r.cache.get_seq_length() == seq_before + 9  # one decode step per action point after the first


def test_bridge_collate_split_and_group_repeat(policy):
    """Padding-aware batching of bridges of different lengths gives the same plans as one-by-one."""
    from spanvla_ros.model.bridge import collate_bridges, split_bridge

    b1 = policy.reason(frames(seed=1), "follow lane", 8.0, 0.0, PAST, max_new_tokens=2).bridge
    b2 = policy.reason(frames(seed=2), "turn left", 6.0, 0.0, PAST, max_new_tokens=7).bridge
    batch = collate_bridges([b1, b2])
    assert batch.batch_size == 2 and batch.key_mask.sum(1).tolist() == [b1.seq_len, b2.seq_len]
    back = split_bridge(batch)
    assert [b.seq_len for b in back] == [b1.seq_len, b2.seq_len]
    assert torch.equal(back[1].keys[0], b2.keys[0]) and torch.equal(back[0].values[-1], b1.values[-1])
    assert torch.equal(back[1].front_features, b2.front_features)   # the light head's input travels along
    # give the expert a non-zero velocity field so the comparison means something
    torch.manual_seed(3)
    expert = SpanVLAPolicy.make_expert(policy.cfg, policy.reasoner)
    for p in expert.parameters():
        torch.nn.init.normal_(p, std=0.05)
    a_his = torch.randn(2, 8, 4)
    ego = torch.randn(2, policy.cfg.ego_dim)
    with torch.no_grad():
        together = expert.sample(batch, a_his, ego)
        alone = torch.cat([expert.sample(b1, a_his[:1], ego[:1]), expert.sample(b2, a_his[1:], ego[1:])])
        grouped = expert.sample(batch.repeat_interleave(3), a_his.repeat_interleave(3, 0), ego.repeat_interleave(3, 0))
    assert not torch.allclose(together, a_his, atol=1e-3)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(grouped[3:6], alone[1:].expand(3, -1, -1), atol=1e-5)


def test_route_features_in_the_ego_frame():
    from spanvla_ros.model.route import feature_dim, route_features

    look = (5.0, 20.0)
    straight = np.stack([np.arange(0.0, 100.0, 2.0), np.zeros(50)], 1)
    f = route_features(straight, (10.0, 1.0, 0.1), look)   # 1 m left of the route, yawed 0.1 rad left
    assert f.shape == (feature_dim(look),) and f[-1] == 1.0
    assert f[0] == pytest.approx(-0.5)                      # route centre 1 m to the right, in units of 2 m
    assert f[1] == pytest.approx(-0.2)                      # route heads 0.1 rad right of the ego
    c, s = np.cos(0.1), np.sin(0.1)
    for k, L in enumerate(look):                             # (15, 0) and (30, 0) world, seen from the ego
        dx, dy = 10.0 + L - 10.0, -1.0
        assert f[2 + 2 * k:4 + 2 * k] * 10.0 == pytest.approx([c * dx + s * dy, -s * dx + c * dy], abs=1e-5)
    # past the route's end the last segment is extended straight
    end = route_features(straight, (97.0, 0.0, 0.0), look)
    assert end[2:6] * 10.0 == pytest.approx([5.0, 0.0, 20.0, 0.0], abs=1e-5)
    # a left turn: the far point is to the left
    arc = np.stack([20 * np.sin(np.linspace(0, np.pi / 2, 40)), 20 - 20 * np.cos(np.linspace(0, np.pi / 2, 40))], 1)
    assert route_features(arc, (0.0, 0.0, 0.0), look)[5] > 0.5
    # no route: all zeros, validity 0
    assert not route_features(None, (0.0, 0.0, 0.0), look).any()


def test_hindsight_route_moves_by_whole_lanes():
    from spanvla_ros.model.route import hindsight_lane_route

    straight = np.stack([np.arange(0.0, 100.0, 2.0), np.zeros(50)], 1)
    np.testing.assert_allclose(hindsight_lane_route(straight, (60.0, 1.5), 4.0), straight)   # same lane
    left = hindsight_lane_route(straight, (60.0, 4.6), 4.0)
    assert np.allclose(left[:, 1], 4.0) and left[0, 0] == 0.0                                # one lane left
    assert np.allclose(hindsight_lane_route(straight, (60.0, -7.0), 4.0)[:, 1], -8.0)        # two lanes right


def test_route_input_config_and_old_checkpoints():
    cfg = SpanVLAConfig()
    assert cfg.ego_dim == 3 + len(cfg.commands) + 2 + 2 * len(cfg.route_lookahead_m) + 1
    assert SpanVLAConfig(traffic_lights=True).ego_dim == cfg.ego_dim + 2      # + the next stop line
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("route_lookahead_m", "ego_dim", "traffic_lights")}
    old = SpanVLAConfig.from_dict(saved | {"ego_dim": 3 + len(cfg.commands)})
    assert old.route_lookahead_m == () and old.ego_dim == 3 + len(cfg.commands)   # saved before the route input
    assert not old.traffic_lights
    with pytest.raises(ValueError, match="ego_dim"):
        SpanVLAConfig(ego_dim=7)
    with pytest.raises(ValueError, match="traffic_lights needs the route input"):
        SpanVLAConfig(route_lookahead_m=(), traffic_lights=True)


def test_stop_line_distance_along_the_route():
    from spanvla_ros.model.route import STOP_SCALE_M, stop_line_distance, stop_line_features

    straight = np.stack([np.arange(-100.0, 200.0, 2.0), np.zeros(150)], 1)
    line = np.array([[50.0, 0.5]])
    assert stop_line_distance(straight, line, (10.0, 1.0, 0.0)) == pytest.approx(40.0)
    np.testing.assert_allclose(stop_line_features(straight, line, (10.0, 0.0, 0.0)), [40.0 / STOP_SCALE_M, 1.0])
    assert stop_line_distance(straight, line, (49.0, 0.0, 0.0)) == pytest.approx(1.0)
    assert stop_line_distance(straight, line, (51.5, 0.0, 0.0)) == pytest.approx(-1.5)   # the nose is still behind it
    assert stop_line_distance(straight, line, (55.0, 0.0, 0.0)) is None                  # passed
    assert stop_line_distance(straight, line, (-20.0, 0.0, 0.0)) is None                 # 70 m: not yet relevant
    assert stop_line_distance(straight, np.array([[50.0, 8.0]]), (10.0, 0.0, 0.0)) is None   # another road's line
    assert stop_line_distance(straight, np.array([[50.0, 0.0], [30.0, 0.0]]), (10.0, 0.0, 0.0)) == pytest.approx(20.0)
    for route, stops in ((straight, None), (straight, np.zeros((0, 2))), (None, line)):
        assert not stop_line_features(route, stops, (10.0, 0.0, 0.0)).any()


def test_at_a_junction_from_before_a_stop_line_of_the_route_to_past_it():
    from spanvla_ros.model.route import JUNCTION_RANGE_M, at_junction

    straight = np.stack([np.arange(-100.0, 200.0, 2.0), np.zeros(150)], 1)
    line = np.array([[50.0, 0.5]])
    before, past = JUNCTION_RANGE_M[1], -JUNCTION_RANGE_M[0]
    assert not at_junction(straight, line, (50.0 - before - 1.0, 0.0, 0.0))
    assert at_junction(straight, line, (50.0 - before + 1.0, 0.0, 0.0))
    assert at_junction(straight, line, (55.0, 0.0, 0.0))                  # in the box: stop_line_distance says None
    assert at_junction(straight, line, (50.0 + past - 1.0, 0.0, 0.0))
    assert not at_junction(straight, line, (50.0 + past + 1.0, 0.0, 0.0))
    assert not at_junction(straight, np.array([[50.0, 8.0]]), (45.0, 0.0, 0.0))   # another road's line
    for route, stops in ((straight, None), (straight, np.zeros((0, 2))), (None, line)):
        assert not at_junction(route, stops, (45.0, 0.0, 0.0))


def test_the_junction_lead_head_reads_the_frames_at_a_junction_only(tokenizer):
    """lead_raw picks the head per sample: the lead head away from junctions, the junction lead head at one; a
    model without a junction head reads its lead head everywhere."""
    import dataclasses

    cfg = SpanVLAConfig(traffic_lights=True, lead_perception=True, junction_lead_head=True)
    expert = SpanVLAPolicy.build(cfg, tokenizer, seed=0).expert
    with torch.no_grad():
        expert.junction_lead_head.out[-1].bias.add_(torch.tensor([3.0, -1.0, 2.0]))
    tokens, dim = expert.lead_head.token_position.shape[0], expert.lead_head.token_mean.shape[0]
    views = torch.randn(3, cfg.history_frames, tokens, dim)
    ego = torch.randn(3, cfg.ego_dim)
    lead, junction = expert.lead_head(views, ego[:, 0]), expert.junction_lead_head(views, ego[:, 0])
    assert not torch.allclose(lead, junction)
    torch.testing.assert_close(expert.lead_raw(views, ego), lead)
    torch.testing.assert_close(expert.lead_raw(views, ego, True), junction)
    mixed = expert.lead_raw(views, ego, torch.tensor([True, False, True]))
    torch.testing.assert_close(mixed, torch.stack([junction[0], lead[1], junction[2]]))
    plain = SpanVLAPolicy.build(dataclasses.replace(cfg, junction_lead_head=False), tokenizer, seed=0).expert
    plain.load_state_dict({k: v for k, v in expert.state_dict().items() if not k.startswith("junction_lead_head.")})
    torch.testing.assert_close(plain.lead_raw(views, ego, True), lead)
    with pytest.raises(ValueError, match="junction_lead_head needs"):
        SpanVLAConfig(traffic_lights=True, junction_lead_head=True)


def test_traffic_light_head_conditions_the_expert_only_before_a_stop_line(tokenizer):
    """The light head reads the bridge's front-frame features; its probabilities join the ego conditioning only
    while a stop line is ahead, so away from intersections the frames' colours cannot move the plan."""
    import dataclasses

    policy = SpanVLAPolicy.build(SpanVLAConfig(traffic_lights=True), tokenizer, seed=0)
    expert = policy.expert
    r = policy.reason(frames(seed=5), "go straight", 6.0, 0.0, PAST, max_new_tokens=4)
    b = r.bridge
    rs = policy.reasoner
    assert b.front_features.shape == (1, policy.cfg.history_frames, rs.front_tokens, rs.front_token_dim)
    assert not b.front_features.requires_grad
    other = dataclasses.replace(b, front_features=b.front_features.flip(-1))
    route = np.stack([np.arange(-50.0, 150.0, 2.0), np.zeros(100)], 1)
    stop_line = np.array([[25.0, 0]])
    at_light = policy.ego_vector(6.0, 0.0, 0.0, "go straight", policy.route_input(route, (0, 0, 0), stop_line))
    no_light = policy.ego_vector(6.0, 0.0, 0.0, "go straight", policy.route_input(route, (0, 0, 0), None))
    with torch.no_grad():
        c_at, c_other = (expert.conditioning(e, expert.percept(br, e)) for br in (b, other)
                         for e in [torch.from_numpy(at_light)[None]])
        c_none, c_none_other = (expert.conditioning(e, expert.percept(br, e)) for br in (b, other)
                                for e in [torch.from_numpy(no_light)[None]])
    assert c_at.shape[1] == policy.cfg.ego_dim + 3
    assert float(c_at[0, -3:].sum()) == pytest.approx(1.0) and not torch.allclose(c_at, c_other)
    assert not c_none[0, -3:].any() and torch.equal(c_none, c_none_other)
    with pytest.raises(ValueError, match="front_features"):
        expert.light_logits(dataclasses.replace(b, front_features=None))


def test_shipped_default_follows_the_route():
    """The trained default steers toward the route it is given: the same scene with the route one lane to the
    left gives a plan that ends left of the plan for the route straight ahead, and without a route it still plans."""
    from conftest import REPO

    pol = SpanVLAPolicy.from_pretrained(REPO / "checkpoints" / "spanvla_default")
    assert pol.uses_route and not pol.cfg.expert_sees_accel and pol.cfg.traffic_lights
    r = pol.reason(frames(seed=3, h=112, w=196), "follow lane", 15.0, 0.0, PAST * 1.9, max_new_tokens=8)
    past = PAST * 1.9                                   # ~15 m/s, straight
    ahead = np.stack([np.arange(-20.0, 200.0, 2.0), np.zeros(110)], 1)
    plans = {dy: pol.plan(r.bridge, past, 15.0, 0.0, 0.0, "follow lane", route_xy=ahead + [0.0, dy], pose=(0, 0, 0))
             for dy in (0.0, 4.0, -4.0)}
    assert abs(plans[0.0][-1, 1]) < 1.5
    assert plans[4.0][-1, 1] > plans[0.0][-1, 1] + 1.5 and plans[-4.0][-1, 1] < plans[0.0][-1, 1] - 1.5
    no_route = pol.plan(r.bridge, past, 15.0, 0.0, 0.0, "follow lane")
    assert np.isfinite(no_route).all() and no_route[-1, 0] > 20.0


def test_3b_class_preset_has_qwen2_5_vl_3b_shapes(tokenizer):
    """Built on the meta device (no memory): the shapes and parameter count of Qwen2.5-VL-3B-Instruct."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from spanvla_ros.model.policy import vlm_config

    vcfg = vlm_config("qwen2.5-vl-3b-class", tokenizer)
    text, vision = vcfg.text_config, vcfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (2048, 36, 16, 2, 11008, 151936)
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (32, 1280, 2048)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(vcfg)
    assert 3.7e9 < sum(p.numel() for p in model.parameters()) < 3.8e9
    assert len(bridge_layer_ids(text.num_hidden_layers, SpanVLAConfig().bridge_layer_stride)) == 18


def test_a_bfloat16_vlm_feeds_the_float32_expert(policy, tmp_path):
    policy.save_pretrained(tmp_path / "ckpt")
    half = SpanVLAPolicy.from_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    assert half.reasoner.model.dtype == torch.bfloat16 and next(half.expert.parameters()).dtype == torch.float32
    r = half.reason(frames(seed=3), "follow lane", 8.0, 0.0, PAST, max_new_tokens=6)
    assert r.bridge.keys[0].dtype == torch.bfloat16
    traj = half.plan(r.bridge, PAST, 8.0, 0.0, 0.0, "follow lane")
    full = policy.plan(policy.reason(frames(seed=3), "follow lane", 8.0, 0.0, PAST, max_new_tokens=6).bridge,
                       PAST, 8.0, 0.0, 0.0, "follow lane")
    assert traj.dtype == np.float32 and np.isfinite(traj).all() and np.abs(traj - full).max() < 1.0
    with pytest.raises(ValueError, match="dtype"):
        SpanVLAPolicy.from_pretrained(tmp_path / "ckpt", dtype="int8")


def test_lora_sft_trains_adapters_on_the_language_model_and_merges_them(tokenizer, tmp_path):
    """SFT stage 1 with --lora-rank: peft adapters on the language model's attention; after merging, the VLM is a
    plain Hugging Face model again, its attention weights moved, its vision tower and MLPs did not, and the loss
    on the trained text fell."""
    pytest.importorskip("peft", reason="peft is not installed")
    from pathlib import Path

    from spanvla_ros.data.samples import Sample
    from spanvla_ros.model.batch import prompts
    from spanvla_ros.train.trainer import CsvLog, sft_reasoning

    policy = SpanVLAPolicy.build(SpanVLAConfig(), tokenizer, seed=4)
    text = "lead vehicle 20 meters ahead, gap is safe, so maintain speed and keep the lane."
    samples = [Sample(dict(command="follow lane", speed=8.0, accel=0.0, past=PAST.tolist(), reasoning=text),
                      frames(seed=k)) for k in range(4)]
    before = {k: v.clone() for k, v in policy.reasoner.model.state_dict().items()}

    def loss():
        with torch.no_grad():
            return float(policy.reasoner.teacher_forced([s.images for s in samples], prompts(policy, samples),
                                                        [text] * 4, with_bridge=False)[0])

    l0 = loss()
    sft_reasoning(policy, samples, epochs=6, batch=2, lr=5e-3, log=CsvLog(Path(tmp_path / "log.csv")), lora_rank=4)
    after = policy.reasoner.model.state_dict()
    assert type(policy.reasoner.model).__name__ == "Qwen2_5_VLForConditionalGeneration" and set(after) == set(before)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in moved)
    assert not any("visual" in k or "mlp" in k for k in moved)
    assert loss() < l0


def test_sft_in_bf16_autocast_with_gradient_checkpointing_learns(tokenizer, tmp_path, monkeypatch):
    """--bf16 --grad-checkpointing: SFT stage 1 runs its forward passes under bfloat16 autocast and the VLM
    recomputes activations in the backward pass (on while training, off after); the weights stay float32 and the
    loss on the trained text falls."""
    from pathlib import Path

    from spanvla_ros.data.samples import Sample
    from spanvla_ros.model.batch import prompts
    from spanvla_ros.train.trainer import CsvLog, sft_reasoning

    policy = SpanVLAPolicy.build(SpanVLAConfig(), tokenizer, seed=5)
    model = policy.reasoner.model
    text = "the lane ahead is free, so keep the speed."
    samples = [Sample(dict(command="follow lane", speed=8.0, accel=0.0, past=PAST.tolist(), reasoning=text),
                      frames(seed=k)) for k in range(4)]
    seen = {"checkpointing": [], "autocast": []}
    forward = model.forward

    def spy(*a, **k):
        seen["checkpointing"].append(model.is_gradient_checkpointing)
        seen["autocast"].append(torch.is_autocast_enabled("cpu"))
        return forward(*a, **k)

    monkeypatch.setattr(model, "forward", spy)

    def loss():
        with torch.no_grad():
            return float(policy.reasoner.teacher_forced([s.images for s in samples], prompts(policy, samples),
                                                        [text] * 4, with_bridge=False)[0])

    l0 = loss()
    seen = {"checkpointing": [], "autocast": []}
    sft_reasoning(policy, samples, epochs=4, batch=2, lr=5e-3, log=CsvLog(Path(tmp_path / "log.csv")), bf16=True,
                  grad_checkpointing=True)
    assert seen["checkpointing"] and all(seen["checkpointing"]) and all(seen["autocast"])
    assert not model.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loss() < l0
