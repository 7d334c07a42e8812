"""Training pipeline end to end on one generated episode: SFT 1 + 2, GRPO warm-up and the three branches,
checkpoints, CSV log, resume; and the GRPO reward's negative / recovery terms on real samples."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highway_env", reason="highway-env is not installed")
pytestmark = pytest.mark.slow
LIGHT_SEED = 11   # an intersection_straight episode whose approach sees green and red, and some samples past the line
CROSSING_SEED = 6  # one where other cars cross the ego's path in 4 of its 10 samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from spanvla_ros.data.generate import generate

    out = tmp_path_factory.mktemp("data")
    generate(out, ["lead_brake"], [2], kinds=("expert", "recovery"), progress=False)
    return out


def test_reward_penalises_negatives_and_rewards_recovery(dataset):
    from spanvla_ros.data.samples import load_samples, scene_maps
    from spanvla_ros.model.config import SpanVLAConfig
    from spanvla_ros.train.trainer import rewards

    samples = load_samples(dataset, SpanVLAConfig().cameras, progress=False)
    scenes = scene_maps(samples)
    s = next(x for x in samples if x.meta["negatives"])
    neg = np.asarray(s.meta["negatives"][0]["traj"], np.float32)
    scene = scenes[(s.meta["scenario"], s.meta["seed"])]
    plain = rewards(s, np.stack([s.future, neg]), scene, 0.5, 0.5, 0.0, False, False)
    with_neg = rewards(s, np.stack([s.future, neg]), scene, 0.5, 0.5, 0.0, True, False)
    assert plain[0] > 0.5                                  # the expert's own future scores well
    assert with_neg[1] <= plain[1] - 0.5 + 1e-6            # a confirmed negative pays the full w_N
    assert with_neg[0] > with_neg[1]
    rec = next(x for x in samples if x.meta["kind"] == "recovery")
    scene = scenes[(rec.meta["scenario"], rec.meta["seed"])]
    straight = rec.future.copy()
    straight[:, 1] = 0.0
    r = rewards(rec, np.stack([rec.future, straight]), scene, 0.5, 0.5, 0.0, False, True)
    r0 = rewards(rec, np.stack([rec.future, straight]), scene, 0.5, 0.5, 0.0, False, False)
    assert r[0] - r0[0] == pytest.approx(0.5, abs=1e-6)    # following the expert's way back earns w_R
    assert r[1] - r0[1] < 0.5


def test_trainer_runs_every_stage_and_resumes(dataset, tmp_path, capsys):
    from spanvla_ros.model.policy import SpanVLAPolicy
    from spanvla_ros.train.trainer import STAGES, main

    args = ["--data", str(dataset), "--out", str(tmp_path), "--sft-epochs", "1", "--flow-epochs", "2",
            "--grpo-iters", "2", "--batch", "4", "--group", "3"]
    assert main(args) == 0
    for st in STAGES:
        assert (tmp_path / st / "expert.safetensors").is_file(), st
    saved = json.loads((tmp_path / "train_config.json").read_text())   # the run's config, from the command line
    assert saved["flow_epochs"] == 2 and saved["group"] == 3 and saved["data"] == [str(dataset)]
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    stages = {r["stage"] for r in rows}
    assert {"sft1", "sft2", "grpo_warmup", "grpo_pos", "grpo_neg", "grpo_rec"} <= stages
    assert all(math.isfinite(float(r["value"])) for r in rows)
    sft = SpanVLAPolicy.from_pretrained(tmp_path / "sft")
    rec = SpanVLAPolicy.from_pretrained(tmp_path / "grpo_rec")
    pairs = zip(sft.expert.state_dict().values(), rec.expert.state_dict().values())
    diff = [float((a - b).abs().max()) for a, b in pairs]
    assert max(diff) > 0                                   # GRPO moved the expert
    assert rec.model_id.startswith("grpo_rec@")
    n = len(rows)
    capsys.readouterr()
    assert main(args) == 0                                 # everything finished: resume trains nothing
    out = capsys.readouterr().out
    assert "resume: loaded finished stage sft" in out and "stage grpo_rec already finished" in out
    assert len(list(csv.DictReader(open(tmp_path / "train_log.csv")))) == n


def test_epdms_reward_makes_running_the_red_light_cost(tmp_path):
    """At a red light the expert stops; a plan that keeps speed through the stop line scores fine on PDMS
    (no traffic-light term) but zero on EPDMS (TLC = 0), so only the EPDMS reward teaches GRPO to stop."""
    from spanvla_ros.data.generate import generate
    from spanvla_ros.data.samples import load_samples, scene_maps, score_plan
    from spanvla_ros.model.config import SpanVLAConfig
    from spanvla_ros.model.trajectory import history_trajectory
    from spanvla_ros.train.trainer import rewards

    generate(tmp_path, ["intersection_left"], [6], kinds=("expert",), progress=False)
    samples = load_samples(tmp_path, SpanVLAConfig().cameras, progress=False)
    stops = [s for s in samples if s.meta["speed"] > 3.0 and s.future[-1, 3] < 1.0]
    assert stops and all(s.meta["lights"] for s in stops), "the intersection samples carry the signal timeline"
    checked = 0
    for stop in stops:
        scene = scene_maps([stop])[(stop.meta["scenario"], stop.meta["seed"])]
        keep_speed = history_trajectory(stop.past, stop.meta["speed"], 0.5, 8, 0.5)
        if score_plan(stop, keep_speed, scene).NC < 1.0:
            continue   # running into the queue at the light: both metrics already zero it
        plans = np.stack([stop.future, keep_speed])
        pdms = rewards(stop, plans, scene, 0.5, 0.5, 0.0, False, False, metric="PDMS")
        epdms = rewards(stop, plans, scene, 0.5, 0.5, 0.0, False, False, metric="EPDMS")
        assert epdms[1] == 0.0 and pdms[1] > 0.3
        assert epdms[0] > 0.5 and epdms[0] > epdms[1]
        checked += 1
    assert checked, "no stop sample where keeping speed is collision-free"


def test_vlm_from_continues_sft1_and_trains_a_route_expert(dataset, tmp_path, capsys):
    """--vlm-from + --more-sft-epochs: SFT 1 goes on from that VLM (its weights move), then a fresh
    route-conditioned expert without the acceleration input, with stop lines and the traffic-light head
    (--traffic-lights), is trained on generated-reasoning bridges; --traffic-lights without a route is refused."""
    import torch

    from spanvla_ros.model.policy import SpanVLAPolicy
    from spanvla_ros.train.trainer import main

    base = tmp_path / "base"
    assert main(["--data", str(dataset), "--out", str(base), "--sft-epochs", "1", "--flow-epochs", "1",
                 "--batch", "4", "--skip-grpo", "--no-route"]) == 0
    old = SpanVLAPolicy.from_pretrained(base / "sft")
    assert not old.uses_route
    out_dir = tmp_path / "more"
    with pytest.raises(SystemExit, match="--traffic-lights needs the route input"):
        main(["--data", str(dataset), "--out", str(tmp_path / "x"), "--no-route", "--traffic-lights"])
    with pytest.raises(SystemExit, match="no positive samples of those scenarios"):
        main(["--data", str(dataset), "--out", str(tmp_path / "none"), "--vlm-from", str(base / "sft"),
              "--more-sft-epochs", "1", "--sft-scenarios", "roundabout", "--skip-grpo"])
    assert main(["--data", str(dataset), "--out", str(out_dir), "--vlm-from", str(base / "sft"),
                 "--more-sft-epochs", "1", "--flow-epochs", "1", "--batch", "4", "--skip-grpo",
                 "--sft-scenarios", "lead_brake", "--light-weight", "10", "--sft-lr", "1e-3", "--traffic-lights"]) == 0
    printed = capsys.readouterr().out
    assert "SFT stage 1 continued 1 epochs" in printed and "positives of lead_brake" in printed
    new = SpanVLAPolicy.from_pretrained(out_dir / "sft")
    assert new.uses_route and not new.cfg.expert_sees_accel
    assert new.cfg.ego_dim == old.cfg.ego_dim + 2 + 2 * len(new.cfg.route_lookahead_m) + 1 + 2   # route, stop line
    assert new.cfg.traffic_lights and not old.cfg.traffic_lights
    moved = [float((a - b).abs().max()) for a, b in zip(old.reasoner.model.state_dict().values(),
                                                       new.reasoner.model.state_dict().values())]
    assert max(moved) > 0
    rows = [r for r in csv.DictReader(open(out_dir / "train_log.csv")) if r["stage"] == "sft1"]
    assert rows and all(math.isfinite(float(r["value"])) for r in rows)
    assert torch.isfinite(torch.cat([p.flatten() for p in new.expert.parameters()])).all()


@pytest.fixture(scope="module")
def isec_dataset(tmp_path_factory):
    from spanvla_ros.data.generate import generate

    out = tmp_path_factory.mktemp("isec")
    generate(out, ["intersection_straight"], [LIGHT_SEED], kinds=("expert",), progress=False)
    return out


@pytest.fixture(scope="module")
def crossing_dataset(tmp_path_factory):
    from spanvla_ros.data.generate import generate

    out = tmp_path_factory.mktemp("crossing")
    generate(out, ["intersection_straight"], [CROSSING_SEED], kinds=("expert",), progress=False)
    return out


def test_light_head_learns_the_signal_before_the_stop_line(isec_dataset, tmp_path):
    """At an intersection the samples with the stop line ahead are labelled with the signal's colour (those past
    it are not); SFT 2 trains the traffic-light head on them: its cross-entropy on those frames falls."""
    import torch

    from spanvla_ros.data.samples import attach_routes, light_label, load_samples, scene_maps
    from spanvla_ros.model.bridge import collate_bridges
    from spanvla_ros.model.config import SpanVLAConfig
    from spanvla_ros.train.trainer import CsvLog, build_initial, precompute_bridges, sft_flow

    samples = load_samples(isec_dataset, SpanVLAConfig().cameras, progress=False)
    attach_routes(samples, scene_maps(samples))
    labels = torch.tensor([light_label(s) for s in samples])
    assert len(set(labels.tolist()) - {-100}) >= 2 and (labels == -100).any()   # two colours; some past the line
    policy = build_initial(samples, "noise", 0, lights=True)
    bridges = precompute_bridges(policy, samples, text="reference")
    batch, seen = collate_bridges(bridges), labels >= 0

    def light_ce():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(policy.expert.light_logits(batch)[seen], labels[seen]))
    before = light_ce()
    sft_flow(policy, samples, bridges, 15, 4, 1e-3, CsvLog(tmp_path / "log.csv"))
    assert light_ce() < 0.5 * before


def test_heads_finetune_trains_the_perception_heads_and_nothing_else(isec_dataset, crossing_dataset, tmp_path):
    """--heads-finetune CHECKPOINT: the light head's cross-entropy on the data falls; the VLM and every expert
    weight outside the heads are the checkpoint's, bit for bit."""
    import torch

    from spanvla_ros.data.samples import attach_routes, light_label, load_samples, scene_maps
    from spanvla_ros.model.batch import ego_tensor
    from spanvla_ros.model.config import LIGHT_STATES, SpanVLAConfig
    from spanvla_ros.model.perception import PooledTokenHead, crossing_targets_tensor
    from spanvla_ros.model.policy import SpanVLAPolicy
    from spanvla_ros.train.trainer import PERCEPTION_PREFIXES, build_initial, crossing_views, front_tokens, main

    samples = load_samples(isec_dataset, SpanVLAConfig().cameras, progress=False)
    attach_routes(samples, scene_maps(samples))
    base = build_initial(samples, "noise", 0, lights=True)
    base.save_pretrained(tmp_path / "base")
    labels = torch.tensor([light_label(s) for s in samples])
    fronts = torch.cat(front_tokens(base, samples))[labels >= 0]

    def light_ce(policy):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(policy.expert.light_logits(fronts), labels[labels >= 0]))

    with pytest.raises(SystemExit, match="starts from a finished checkpoint"):
        main(["--data", str(isec_dataset), "--out", str(tmp_path / "x"), "--heads-finetune", str(tmp_path / "base"),
              "--vlm-from", str(tmp_path / "base")])
    assert main(["--data", str(isec_dataset), "--out", str(tmp_path / "ft"), "--heads-finetune",
                 str(tmp_path / "base"), "--head-epochs", "40", "--head-lr", "2e-3"]) == 0
    old, new = SpanVLAPolicy.from_pretrained(tmp_path / "base"), SpanVLAPolicy.from_pretrained(tmp_path / "ft" / "sft")
    assert light_ce(new) < 0.5 * light_ce(old)
    same = {name: torch.equal(a, b) for (name, a), b in zip(old.expert.state_dict().items(),
                                                            new.expert.state_dict().values())}
    assert all(eq for name, eq in same.items() if not name.startswith(PERCEPTION_PREFIXES))
    assert not all(eq for name, eq in same.items() if name.startswith(PERCEPTION_PREFIXES))
    assert all(torch.equal(a, b) for a, b in zip(old.reasoner.model.state_dict().values(),
                                                 new.reasoner.model.state_dict().values()))

    # --signal-views: the light head alone, on the data's stop-line frames plus the intersection scenes rendered in
    # every colour; it learns to read the rendered ones
    from spanvla_ros.train.trainer import signal_view_tokens

    rendered, rendered_fronts = signal_view_tokens(base, [LIGHT_SEED])
    assert {s.meta["lights"][0.0] for s in rendered} == set(LIGHT_STATES)
    rendered_labels = torch.tensor([light_label(s) for s in rendered])

    def rendered_ce(policy):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(policy.expert.light_logits(torch.cat(rendered_fronts)),
                                                           rendered_labels))

    assert main(["--data", str(isec_dataset), "--out", str(tmp_path / "sv"), "--heads-finetune",
                 str(tmp_path / "base"), "--signal-views", str(LIGHT_SEED), "--head-epochs", "40",
                 "--head-lr", "2e-3"]) == 0
    repainted = SpanVLAPolicy.from_pretrained(tmp_path / "sv" / "sft")
    assert rendered_ce(repainted) < 0.5 * rendered_ce(old)
    changed = {name for (name, a), b in zip(old.expert.state_dict().items(), repainted.expert.state_dict().values())
               if not torch.equal(a, b)}
    assert changed and all(name.startswith("light_head.") for name in changed)

    # --crossing-perception adds the crossing-traffic head and trains it alone: every other weight is the base's
    assert main(["--data", str(crossing_dataset), "--out", str(tmp_path / "cx"), "--heads-finetune",
                 str(tmp_path / "base"), "--crossing-perception", "--head-epochs", "40", "--head-lr", "2e-3"]) == 0
    samples = load_samples(crossing_dataset, SpanVLAConfig().cameras, progress=False)
    attach_routes(samples, scene_maps(samples))
    crossing = SpanVLAPolicy.from_pretrained(tmp_path / "cx" / "sft")
    assert crossing.cfg.crossing_perception and not old.cfg.crossing_perception
    state = crossing.expert.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in old.expert.state_dict().items())
    assert any(k.startswith("crossing_head.") for k in state)
    targets = crossing_targets_tensor([s.meta for s in samples], crossing.cfg.dt)
    assert 0 < int((targets[:, 0] > 0.5).sum()) < len(samples)
    with torch.no_grad():
        views = torch.cat(crossing_views(crossing, samples))
        ego = ego_tensor(crossing, samples)
        fresh_head = PooledTokenHead(crossing.reasoner.front_token_dim, crossing.reasoner.front_tokens,
                                     views.shape[1])
        fresh_head.fit(views, crossing.reasoner.front_token_rc)
        trained = crossing.expert.crossing_head
        assert (trained.loss(trained(views, ego[:, 0]), targets)
                < 0.5 * fresh_head.loss(fresh_head(views, ego[:, 0]), targets))

    # --heads-from a checkpoint with a crossing head: a fresh expert takes it too, weights and standardisation
    from spanvla_ros.train.trainer import load_perception_heads

    fresh = SpanVLAPolicy.from_pretrained(tmp_path / "base")
    load_perception_heads(fresh, tmp_path / "cx" / "sft")
    taken = fresh.expert.state_dict()
    assert fresh.cfg.crossing_perception
    assert all(torch.equal(v, taken[k]) for k, v in state.items() if k.startswith(PERCEPTION_PREFIXES))


