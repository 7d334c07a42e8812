"""Test-session setup.

DDS isolation: every pytest session gets its own ROS_DOMAIN_ID (unless the caller fixed one), and DDS is
held to loopback by the loopback-only Fast DDS profile plus ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST.
`make test` additionally runs the whole session in a fresh network namespace where only `lo` is up.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(REPO / "params" / "fastdds_loopback.xml"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a colcon install on PYTHONPATH the ROS-free core is still importable from the source tree.
try:
    import spanvla_ros  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))


def _has_generated_msgs() -> bool:
    try:
        import spanvla_ros.msg  # noqa: F401
        return True
    except Exception:
        return False


HAS_RCLPY = True
try:
    import rclpy  # noqa: F401
except Exception:
    HAS_RCLPY = False

requires_ros = pytest.mark.skipif(not HAS_RCLPY,
                                  reason="rclpy is not importable (source .venv/env.sh or a ROS 2 install)")
requires_msgs = pytest.mark.skipif(not _has_generated_msgs(),
                                   reason="spanvla_ros.msg not generated: build with colcon first (make build)")


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child processes: same domain, same DDS profile, same Python path as this session."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p and Path(p).exists()])
    env["PYTHONUNBUFFERED"] = "1"
    return env
