"""Model inputs for a batch of dataset samples (data.samples.Sample), shared by training and evaluation: the
expert's conditioning, the history initialisation, the reasoner's prompts, and the inference path per sample."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..data.samples import Sample
    from .policy import SpanVLAPolicy


def ego_tensor(policy: SpanVLAPolicy, samples: list[Sample], route_dropout: float = 0.0, rng=None) -> torch.Tensor:
    """Expert conditioning per sample; with ``route_dropout`` that share of samples is given no route, and
    independently that share no stop lines (a map without them, a bag recorded before they were published)."""
    def dropped():
        return route_dropout > 0 and rng.random() < route_dropout

    def route(s):
        if not policy.uses_route or dropped():
            return None
        return policy.route_input(s.meta["route_xy"], s.meta["pose"], None if dropped() else s.meta.get("stop_xy"))
    return torch.from_numpy(np.stack([policy.ego_vector(s.meta["speed"], s.meta["accel"], s.meta["yaw_rate"],
                                                        s.meta["command"], route(s)) for s in samples]))


def junction_tensor(samples: list[Sample]) -> torch.Tensor:
    """(B,) whether each sample's ego is at a junction (model.route.at_junction; which lead head reads it)."""
    from .route import at_junction

    return torch.tensor([at_junction(s.meta.get("route_xy"), s.meta.get("stop_xy"), s.meta["pose"]) for s in samples],
                        dtype=torch.bool)


def his_tensor(policy: SpanVLAPolicy, samples: list[Sample]) -> torch.Tensor:
    return torch.from_numpy(np.stack([policy.history_init(s.past, s.meta["speed"]) for s in samples]))


def prompts(policy, samples):
    return [policy.reasoner.prompt(s.meta["command"], s.meta["speed"], s.meta["accel"], s.past[:, :2]) for s in samples]


def reason_all(policy, samples, desc="reasoning", progress=True):
    """The inference path per sample (greedy reasoning from the frames) -> (bridges, texts, action-token hit rate)."""
    from tqdm import tqdm

    bridges, texts, hits = [], [], 0
    for s in tqdm(samples, desc=desc, disable=not progress):
        m = s.meta
        r = policy.reason(s.images, m["command"], m["speed"], m["accel"], s.past, stamp=m["stamp"],
                          route_xy=m.get("route_xy"), pose=m["pose"], stop_xy=m.get("stop_xy"))
        bridges.append(r.bridge)
        texts.append(r.text)
        hits += r.hit_action_token
    return bridges, texts, hits / max(len(samples), 1)
