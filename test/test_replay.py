"""Rosbag replay evaluation through the real planner node over DDS, including a truncated bag."""
from __future__ import annotations

import numpy as np
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
    from rosbags.highlevel import AnyReader

    from spanvla_ros.data.bag_io import typestore
    from spanvla_ros.eval.replay import replay

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


def test_bag_stream_reads_lazily_in_order_and_a_truncated_mcap_up_to_its_break(episode_bag, tmp_path):
    import shutil

    from spanvla_ros.data.bag_io import ODOM_TOPIC, BagError, BagStream

    full = BagStream(episode_bag, {ODOM_TOPIC})
    assert full.connections() == {ODOM_TOPIC: "nav_msgs/msg/Odometry"}
    it = iter(full)
    first = next(it)                                    # a generator: nothing is read ahead
    rest = list(it)
    times = [first[0]] + [m[0] for m in rest]
    assert times == sorted(times) and {m[1] for m in rest} == {ODOM_TOPIC} and full.error is None
    cut = tmp_path / "cut"
    shutil.copytree(episode_bag, cut)
    f = next(cut.glob("*.mcap"))
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * 0.6)])   # no summary, the last chunk cut
    whole = {(m[0], m[1], m[3]) for m in BagStream(episode_bag)}
    part = BagStream(cut)
    got = [(m[0], m[1], m[3]) for m in part]
    assert part.error and 0 < len(got) < len(whole) and set(got) <= whole   # the same messages, up to the cut
    assert ODOM_TOPIC in part.connections()
    with pytest.raises(BagError):
        BagStream(tmp_path / "missing")


def test_plan_metrics_against_the_logged_drive():
    import numpy as np

    from spanvla_ros.eval.plan_metrics import plan_vs_log

    t = np.arange(1, 9) * 0.5
    truth = np.c_[10.0 * t, np.zeros(8), np.zeros(8)]
    same = plan_vs_log(truth, truth, 0.5)
    assert same["ade"] == same["fde"] == same["lateral_dev"] == same["ahe"] == 0.0
    assert same["progress_ratio"] == pytest.approx(1.0) and same["max_abs_lon_jerk"] == pytest.approx(0.0)
    assert {"ade_1s", "fde_2s", "ade_4s"} <= set(same)
    shifted = plan_vs_log(truth + [0.0, 1.0, 0.0], truth, 0.5)          # 1 m to the left all along
    assert shifted["lateral_dev"] == pytest.approx(1.0) and shifted["longitudinal_dev"] == pytest.approx(0.0)
    short = plan_vs_log(np.c_[5.0 * t, np.zeros(8), np.zeros(8)], truth, 0.5)   # half the speed
    assert short["progress_ratio"] == pytest.approx(0.5) and short["longitudinal_dev"] > 5.0
    assert short["fde_1s"] == pytest.approx(5.0) and short["fde"] == pytest.approx(20.0)
    turn = plan_vs_log(np.c_[10.0 * t, np.zeros(8), np.full(8, 0.2)], truth, 0.5)
    assert turn["ahe"] == pytest.approx(0.2) and turn["max_abs_lat_accel"] > 0.0
    with pytest.raises(ValueError):
        plan_vs_log(truth[:4], truth, 0.5)


@requires_ros
@requires_msgs
@pytest.mark.dds
def test_a_foreign_bag_replays_with_remaps_only(tmp_path):
    """Other topic names, resolution and encoding (bgra8 320x240): with --remap it replays and is scored with
    the metrics any bag gets; without, the error names what is missing."""
    from helpers.foreign_bag import remaps_to, write_foreign_bag
    from spanvla_ros.config import node_params
    from spanvla_ros.data.bag_io import BagError
    from spanvla_ros.eval.replay import parse_remaps, replay

    params = REPO / "params" / "spanvla.yaml"
    bag = write_foreign_bag(tmp_path / "foreign", seconds=8.0)
    with pytest.raises(BagError):                       # the planner's topic names are not in it
        replay(bag, params, tmp_path / "no_remap", rate=2.0)
    remap = parse_remaps(remaps_to(node_params("spanvla_planner", params)["camera_names"],
                                   node_params("topics", params)))
    rep = replay(bag, params, tmp_path / "out", rate=2.0, remap=remap, start_s=1.0, view=False)
    assert not rep["partial"] and rep["scenario"] is None and rep["plans"] > 5
    assert set(rep["topics"].values()) == set(remap.values())
    m = rep["mean"]
    assert {"ade_1s", "fde_4s", "ahe", "lateral_dev", "longitudinal_dev", "max_abs_lat_accel",
            "progress_ratio", "plan_consistency_m"} <= set(m)
    assert all(np.isfinite(v) for v in m.values())
    assert rep["planner_counters"].get("reasoner_runs", 0) >= 1 and rep["planner_counters"].get("bad_encoding", 0) == 0


def test_the_run_view_finds_a_foreign_bags_cameras_through_the_remaps(tmp_path):
    """A bag with its own camera names: the run view takes each camera from the topic replay maps onto it (by
    carla-ros-bridge naming alone it finds none)."""
    from helpers.foreign_bag import FOREIGN_CAMERAS, remaps_to, write_foreign_bag
    from spanvla_ros.config import node_params
    from spanvla_ros.eval.replay import camera_names_of, parse_remaps
    from spanvla_ros.eval.run_view import read_run

    params = REPO / "params" / "spanvla.yaml"
    bag = write_foreign_bag(tmp_path / "foreign", seconds=1.0, width=64, height=48)
    remap = parse_remaps(remaps_to(node_params("spanvla_planner", params)["camera_names"],
                                   node_params("topics", params)))
    names = camera_names_of(remap, params)
    assert names == {topic: cam for cam, topic in FOREIGN_CAMERAS.items()}
    log = read_run([bag], camera_topics=names)
    assert all(len(log.images[c]) == 10 and log.images[c][0][1].shape == (48, 64, 3) for c in FOREIGN_CAMERAS)
    assert not any(read_run([bag]).images.values())
