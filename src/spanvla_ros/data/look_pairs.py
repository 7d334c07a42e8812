"""The same scene at two looks: the simulator's own and one drawn at random (sim.camera.Appearance.sample).

The vision encoder learnt the simulator's one look: on frames unlike it (another sky, a paved shoulder, a clear
day's hard horizon, a bag this project did not write) its tokens change, and every head and the bridge read them
wrong. Each pair holds one state of an expert-driven episode rendered twice, every camera, at the episode's drawn
look and at the default look; geometry, traffic and labels are the same, so what the encoder makes of the default
look is what it should make of the other (train.look_invariance).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..sim.camera import DEFAULT_APPEARANCE
from ..sim.highway_backend import HighwayEnvBackend
from ..sim.scenarios import Scenario


@dataclass
class LookPair:
    scenario: str
    seed: int
    t: float
    camera: str
    drawn: np.ndarray      # HxWx3 at the episode's drawn look
    default: np.ndarray    # the same state at the default look


def look_pairs(scenarios: Sequence[Scenario], seeds: Sequence[int], every_s: float) -> Iterator[LookPair]:
    """Every ``every_s`` of each (scenario, seed) episode, the expert driving: each camera's frame at the look the
    seed draws (the scenario's own setting is overridden to a random look) and at the default look."""
    backend = HighwayEnvBackend()
    every = max(1, int(round(every_s / backend.dt)))
    for scenario in scenarios:
        drawn_look = dataclasses.replace(scenario, appearance="random")
        for seed in seeds:
            backend.render_images = True
            obs = backend.reset(drawn_look, seed)
            step = 0
            while not obs.done:
                if step % every == 0:
                    default = backend.render(obs.ego, obs.agents, obs.light, DEFAULT_APPEARANCE)
                    for cam, img in obs.images.items():
                        yield LookPair(scenario.name, seed, obs.t, cam, img, default[cam])
                step += 1
                backend.render_images = step % every == 0   # the frames between pairs are never looked at
                obs = backend.step(None)
