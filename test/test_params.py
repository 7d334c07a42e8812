"""Parameters come from params/spanvla.yaml, checked against params/spanvla.schema.yaml: the ROS-free tools
refuse a params file that breaks the schema; the nodes declare typed, ranged, read-only-where-needed parameters
without defaults, refuse run-time changes the schema forbids and apply the ones it allows."""
from __future__ import annotations

import pytest
import yaml

from conftest import REPO, requires_msgs, requires_ros

PARAMS = REPO / "params" / "spanvla.yaml"


def _edited(tmp_path, node: str, **changes):
    data = yaml.safe_load(PARAMS.read_text())
    for k, v in changes.items():
        if v is None:
            data[node]["ros__parameters"].pop(k)
        else:
            data[node]["ros__parameters"][k] = v
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def test_the_shipped_params_file_follows_the_schema_and_a_broken_one_is_refused(tmp_path):
    from spanvla_ros.config import node_params, param_schema

    for node in ("spanvla_planner", "sim_bridge", "topics"):
        assert set(node_params(node, PARAMS)) == set(param_schema(node))
    for broken in (dict(flow_steps=0), dict(dtype="int8"), dict(reasoner_rate_hz="fast"), dict(bridge_stale_s=None),
                   dict(no_such_parameter=1)):
        with pytest.raises(ValueError) as err:
            node_params("spanvla_planner", _edited(tmp_path, "spanvla_planner", **broken))
        assert next(iter(broken)) in str(err.value)        # names the parameter


@requires_ros
@requires_msgs
def test_planner_parameters_are_declared_from_the_schema_and_changed_at_run_time(tmp_path):
    import rclpy
    from rclpy.parameter import Parameter

    from spanvla_ros.nodes.planner import PlannerNode
    from spanvla_ros.ros.topics import default_planner_remaps, remap_arguments

    ctx = rclpy.Context()
    user_remap = ["-r", "spanvla_planner:~/input/odometry:=/my_car/odom"]
    rclpy.init(context=ctx, args=["--ros-args", "--params-file", str(PARAMS), *user_remap,
                                  *remap_arguments(default_planner_remaps(PARAMS))])
    node = PlannerNode(context=ctx)
    try:
        # node-relative topics (~/input, ~/output) on the params file's names on the wire; the user's remap wins
        subscribed = {s.topic_name for s in node.subscriptions}
        published = {p.topic_name for p in node.publishers}
        assert "/my_car/odom" in subscribed and "/carla/ego_vehicle/odometry" not in subscribed
        assert {"/carla/ego_vehicle/rgb_front/image", "/carla/ego_vehicle/route"} <= subscribed
        assert {"/spanvla/path", "/spanvla/plan_status", "/spanvla/reasoning"} <= published
        descriptor = node.describe_parameter("flow_steps")
        assert descriptor.integer_range[0].from_value == 1 and not descriptor.read_only
        assert node.describe_parameter("checkpoint").read_only
        ok = node.set_parameters([Parameter("bridge_stale_s", value=4.0), Parameter("flow_steps", value=8)])
        assert all(r.successful for r in ok)
        assert node.core.params.bridge_stale_s == 4.0 and node.core.params.flow_steps == 8
        for bad in (Parameter("flow_steps", value=0), Parameter("checkpoint", value="/elsewhere"),
                    Parameter("reasoner_rate_hz", value="fast")):
            assert not node.set_parameters([bad])[0].successful
        assert node.core.params.flow_steps == 8 and node.params["checkpoint"] == ""
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    missing = _edited(tmp_path, "spanvla_planner", odom_timeout_s=None)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=["--ros-args", "--params-file", str(missing)])
    try:
        with pytest.raises(ValueError) as err:
            PlannerNode(context=ctx)
        assert "odom_timeout_s" in str(err.value)
    finally:
        rclpy.shutdown(context=ctx)


@requires_ros
@requires_msgs
def test_the_simulator_steps_at_the_rate_the_bridge_ticks_it(tmp_path):
    pytest.importorskip("highway_env", reason="highway-env is not installed")
    import rclpy

    from spanvla_ros.nodes.sim_bridge import SimBridgeNode
    from spanvla_ros.sim.highway_backend import HighwayEnvBackend

    params = _edited(tmp_path, "sim_bridge", sim_rate_hz=20.0)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=["--ros-args", "--params-file", str(params)])
    try:
        node = SimBridgeNode(context=ctx)
        assert node.backend.dt == pytest.approx(0.05)               # built at the node's rate
        node.destroy_node()
        with pytest.raises(ValueError):                             # a backend stepping at another rate is refused
            SimBridgeNode(context=ctx, backend=HighwayEnvBackend(control_dt=0.1, render=False))
    finally:
        rclpy.shutdown(context=ctx)


@requires_ros
@requires_msgs
def test_the_simulator_bridge_survives_a_backend_that_fails_mid_episode():
    """A simulator step that raises ends the episode (recorded with the error, counted) and the next one starts;
    a reset that raises is retried on the next tick. The process, planner and recording go on."""
    pytest.importorskip("highway_env", reason="highway-env is not installed")
    import rclpy

    from spanvla_ros.nodes.sim_bridge import SimBridgeNode
    from spanvla_ros.sim.highway_backend import HighwayEnvBackend

    class Flaky(HighwayEnvBackend):
        fail_step_at, fail_resets, steps = 3, 0, 0

        def step(self, control=None):
            self.steps += 1
            if self.steps == self.fail_step_at:
                self.fail_resets = 1
                raise RuntimeError("lost the server")
            return super().step(control)

        def reset(self, scenario, seed):
            if self.fail_resets:
                self.fail_resets -= 1
                raise RuntimeError("server still restarting")
            return super().reset(scenario, seed)

    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=["--ros-args", "--params-file", str(PARAMS)])
    try:
        node = SimBridgeNode(context=ctx, backend=Flaky(control_dt=0.1, render=False))
        for _ in range(3):
            node._tick()
        assert len(node.episodes) == 1 and "lost the server" in node.episodes[0]["error"]
        assert node.counters["backend_errors"] == 2 and node._restart_pending      # step, then the first reset
        node._tick()                                                                # the reset is retried
        assert not node._restart_pending and node._episode_index == 1
        t = node.obs.t
        node._tick()
        assert node.obs.t > t                                                       # the next episode runs
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
