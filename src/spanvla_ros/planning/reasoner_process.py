"""The VLM reasoner in a process of its own, ROS-free.

In one process the reasoner's decode loop and the action expert take turns on one interpreter lock: on a 2-core
CPU a plan that takes 8 ms alone took 17-35 ms while the reasoner generated, whatever the torch thread counts, and
that is what held the odometry -> Path latency above its budget. A process of its own gives the reasoner its own
lock and core; the bridge it produces (a few KV tensors per run, at ~1 Hz) comes back through a pipe.

``ReasonerProcess.reason`` takes the arguments of ``SpanVLAPolicy.reason`` (what ``PlannerCore.reason`` hands
its ``run``), so the planner core is the same with the reasoner in process or not.
"""
from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..model.errors import ReasoningCancelled
from ..model.reasoner import ReasoningResult

POLL_S = 0.05            # how often a caller waiting for a run checks its stop condition
START_TIMEOUT_S = 300.0  # loading a 3B-class VLM on a CPU takes minutes
CLOSE_TIMEOUT_S = 10.0


def _serve(source: Any, device: str, dtype: str, torch_threads: int, conn, cancel) -> None:
    """The child: load the policy, then answer each request with its ReasoningResult (or the error) until None."""
    try:
        from ..config import set_torch_threads
        from ..model.policy import SpanVLAPolicy

        set_torch_threads(torch_threads)
        policy = (SpanVLAPolicy.from_pretrained(source, device=device, dtype=dtype) if isinstance(source, str)
                  else source)
        conn.send(("ready", policy.model_id))
    except Exception as exc:  # the parent raises it: a checkpoint that cannot load is the caller's error
        conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))
        return
    while True:
        try:
            request = conn.recv()
        except EOFError:      # the parent went away
            return
        if request is None:
            return
        args, kwargs = request
        try:
            result = policy.reason(*args, cancel=cancel.is_set, **kwargs)
            result.cache = result.last_logits = None     # the planner uses the bridge and the text
            conn.send(("result", result))
        except ReasoningCancelled:
            conn.send(("cancelled", None))
        except Exception as exc:  # one bad frame set must not end the worker
            conn.send(("error", repr(exc)))


class ReasonerProcess:
    """A reasoner worker process. ``source``: a checkpoint directory (loaded there with ``device`` and ``dtype``)
    or a policy object (pickled across, for policies built in memory)."""

    def __init__(self, source: Any, torch_threads: int, device: str, dtype: str):
        ctx = mp.get_context("spawn")    # no fork of a process that holds DDS and torch threads
        self._conn, child = ctx.Pipe()
        self._cancel = ctx.Event()
        self._proc = ctx.Process(target=_serve, name="spanvla_reasoner", daemon=True,
                                 args=(str(source) if isinstance(source, Path) else source, device, dtype,
                                       torch_threads, child, self._cancel))
        self._proc.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the reasoner process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:                       # it died before it could say why
            kind, payload = "error", f"the process exited (code {self._proc.exitcode})"
        if kind != "ready":
            self.close()
            raise RuntimeError(f"the reasoner process could not load the model: {payload}")
        self.model_id: str = payload
        self._reply_pending = False    # a cancelled run's reply, still to come

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.is_alive()

    def reason(self, *args, cancel: Callable[[], bool] | None = None, **kwargs) -> ReasoningResult:
        """One run with ``SpanVLAPolicy.reason``'s arguments; ``cancel`` is polled while it runs (ReasoningCancelled
        when it says so). Raises RuntimeError for a failed run or a worker that died."""
        try:
            if self._reply_pending:
                self._wait(None)
                self._conn.recv()
                self._reply_pending = False
            self._cancel.clear()
            self._conn.send((args, kwargs))
            self._wait(cancel)
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:     # the pipe's far end went away with the process
            raise RuntimeError(f"the reasoner process exited (code {self._proc.exitcode}): {exc!r}") from exc
        if kind == "result":
            return payload
        if kind == "cancelled":
            raise ReasoningCancelled("the reasoner process was cancelled")
        raise RuntimeError(f"reasoner run failed in its process: {payload}")

    def _wait(self, cancel: Callable[[], bool] | None) -> None:
        while True:
            if cancel is not None and cancel():
                self._cancel.set()
                self._reply_pending = True
                raise ReasoningCancelled("stopped while the reasoner process was running")
            if self._conn.poll(POLL_S):
                return
            if not self._proc.is_alive():
                raise RuntimeError(f"the reasoner process exited (code {self._proc.exitcode})")

    def close(self) -> None:
        """Stop the worker: ask, then wait, then terminate (a 3B-class prefill is not interruptible)."""
        self._cancel.set()
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(CLOSE_TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(CLOSE_TIMEOUT_S)
        self._conn.close()