def test_finetune_heads_trains_only_the_heads_named(dataset, tmp_path):
    """--heads-finetune CKPT --finetune-heads lead: the lead head's loss on the data falls and it is the only
    weight that changes (the light head the text is also written from stays bit-identical)."""
    import torch

    from spanvla_ros.data.samples import attach_routes, load_samples, scene_maps
    from spanvla_ros.model.batch import ego_tensor
    from spanvla_ros.model.config import SpanVLAConfig
    from spanvla_ros.model.policy import SpanVLAPolicy
    from spanvla_ros.train.trainer import build_initial, front_tokens, main, perception_loss

    samples = load_samples(dataset, SpanVLAConfig().cameras, progress=False)
    attach_routes(samples, scene_maps(samples))
    base = build_initial(samples, "noise", 0, lights=True, lead=True)
    base.save_pretrained(tmp_path / "base")
    fronts = torch.cat(front_tokens(base, samples))

    def lead_loss(policy):
        with torch.no_grad():
            return float(perception_loss(samples, None,
                                         policy.expert.lead_raw(fronts, ego_tensor(policy, samples))))

    with pytest.raises(SystemExit, match="no head"):
        main(["--data", str(dataset), "--out", str(tmp_path / "x"), "--heads-finetune", str(tmp_path / "base"),
              "--finetune-heads", "lead,radar"])
    assert main(["--data", str(dataset), "--out", str(tmp_path / "ft"), "--heads-finetune", str(tmp_path / "base"),
                 "--finetune-heads", "lead", "--head-epochs", "40", "--head-lr", "2e-3"]) == 0
    tuned = SpanVLAPolicy.from_pretrained(tmp_path / "ft" / "sft")
    assert lead_loss(tuned) < 0.5 * lead_loss(base)
    changed = {name for (name, a), b in zip(base.expert.state_dict().items(), tuned.expert.state_dict().values())
               if not torch.equal(a, b)}
    assert changed and all(name.startswith("lead_head.") for name in changed)


