"""params/*.yaml is the single source of configuration for nodes, launch and tools.

The files use the ROS 2 parameter-file layout (``node_name: {ros__parameters: {...}}`` plus an optional
``/**`` section shared by all nodes), so ``ros2 launch`` / ``--params-file`` read them natively and the
ROS-free tools read the very same values through :func:`node_params`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
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


def set_torch_threads(n: int) -> int:
    """Set torch's intra-op threads explicitly (``n`` <= 0: one per CPU) and return the number: torch's own default
    takes every core, so two torch processes on one machine oversubscribe it and both collapse (one closed-loop
    episode: 4.9 s alone, 108 s each side by side at the default, 5.0 s each with one thread apiece)."""
    import torch

    n = n if n > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, as SIGINT does, so every ``finally`` runs (a CARLA world
    restored to its settings with its actors destroyed, bags closed) when a tool is stopped either way."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def default_params_path() -> Path:
    return resolve_share_path(Path("params") / DEFAULT_PARAMS_FILE)


def load_params_file(path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path else default_params_path()
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of node names to ros__parameters")
    return data


SCHEMA_FILE = "spanvla.schema.yaml"
_PY_TYPES: dict[str, type | tuple[type, ...]] = {"bool": bool, "int": int, "double": (int, float), "string": str}


def param_schema(node_name: str) -> dict[str, dict[str, Any]]:
    """params/spanvla.schema.yaml's entries for ``node_name``: name -> {type, description, read_only?, range?,
    choices?}."""
    with open(resolve_share_path(Path("params") / SCHEMA_FILE)) as f:
        schema = yaml.safe_load(f)
    if node_name not in schema:
        raise KeyError(f"{SCHEMA_FILE} has no section for node {node_name!r}")
    return schema[node_name]


def schema_problems(schema: dict[str, dict[str, Any]], params: dict[str, Any]) -> list[str]:
    """What is wrong with ``params`` against ``schema``: missing, unknown, wrong type, out of range, not a choice."""
    problems = [f"{k}: missing" for k in schema if k not in params]
    problems += [f"{k}: not in the schema" for k in params if k not in schema]
    for k, spec in schema.items():
        if k not in params:
            continue
        v, typ = params[k], spec["type"]
        if typ == "string_array":
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        else:
            ok = isinstance(v, _PY_TYPES[typ]) and not (typ != "bool" and isinstance(v, bool))
        if not ok:
            problems.append(f"{k}: expected {typ}, got {v!r}")
            continue
        lo_hi = spec.get("range")
        if lo_hi and not lo_hi[0] <= v <= lo_hi[1]:
            problems.append(f"{k}: {v!r} outside [{lo_hi[0]}, {lo_hi[1]}]")
        if "choices" in spec and v not in spec["choices"]:
            problems.append(f"{k}: {v!r} not one of {spec['choices']}")
    return problems


def node_params(node_name: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Parameters of ``node_name`` with the ``/**`` section underneath (node values win), as ROS merges them,
    checked against the schema (ValueError listing every problem). Of ``/**`` a node takes what its schema declares
    (as a ROS node ignores values for parameters it does not declare); ``node_name="topics"`` gives the names on
    the wire (spanvla_ros.ros.topics)."""
    data = load_params_file(path)
    schema = param_schema(node_name)
    merged: dict[str, Any] = {k: v for k, v in ((data.get("/**") or {}).get("ros__parameters") or {}).items()
                              if k in schema}
    for key in (node_name, "/" + node_name):
        section = data.get(key) or {}
        merged.update(section.get("ros__parameters", {}) or {})
    problems = schema_problems(schema, merged)
    if problems:
        raise ValueError(f"{path or default_params_path()}: {node_name}: " + "; ".join(problems))
    return merged


def fields_from(cls, params: Mapping, what: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of dataclass ``cls``'s fields (less ``exclude``) from ``params``; a KeyError names the missing
    ones (parameters have no defaults in code: the params file has them all)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"{what} parameters missing: {missing}")
    return {n: params[n] for n in names}
