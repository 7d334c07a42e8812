"""Text the default tokenizer is trained on: the prompts the reasoner reads (over a spread of commands,
speeds and past trajectories) and the driving vocabulary its reasoning uses."""
from __future__ import annotations

import numpy as np

from .config import SpanVLAConfig
from .prompt import build_prompt

DRIVING_WORDS = (
    "the lead vehicle ahead is braking slowing down stopped accelerating a car truck cyclist cuts in from "
    "the left right lane ego lane adjacent merge merging onto highway ramp roundabout intersection junction "
    "traffic light is red green yellow stop line wait yield give way to oncoming crossing traffic gap is "
    "large small enough too close keep distance safe following distance time to collision seconds meters "
    "m/s speed up keep speed maintain reduce brake gently hard change lane to the left right stay in lane "
    "turn left right go straight follow the road curve bends entering exiting clear road no vehicles nearby "
    "because so therefore then and while behind beside in front of me us our it its they their this that "
    "pedestrian obstacle blocked free open slower faster than limit drive carefully recover back to center "
    "drifted off edge of the road return heading correct"
).split()


def tokenizer_corpus(cfg: SpanVLAConfig, n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        speed = float(rng.uniform(0, 30))
        past = np.stack([np.linspace(-speed * 1.5, 0, cfg.past_poses), rng.normal(0, 0.5, cfg.past_poses)], 1)
        yield build_prompt(cfg.cameras, cfg.history_frames, cfg.history_dt, str(rng.choice(cfg.commands)),
                           speed, float(rng.uniform(-4, 3)), past)
        words = rng.choice(DRIVING_WORDS, size=int(rng.integers(8, 30)))
        yield " ".join(words) + "."