def test_expert_finetune_trains_the_flow_and_keeps_the_vlm_and_heads(dataset, tmp_path):
    """--expert-finetune CKPT: the flow-matching loss on the data falls from the checkpoint's expert (continued,
    not a fresh one), and the VLM and the perception heads stay bit-identical."""
    import torch

    from spanvla_ros.data.samples import attach_routes, load_samples, scene_maps
    from spanvla_ros.model.batch import ego_tensor, his_tensor
    from spanvla_ros.model.bridge import collate_bridges
    from spanvla_ros.model.config import SpanVLAConfig
    from spanvla_ros.model.policy import SpanVLAPolicy, vlm_digest
    from spanvla_ros.train.trainer import PERCEPTION_PREFIXES, build_initial, main, precompute_bridges

    samples = load_samples(dataset, SpanVLAConfig().cameras, progress=False)
    attach_routes(samples, scene_maps(samples))
    base = build_initial(samples, "history", 0, lights=True, lead=True)
    base.save_pretrained(tmp_path / "base")
    bridges = collate_bridges(precompute_bridges(base, samples))
    future = torch.from_numpy(np.stack([s.future for s in samples]))

    def flow_loss(policy):
        with torch.no_grad():
            ego = ego_tensor(policy, samples)
            return float(policy.expert.flow_loss(bridges, future, his_tensor(policy, samples), ego,
                                                 t=torch.full((len(samples),), 0.5),
                                                 generator=torch.Generator().manual_seed(0),
                                                 percept=policy.expert.percept(bridges, ego)))

    with pytest.raises(SystemExit, match="keeps its VLM"):
        main(["--data", str(dataset), "--out", str(tmp_path / "x"), "--expert-finetune", str(tmp_path / "base"),
              "--vlm-from", str(tmp_path / "base")])
    assert main(["--data", str(dataset), "--out", str(tmp_path / "ft"), "--expert-finetune", str(tmp_path / "base"),
                 "--flow-epochs", "20", "--flow-lr", "2e-3", "--batch", "4", "--skip-grpo"]) == 0
    tuned = SpanVLAPolicy.from_pretrained(tmp_path / "ft" / "sft")
    assert flow_loss(tuned) < 0.7 * flow_loss(base)
    changed = {name for (name, a), b in zip(base.expert.state_dict().items(), tuned.expert.state_dict().values())
               if not torch.equal(a, b)}
    assert changed and not any(name.startswith(PERCEPTION_PREFIXES) for name in changed)
    assert vlm_digest(tuned) == vlm_digest(base)


