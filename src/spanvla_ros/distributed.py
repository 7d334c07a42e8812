"""Episodes on a Ray cluster (an optional extra: ``pip install -r requirements/ray.txt``): data generation and
closed-loop evaluation run one task per episode on workers that each own a simulator, and return what the serial
run returns, in the same order.

Local by default (no Ray); ``ray_address="local"`` starts Ray on this machine with ``workers`` workers, any other
address joins that cluster (``auto``, ``ray://head:10001``). A CARLA server serves one episode at a time, so with
``servers`` (``[(host, port), ...]``) there is one worker per server, bound to it for the whole run.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Server = tuple[str, int]


def parse_servers(spec: str) -> list[Server]:
    """``"host:port,host:port"`` -> [(host, port), ...] (empty string: none)."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"CARLA server {item!r}: expected host:port")
        out.append((host, int(port)))
    return out


def run_episodes(fn: Callable[[Any, Server | None], Any], jobs: Sequence, ray_address: str = "", workers: int = 2,
                 servers: Sequence[Server] = (), threads: int = 1, cleanup: Callable[[], None] | None = None) -> list:
    """``[fn(job, server) for job in jobs]``, serially here or on Ray; ``server`` is the worker's CARLA server (None
    without ``servers``). ``fn`` and ``cleanup`` (run by each worker at the end, and here after a serial run, also
    on an error or an interrupt: a CARLA world restored) must be importable by the workers (module-level)."""
    if not ray_address:
        server = servers[0] if servers else None
        try:
            return [fn(job, server) for job in jobs]
        finally:
            if cleanup is not None:
                cleanup()
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise SystemExit("--ray-address needs Ray: pip install -r requirements/ray.txt") from exc
    if not ray.is_initialized():
        ray.init(address=None if ray_address == "local" else ray_address,
                 num_cpus=max(workers, len(servers)) if ray_address == "local" else None,
                 include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class EpisodeWorker:
        def __init__(self, server: Server | None, threads: int):
            from .config import set_torch_threads

            set_torch_threads(threads)
            self.server = server

        def run(self, job):
            return fn(job, self.server)

        def close(self) -> None:
            if cleanup is not None:
                cleanup()

    worker: Any = EpisodeWorker     # a Ray actor class (ray.remote), whose .remote() mypy cannot see
    actors = [worker.remote(s, threads) for s in servers] if servers else \
        [worker.remote(None, threads) for _ in range(workers)]
    try:
        return list(ActorPool(actors).map(lambda actor, job: actor.run.remote(job), list(jobs)))
    finally:
        try:
            ray.get([actor.close.remote() for actor in actors], timeout=60)
        finally:
            for actor in actors:
                ray.kill(actor)
