"""params/*.yaml is the single source of configuration for nodes, launch and tools.

The files use the ROS 2 parameter-file layout (``node_name: {ros__parameters: {...}}`` plus an optional
``/**`` section shared by all nodes), so ``ros2 launch`` / ``--params-file`` read them natively and the
ROS-free tools read the very same values through :func:`node_params`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

PACKAGE = "spanvla_ros"
DEFAULT_PARAMS_FILE = "spanvla.yaml"


def package_share() -> Path:
    """The package's share directory: the colcon/ament install if present, else this source checkout."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            return Path(get_package_share_directory(PACKAGE))
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    return source_root()


def source_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_share_path(relative: str | os.PathLike) -> Path:
    """Absolute paths pass through; relative ones are looked up in the share dir, then the source tree."""
    p = Path(relative)
    if p.is_absolute():
        return p
    for base in (package_share(), source_root()):
        if (base / p).exists():
            return base / p
    raise FileNotFoundError(f"{relative!s} not found under {package_share()} or {source_root()}")


def default_params_path() -> Path:
    return resolve_share_path(Path("params") / DEFAULT_PARAMS_FILE)


def load_params_file(path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path else default_params_path()
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of node names to ros__parameters")
    return data


def node_params(node_name: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Parameters of ``node_name`` with the ``/**`` section underneath (node values win), as ROS merges them."""
    data = load_params_file(path)
    merged: dict[str, Any] = {}
    for key in ("/**", node_name, "/" + node_name):
        section = data.get(key) or {}
        merged.update(section.get("ros__parameters", {}) or {})
    return merged
