"""The odometry history the planner builds its past poses from (data.sensor_buffers.EgoHistory)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from spanvla_ros.data.sensor_buffers import EgoHistory


@pytest.mark.parametrize("speed", [0.0, 12.0])
def test_at_start_up_the_past_is_the_first_speed_held_not_a_standing_car(speed):
    ego = EgoHistory()
    yaw = 0.7
    ego.add(100.0, 5.0, -3.0, yaw, speed)
    past, v, accel, yaw_rate, stamp = ego.state(4, 0.5)
    # in the ego frame: straight behind, 0.5 s of travel apart, heading unchanged
    assert np.allclose(past[:, 0], [-1.5 * speed, -1.0 * speed, -0.5 * speed, 0.0])
    assert np.allclose(past[:, 1:], 0.0)
    assert (v, accel, yaw_rate, stamp) == (speed, 0.0, 0.0, 100.0)


def test_a_partly_filled_history_joins_the_held_speed_to_the_logged_poses():
    ego = EgoHistory()
    for k in range(5):     # 0.4 s at 10 m/s along +x
        ego.add(k * 0.1, k * 1.0, 0.0, 0.0, 10.0)
    past = ego.state(4, 0.5)[0]
    # 1.5, 1.0 and 0.5 s back from 0.4 s: before the first sample, extrapolated at 10 m/s
    assert np.allclose(past[:, 0], [-15.0, -10.0, -5.0, 0.0])
    heading = math.pi / 2
    ego = EgoHistory()
    ego.add(0.0, 0.0, 0.0, heading, 4.0)
    ego.add(0.5, 0.0, 2.0, heading, 4.0)
    # heading north, 2 m per 0.5 s: the ego frame's x is the direction of travel
    assert np.allclose(ego.state(4, 0.5)[0][:, :2], [[-6.0, 0.0], [-4.0, 0.0], [-2.0, 0.0], [0.0, 0.0]], atol=1e-9)