def test_finetune_junction_lead_adds_a_head_trained_on_junction_frames_only(dataset, isec_dataset, tmp_path):
    """--finetune-heads junction_lead on a checkpoint without one: a junction lead head (a copy of the lead head)
    is added and trained on the frames at a junction, where its lead loss falls; every other weight stays
    bit-identical, so away from junctions the model reads exactly what it read before."""
    import torch

    from spanvla_ros.data.samples import attach_routes, load_samples, scene_maps
    from spanvla_ros.model.batch import ego_tensor, junction_tensor
    from spanvla_ros.model.config import SpanVLAConfig
    from spanvla_ros.model.policy import SpanVLAPolicy
    from spanvla_ros.train.trainer import build_initial, front_tokens, main, perception_loss

    samples = [s for d in (dataset, isec_dataset) for s in load_samples(d, SpanVLAConfig().cameras, progress=False)]
    attach_routes(samples, scene_maps(samples))
    at = junction_tensor(samples)
    assert at.any() and not at.all()
    base = build_initial(samples, "noise", 0, lights=True, lead=True)
    base.save_pretrained(tmp_path / "base")
    fronts = torch.cat(front_tokens(base, samples))
    ego = ego_tensor(base, samples)

    def lead_loss(policy, rows):
        with torch.no_grad():
            raw = policy.expert.lead_raw(fronts[rows], ego[rows], at[rows])
            return float(perception_loss([samples[i] for i in rows.nonzero()[:, 0]], None, raw))

    assert main(["--data", str(dataset), str(isec_dataset), "--out", str(tmp_path / "ft"),
                 "--heads-finetune", str(tmp_path / "base"), "--finetune-heads", "junction_lead",
                 "--head-epochs", "40", "--head-lr", "2e-3"]) == 0
    tuned = SpanVLAPolicy.from_pretrained(tmp_path / "ft" / "sft")
    assert tuned.cfg.junction_lead_head
    assert lead_loss(tuned, at) < 0.5 * lead_loss(base, at)
    old, new = base.expert.state_dict(), tuned.expert.state_dict()
    assert all(torch.equal(v, new[k]) for k, v in old.items())
    assert set(new) - set(old) == {k for k in new if k.startswith("junction_lead_head.")}
    with torch.no_grad():
        torch.testing.assert_close(tuned.expert.lead_raw(fronts[~at], ego[~at], at[~at]),
                                   base.expert.lead_raw(fronts[~at], ego[~at]))
    # then the lead head alone: it trains on the frames away from junctions, the junction head stays as it is
    assert main(["--data", str(dataset), str(isec_dataset), "--out", str(tmp_path / "ft2"),
                 "--heads-finetune", str(tmp_path / "ft" / "sft"), "--finetune-heads", "lead",
                 "--head-epochs", "5", "--head-lr", "2e-3"]) == 0
    again = SpanVLAPolicy.from_pretrained(tmp_path / "ft2" / "sft").expert.state_dict()
    changed = {k for k, v in new.items() if not torch.equal(v, again[k])}
    assert changed and all(k.startswith("lead_head.") for k in changed)


