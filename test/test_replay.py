"""Rosbag replay evaluation through the real planner node over DDS, including a truncated bag."""
from __future__ import annotations

import pytest

from conftest import REPO, requires_msgs, requires_ros

pytest.importorskip("highway_env", reason="highway-env is not installed")


@pytest.fixture(scope="module")
def episode_bag(tmp_path_factory):
    from spanvla_ros.data.generate import generate

    out = tmp_path_factory.mktemp("gen")
    idx = generate(out, ["lead_brake"], [11], kinds=("expert",), progress=False)
    return out / idx["episodes"][0]["bag"]


@requires_ros
@requires_msgs
@pytest.mark.dds
def test_replay_records_plans_and_scores_them(episode_bag, tmp_path):
    from spanvla_ros.data.bag_io import typestore
    from spanvla_ros.eval.replay import replay
    from rosbags.highlevel import AnyReader

    rep = replay(episode_bag, REPO / "params" / "spanvla.yaml", tmp_path, rate=2.0)
    assert not rep["partial"] and rep["replayed_messages"] > 300
    assert rep["plans"] > 20 and rep["scenario"] == "lead_brake"
    assert rep["mean"]["ade"] >= 0 and 0 <= rep["mean"]["PDMS"] <= 1
    assert rep["planner_counters"].get("reasoner_runs", 0) >= 2
    with AnyReader([tmp_path / "plans"], default_typestore=typestore()) as r:
        topics = {c.topic for c in r.connections}
    assert {"/spanvla/path", "/spanvla/plan_status", "/spanvla/reasoning"} <= topics
    assert (tmp_path / "replay.png").stat().st_size > 10_000
    # the run view combines the input bag's cameras with the recorded plans and reasoning
    from spanvla_ros.eval.run_view import read_run
    log = read_run([episode_bag, tmp_path / "plans"])
    assert len(log.plans) >= rep["plans"] and log.reasoning and not log.errors
    assert all(len(v) > 50 for v in log.images.values()) and log.route is not None
    assert rep["run_view"] and (tmp_path / "run_view.png").stat().st_size > 50_000


@requires_ros
@requires_msgs
@pytest.mark.dds
def test_replay_of_a_truncated_bag_gives_a_partial_report(episode_bag, tmp_path):
    import shutil

    from spanvla_ros.eval.replay import replay

    bag = tmp_path / "cut"
    shutil.copytree(episode_bag, bag)
    mcap = next(bag.glob("*.mcap"))
    data = mcap.read_bytes()
    mcap.write_bytes(data[: int(len(data) * 0.6)])
    rep = replay(bag, REPO / "params" / "spanvla.yaml", tmp_path / "out", rate=4.0)
    assert rep["partial"] and rep["read_error"]
    assert rep["replayed_messages"] > 0
