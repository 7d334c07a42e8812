"""What every simulator backend returns, in the simulator's world frame (x east/forward, y left, yaw CCW)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

VEHICLE_LENGTH_M = 5.0   # highway-env's vehicle length, also the default for agents of unknown size
VEHICLE_WIDTH_M = 2.0


@dataclass
class Control:
    """Vehicle command: longitudinal acceleration (m/s^2, negative brakes) and front-wheel angle (rad, left > 0)."""
    acceleration: float = 0.0
    steering: float = 0.0


@dataclass
class AgentState:
    id: int
    x: float
    y: float
    heading: float
    speed: float
    length: float = VEHICLE_LENGTH_M
    width: float = VEHICLE_WIDTH_M


@dataclass
class EgoState:
    x: float
    y: float
    heading: float
    speed: float
    accel: float = 0.0
    yaw_rate: float = 0.0
    length: float = VEHICLE_LENGTH_M
    width: float = VEHICLE_WIDTH_M


@dataclass
class Flags:
    collision: bool = False
    off_road: bool = False
    wrong_way: bool = False
    red_light: bool = False

    def any(self) -> bool:
        return self.collision or self.off_road or self.wrong_way or self.red_light


@dataclass
class TrafficLight:
    """A signal with a stop line across the ego's approach; state is 'green' | 'yellow' | 'red'."""
    x: float
    y: float
    heading: float          # direction of travel it controls
    state: str
    stop_s: float = 0.0     # route arc length of the stop line


COMFORT_STOP_DECEL = 3.0   # m/s^2: on yellow, stop if the line can be reached braking no harder than this


def must_stop(state: str | None, gap: float, speed: float) -> bool:
    """The expert's rule at a signal ``gap`` metres (front bumper to stop line) ahead: stop on red; on yellow
    unless too close to stop comfortably; never once past the line."""
    if state not in ("red", "yellow") or gap < -0.5:
        return False
    return state == "red" or gap >= speed ** 2 / (2 * COMFORT_STOP_DECEL)


@dataclass
class Observation:
    t: float
    ego: EgoState
    agents: list[AgentState]
    images: dict[str, np.ndarray]
    flags: Flags
    command: str = "follow lane"
    route_progress: float = 0.0      # metres along the route
    route_length: float = 1.0
    light: TrafficLight | None = None
    done: bool = False
    info: dict = field(default_factory=dict)

    @property
    def route_completion(self) -> float:
        return float(np.clip(self.route_progress / max(self.route_length, 1e-6), 0.0, 1.0))


class SimBackend(Protocol):
    """What the closed loop, the simulator bridge node and data generation use of a simulator (highway-env,
    CARLA): one episode at a time, stepped in lockstep at ``dt``, in the world frame of this module's types."""

    dt: float
    cameras: tuple[str, ...]
    rig: Any                        # .cameras: the CameraSpecs the images are rendered with
    # the episode's mission, set by reset(): route polyline, its stop lines (world points), the driving command
    route_xy: np.ndarray
    stop_lines_xy: np.ndarray
    command: str

    @property
    def scenario_name(self) -> str: ...

    @property
    def target_speed_mps(self) -> float:
        """The speed the expert drives at where nothing holds it back (the progress reference of scoring)."""
        ...

    @property
    def duration_s(self) -> float:
        """The episode's time limit."""
        ...

    def reset(self, scenario, seed: int) -> Observation: ...

    def step(self, control: Control | None = None) -> Observation: ...

    def scene_map(self): ...

    def light_timeline(self, horizon_s: float, dt: float) -> dict: ...

    def lateral_offset_m(self) -> float:
        """The ego's signed distance from its lane's centre line (left > 0)."""
        ...

    def stop_line_distance_m(self, obs: Observation) -> float | None:
        """Front bumper to the next stop line on the route (None: none ahead)."""
        ...

    def close(self) -> None: ...
