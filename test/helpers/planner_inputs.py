"""What the planner-core tests feed it: a small untrained model with the light and lead heads, and camera frames +
odometry of a car driving straight at constant speed."""
from __future__ import annotations

import numpy as np

CAMS = ("front", "front_left", "front_right")


def perception_policy():
    from spanvla_ros.model import SpanVLAConfig
    from spanvla_ros.model.corpus import tokenizer_corpus
    from spanvla_ros.model.policy import SpanVLAPolicy
    from spanvla_ros.model.tokenizer import train_tokenizer

    tok = train_tokenizer(tokenizer_corpus(SpanVLAConfig(), n=80))
    return SpanVLAPolicy.build(SpanVLAConfig(traffic_lights=True, lead_perception=True), tok, seed=0)


def feed(core, t0: float, t1: float, speed: float = 10.0, frame: str = "map", cameras=CAMS):
    """Random frames from every camera and odometry, every 0.1 s from ``t0`` to ``t1``."""
    rng = np.random.default_rng(0)
    for k in range(int(round((t1 - t0) / 0.1)) + 1):
        t = t0 + 0.1 * k
        for c in cameras:
            core.add_image(c, t, rng.integers(0, 255, (112, 196, 3), dtype=np.uint8))
        core.add_odometry(t, speed * t, 0.0, 0.0, speed, frame, received=t)
