"""The reasoner in a process of its own (planning.reasoner_process): the planner core driven through it gives the
same reasoning and bridge as in process; cancellation, bad requests, a checkpoint that cannot load, a worker that
dies (the node starts a new one)."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from conftest import REPO, requires_msgs, requires_ros
from helpers.planner_inputs import CAMS, feed, perception_policy
from spanvla_ros.config import node_params
from spanvla_ros.model.errors import ReasoningCancelled
from spanvla_ros.planning.core import PlannerCore, PlannerParams
from spanvla_ros.planning.reasoner_process import ReasonerProcess


@pytest.fixture(scope="module")
def policy():
    return perception_policy()


@pytest.fixture(scope="module")
def worker(policy):
    w = ReasonerProcess(policy, torch_threads=1, device="cpu", dtype="float32")
    yield w
    w.close()


def fed_core(policy) -> PlannerCore:
    core = PlannerCore(policy, PlannerParams.from_mapping(node_params("spanvla_planner")), CAMS)
    feed(core, 0.0, 1.6)
    return core


def test_the_core_reasons_through_the_process_as_in_process(policy, worker):
    core = fed_core(policy)
    local = core.reason()
    remote = core.reason(run=worker.reason)
    assert worker.alive() and worker.model_id == policy.model_id
    assert remote.text == local.text and remote.token_ids == local.token_ids
    assert remote.bridge.stamp == local.bridge.stamp and remote.bridge.layer_ids == local.bridge.layer_ids
    for a, b in zip(remote.bridge.keys + remote.bridge.values, local.bridge.keys + local.bridge.values):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(remote.bridge.front_features, local.bridge.front_features)
    assert core.counters["reasoner_runs"] == 2
    # the expert plans from the bridge that came back exactly as from its own
    core.bridge.publish(remote.bridge)
    from_remote = core.plan(now=1.6)
    core.bridge.publish(local.bridge)
    np.testing.assert_allclose(from_remote.traj, core.plan(now=1.6).traj, atol=1e-5)


def test_a_cancelled_run_raises_and_the_next_run_gets_its_own_answer(policy, worker):
    core = fed_core(policy)
    with pytest.raises(ReasoningCancelled):
        core.reason(cancel=lambda: True, run=worker.reason)
    after = core.reason(run=worker.reason)
    assert after.text == core.reason().text and worker.alive()


def test_a_failed_run_is_an_error_and_the_process_serves_on(policy, worker):
    with pytest.raises(RuntimeError, match="failed in its process"):
        worker.reason([], "straight", 10.0, 0.0, np.zeros((4, 3)))   # no frames
    assert worker.alive()
    assert fed_core(policy).reason(run=worker.reason).bridge is not None


def test_a_checkpoint_that_cannot_load_fails_at_start(tmp_path):
    with pytest.raises(RuntimeError, match="could not load"):
        ReasonerProcess(tmp_path / "missing", torch_threads=1, device="cpu", dtype="float32")


def test_a_dead_worker_is_an_error_not_a_hang(policy):
    w = ReasonerProcess(policy, torch_threads=1, device="cpu", dtype="float32")
    try:
        os.kill(w.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="exited"):
            fed_core(policy).reason(run=w.reason)
    finally:
        w.close()


@requires_ros
@requires_msgs
def test_the_planner_node_replaces_a_reasoner_process_that_died():
    import rclpy

    from spanvla_ros.nodes.planner import PlannerNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=["--ros-args", "--params-file", str(REPO / "params" / "spanvla.yaml"),
                                  "-p", "spanvla_planner:reasoner_rate_hz:=5.0"])
    node = PlannerNode(context=ctx)
    try:
        first = node.reasoner_process
        assert first is not None and first.alive()       # the shipped params run it in its own process
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while node.counters["reasoner_process_restarts"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        while node.reasoner_process is first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.counters["reasoner_process_restarts"] == 1
        assert node.reasoner_process.alive() and node.reasoner_process.pid != first.pid
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)