def test_salient_token_error_is_the_error_on_the_tokens_that_stand_out_of_their_frame():
    """A frame's salient tokens are those farthest from its median token (a car on asphalt), whatever their place;
    the salient error is the error there, which a mean over every token dilutes."""
    import torch

    from spanvla_ros.train.look_invariance import SALIENT_FRACTION, salient_tokens, token_error

    gen = torch.Generator().manual_seed(0)
    target = 0.1 * torch.randn(2, 100, 8, generator=gen)
    car = (torch.tensor([17, 3]), torch.tensor([60, 91]))
    target[0, car[0]] += 5.0
    target[1, car[1]] += 5.0
    scale = torch.ones(8)
    salient = salient_tokens(target, scale)
    assert salient.shape == (2, round(100 * SALIENT_FRACTION))
    assert set(car[0].tolist()) <= set(salient[0].tolist()) and set(car[1].tolist()) <= set(salient[1].tolist())
    drifted = target.clone()
    drifted[0, car[0]] += 1.0
    drifted[1, car[1]] += 1.0
    assert token_error(drifted, target, scale) == pytest.approx(0.02)
    assert token_error(drifted, target, scale, salient) == pytest.approx(0.4)


def test_encoder_finetune_makes_the_tokens_look_invariant_and_changes_nothing_else(dataset, tmp_path):
    """--encoder-finetune CKPT: on held-out seeds the encoder's tokens of a frame at a drawn look, and what the frozen
    heads read from them, come nearer its old ones of the same state at the default look; the expert, the language
    model and the patch merger that feeds it stay bit-identical."""
    import torch

    from spanvla_ros.data.samples import attach_routes, load_samples, scene_maps
    from spanvla_ros.model.config import SpanVLAConfig
    from spanvla_ros.model.policy import SpanVLAPolicy
    from spanvla_ros.train.trainer import build_initial, main

    samples = load_samples(dataset, SpanVLAConfig().cameras, progress=False)
    attach_routes(samples, scene_maps(samples))
    base = build_initial(samples, "noise", 0, lights=True, lead=True)
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(SystemExit, match="renders its own views"):
        main(["--data", str(dataset), "--out", str(tmp_path / "x"), "--encoder-finetune", str(tmp_path / "base")])
    assert main(["--out", str(tmp_path / "enc"), "--encoder-finetune", str(tmp_path / "base"), "--look-scenarios",
                 "highway", "--look-seeds", "900:904", "--encoder-epochs", "4", "--batch", "16",
                 "--encoder-lr", "1e-3", "--look-salient-weight", "1"]) == 0
    report = json.loads((tmp_path / "enc" / "look_invariance.json").read_text())
    before, after = report["before"], report["after"]
    assert before["default"] == before["default_salient"] == before["default_heads"] == 0.0
    assert after["drawn"] < 0.8 * before["drawn"]
    assert after["drawn_salient"] < before["drawn_salient"]
    # through the frozen heads' readings alone
    assert main(["--out", str(tmp_path / "enc_heads"), "--encoder-finetune", str(tmp_path / "base"),
                 "--look-scenarios", "highway", "--look-seeds", "900:904", "--encoder-epochs", "4", "--batch", "16",
                 "--encoder-lr", "1e-3", "--look-head-weight", "1"]) == 0
    by_heads = json.loads((tmp_path / "enc_heads" / "look_invariance.json").read_text())
    assert by_heads["after"]["drawn_heads"] < 0.8 * by_heads["before"]["drawn_heads"]
    tuned = SpanVLAPolicy.from_pretrained(tmp_path / "enc" / "sft")
    assert all(torch.equal(a, b) for a, b in zip(base.expert.state_dict().values(),
                                                  tuned.expert.state_dict().values()))
    old, new = base.reasoner.model.state_dict(), tuned.reasoner.model.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.startswith("model.visual.") and ".merger." not in k for k in changed)


def test_the_training_command_line_is_the_config_dataclass():
    """Every TrainConfig field is a flag with the field's default; combinations that cannot train are refused
    before anything runs."""
    import dataclasses

    from spanvla_ros.train.config import TrainConfig

    cfg = TrainConfig.from_args(["--data", "A", "B", "--out", "R", "--flow-init", "noise", "--skip-grpo"])
    assert cfg.data == [Path("A"), Path("B")] and cfg.flow_init == "noise" and cfg.skip_grpo
    defaults = TrainConfig(data=[Path("A"), Path("B")], out=Path("R"), flow_init="noise", skip_grpo=True)
    assert cfg == defaults
    flags = {a.dest for a in TrainConfig.parser()._actions} - {"help"}
    assert flags == {f.name for f in dataclasses.fields(TrainConfig)}
    with pytest.raises(SystemExit, match="needs the route input"):
        TrainConfig.from_args(["--data", "A", "--out", "R", "--traffic-lights", "--no-route"])
    with pytest.raises(SystemExit):
        TrainConfig.from_args(["--data", "A", "--out", "R", "--flow-init", "sideways"])
