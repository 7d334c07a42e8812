"""Which simulator: one factory and one set of command-line options for every tool (data generation, closed
loop, results, the ROS simulator bridge), so each runs on highway-env (the embedded default) or a CARLA server."""
from __future__ import annotations

import argparse

from .types import SimBackend

BACKENDS = ("highway_env", "carla")


def make_backend(name: str, carla_host: str = "", carla_port: int = 0, **kw) -> SimBackend:
    """A backend by name; ``carla_host`` / ``carla_port`` (empty / 0: CARLA_HOST / CARLA_PORT, else
    localhost:2000) pick the CARLA server."""
    if name == "highway_env":
        from .highway_backend import HighwayEnvBackend
        return HighwayEnvBackend(**kw)
    if name == "carla":
        from .carla_backend import CarlaBackend
        return CarlaBackend(host=carla_host or None, port=carla_port or None, **kw)
    raise ValueError(f"unknown simulator backend {name!r} ({' | '.join(BACKENDS)})")


def add_backend_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--backend", default="highway_env", choices=BACKENDS,
                    help="simulator (carla needs a CARLA 0.9.16 server)")
    ap.add_argument("--carla-host", default="", help="CARLA server host (default: $CARLA_HOST or localhost)")
    ap.add_argument("--carla-port", type=int, default=0, help="CARLA server port (default: $CARLA_PORT or 2000)")


def backend_from_args(a: argparse.Namespace, **kw) -> SimBackend:
    return make_backend(a.backend, a.carla_host, a.carla_port, **kw)
