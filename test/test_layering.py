"""The package's layering, read from the source (no import runs): the core never imports ROS, the simulators never
import evaluation or training, evaluation never imports training, the planner core never imports simulators,
evaluation or training."""
from __future__ import annotations

import ast

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "spanvla_ros"
# ament_index_python is not in the list: a pure-Python package index lookup (the share directory), no ROS runtime
ROS_MODULES = ("rclpy", "rosidl", "launch", "launch_ros", "builtin_interfaces",
               "rosgraph_msgs", "std_msgs", "sensor_msgs", "nav_msgs", "geometry_msgs", "visualization_msgs",
               "diagnostic_msgs", "tf2_msgs", "rcl_interfaces", "spanvla_ros.msg")
# where ROS is allowed: the nodes, the ROS helpers, the console tools, and the bag player that drives the node
ROS_LAYERS = ("nodes", "ros", "cli", "msg")
ROS_MODULE_EXCEPTIONS = ("eval/replay.py",)
FORBIDDEN = {"sim": ("eval", "train"), "eval": ("train",), "planning": ("sim", "eval", "train"),
             "model": ("eval", "train", "planning"), "data": ("train",)}


def imports(path, top_level_only: bool = False) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against the package); with
    ``top_level_only`` only those imported when the module itself is (not inside functions)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return out


def is_ros(name: str) -> bool:
    return name.split(".")[0] in ROS_MODULES or name.startswith("spanvla_ros.msg")


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_package_has_the_layers_this_test_checks():
    layers = {p.relative_to(PACKAGE).parts[0] for p in modules() if len(p.relative_to(PACKAGE).parts) > 1}
    assert set(FORBIDDEN) <= layers and {"nodes", "ros", "cli"} <= layers


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layering(path):
    rel = path.relative_to(PACKAGE)
    layer = rel.parts[0] if len(rel.parts) > 1 else ""
    names = imports(path)
    if layer not in ROS_LAYERS and str(rel) not in ROS_MODULE_EXCEPTIONS:
        ros = sorted(n for n in names if is_ros(n) or n.startswith("spanvla_ros.nodes"))
        assert not ros, f"{rel} is ROS-free core but imports {ros}"
        # the message codecs of spanvla_ros.ros (image decoding, stamps) may be used if importing them imports no ROS
        for helper in {".".join(n.split(".")[:3]) for n in names if n.startswith("spanvla_ros.ros.")}:
            module = PACKAGE / "ros" / (helper.split(".")[2] + ".py")
            assert module.is_file(), helper
            ros = sorted(n for n in imports(module, top_level_only=True) if is_ros(n))
            assert not ros, f"{rel} imports {helper}, which imports {ros} when imported"
    for other in FORBIDDEN.get(layer, ()):
        bad = sorted(n for n in names if n.startswith(f"spanvla_ros.{other}"))
        assert not bad, f"{rel} ({layer}) must not import {other}: {bad}"


def test_the_checker_reads_relative_and_function_level_imports():
    """The rules are only as good as the import reader: relative imports inside functions are seen (the simulator
    bridge's backends are imported where they are built), and top-level-only reading leaves them out."""
    names = imports(PACKAGE / "sim" / "backends.py")
    assert {"spanvla_ros.sim.highway_backend", "spanvla_ros.sim.carla_backend", "spanvla_ros.sim.types"} <= names
    assert "spanvla_ros.sim.carla_backend" not in imports(PACKAGE / "sim" / "backends.py", top_level_only=True)
    assert "rclpy.node" in imports(PACKAGE / "nodes" / "planner.py", top_level_only=True)
