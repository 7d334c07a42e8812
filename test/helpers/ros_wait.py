"""Waiting helpers: DDS discovery takes 0.1-3 s, so tests wait on conditions, never on fixed sleeps."""
from __future__ import annotations

import time


def spin_until(executor, predicate, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=step)
    return predicate()
