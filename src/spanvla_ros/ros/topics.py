"""The planner's topics, the way Autoware's planning nodes name theirs: node-relative ``~/input/...`` and
``~/output/...`` in the node, connected to the names on the wire (the params file's ``topics``: carla-ros-bridge
conventions by default) by remapping rules built here, the one place that maps them. spanvla-drive,
drive.launch.py and spanvla-replay add these rules after the user's own (``--ros-args -r``, a launch file's
remappings), and the first matching rule wins, so a user's remap always beats the default."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

PLANNER_NODE = "spanvla_planner"
ODOMETRY = "~/input/odometry"
COMMAND = "~/input/command"
ROUTE = "~/input/route"
STOP_LINES = "~/input/stop_lines"
PATH = "~/output/path"
STATUS = "~/output/plan_status"
REASONING = "~/output/reasoning"
REASONING_TEXT = "~/output/reasoning_text"
MARKERS = "~/output/markers"
COMPRESSED = "/compressed"      # image_transport's compressed sub-topic


def camera(name: str) -> str:
    return f"~/input/camera/{name}/image"


def planner_remaps(camera_names: Sequence[str], topics: Mapping) -> list[tuple[str, str]]:
    """(node-relative name, name on the wire) for every planner topic; ``topics``: config.node_params("topics")."""
    if len(topics["camera_topics"]) != len(camera_names):
        raise ValueError("camera_names and camera_topics must have one entry per camera")
    pairs = []
    for name, wire in zip(camera_names, topics["camera_topics"]):
        pairs += [(camera(name), wire), (camera(name) + COMPRESSED, wire + COMPRESSED)]
    pairs += [(ODOMETRY, topics["odom_topic"]), (COMMAND, topics["command_topic"]), (ROUTE, topics["route_topic"]),
              (STOP_LINES, topics["stop_lines_topic"]), (PATH, topics["path_topic"]),
              (STATUS, topics["status_topic"]), (REASONING, topics["reasoning_topic"]),
              (REASONING_TEXT, topics["reasoning_text_topic"]), (MARKERS, topics["markers_topic"])]
    return pairs


def remap_arguments(pairs: Sequence[tuple[str, str]], node: str = PLANNER_NODE) -> list[str]:
    """``-r node:from:=to`` ROS arguments (for rclpy.init after ``--ros-args``), each limited to ``node``."""
    return [arg for a, b in pairs for arg in ("-r", f"{node}:{a}:={b}")]


def default_planner_remaps(params_file=None) -> list[tuple[str, str]]:
    from ..config import node_params

    return planner_remaps(node_params(PLANNER_NODE, params_file)["camera_names"], node_params("topics", params_file))
