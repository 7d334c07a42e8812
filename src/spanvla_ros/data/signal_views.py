"""Traffic-light views with every colour: the expert drives the intersection scenarios, and at each sample time with
a stop line ahead the front camera's history frames are rendered again with the signal showing each colour.

The logged data teach the light head where the car stands as much as what the signal shows: the expert stands at
the line only while it is red (it leaves as soon as it turns green), so a head that reads "standing at the line"
as red scores well on held-out logs and holds a car at a green light in closed loop. In these views the same scene
appears in all three colours, labelled with the colour drawn, so only the colour tells them apart. The frames are
rendered (not JPEG-decoded from a bag), as the planner's cameras deliver them at run time.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..model.config import LIGHT_STATES
from ..model.route import stop_line_distance
from ..sim.camera import DEFAULT_CAMERAS
from ..sim.highway_backend import HighwayEnvBackend


@dataclass
class SignalView:
    meta: dict                   # what data.samples.light_label reads (pose, lights, route_xy, stop_xy), and origin
    front: list[np.ndarray]      # the front camera's history frames, oldest first, the signal drawn lights[0.0]


def signal_views(scenarios: Sequence[str], seeds: Sequence[int], history_frames: int, history_dt: float,
                 every_s: float) -> Iterator[SignalView]:
    """One view per colour every ``every_s`` while the ego has the signal's stop line ahead (frames ``history_dt``
    apart, each drawn in that colour), plus the frames as they were when the signal changed within them."""
    backend = HighwayEnvBackend(cameras=DEFAULT_CAMERAS[:1])
    camera = DEFAULT_CAMERAS[0].name
    per_frame = int(round(history_dt / backend.dt))
    every = int(round(every_s / backend.dt))
    for scenario in scenarios:
        for seed in seeds:
            obs = backend.reset(scenario, seed)
            scenes: deque = deque(maxlen=(history_frames - 1) * per_frame + 1)
            step = 0
            while not obs.done:
                scenes.append((obs.ego, list(obs.agents), obs.light, obs.images.get(camera)))
                pose = (obs.ego.x, obs.ego.y, obs.ego.heading)
                picks = list(scenes)[::per_frame] if len(scenes) == scenes.maxlen and step % every == 0 else []
                if (picks and all(light is not None for _, _, light, _ in picks)
                        and stop_line_distance(backend.route_xy, backend.stop_lines_xy, pose) is not None):
                    meta = dict(scenario=scenario, seed=seed, t=obs.t, kind="signal_view", pose=pose,
                                route_xy=backend.route_xy, stop_xy=backend.stop_lines_xy)
                    for state in LIGHT_STATES:
                        front = [backend.render(ego, agents, dataclasses.replace(light, state=state))[camera]
                                 for ego, agents, light, _ in picks]
                        yield SignalView({**meta, "lights": {0.0: state}}, front)
                    if len({light.state for _, _, light, _ in picks}) > 1:   # the signal changed within them
                        yield SignalView({**meta, "lights": {0.0: picks[-1][2].state}}, [im for *_, im in picks])
                obs = backend.step(None)
                step += 1
