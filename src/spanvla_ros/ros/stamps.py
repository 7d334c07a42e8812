"""builtin_interfaces/Time helpers."""
from __future__ import annotations


def stamp_to_sec(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def sec_to_stamp(t: float):
    from builtin_interfaces.msg import Time

    sec = int(t // 1)
    return Time(sec=sec, nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000)
