"""What the model perceives, measured on held-out frames against the simulator's truth.

* Perception heads (model.expert / model.perception): traffic-light accuracy on frames with a stop line ahead,
  lead-vehicle presence F1, gap MAE and closing-speed MAE.
* Facts stated in the generated reasoning: whether it mentions a lead vehicle when there is one (and not when
  there is none), the gap bucket it states, the light colour it names. Word overlap with the reference text says
  little here (the sentence frame is easy); these are the facts the text has to get right to agree with the scene.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

GAP_BUCKETS_M = (0.0, 10.0, 20.0, 40.0, math.inf)

_LEAD = re.compile(r"(lead vehicle|car in front|car ahead)")
_GAP = re.compile(r"(?:lead vehicle is |lead vehicle |car in front is |gap )(\d+) meters")
_LIGHT = re.compile(r"(?:traffic light is |\b)(red|green|yellow)(?: light)?\b")


def stated_facts(text: str) -> dict:
    """Facts a reasoning sentence states (the phrasings of data.scene_text): lead mentioned, gap (m), light colour."""
    t = text.lower()
    gap = _GAP.search(t)
    light = _LIGHT.search(t)
    return dict(lead=bool(_LEAD.search(t)), gap=float(gap.group(1)) if gap else None,
                light=light.group(1) if light else None)


def _bucket(gap: float) -> int:
    return int(np.searchsorted(GAP_BUCKETS_M, gap, side="right")) - 1


def reasoning_fact_accuracy(texts, facts_list) -> dict:
    """Accuracy of the stated facts against the simulator facts of the same frames (data.scene_text)."""
    lead_ok, gap_ok, light_ok = [], [], []
    for text, f in zip(texts, facts_list):
        if not f or "lead_gap" not in f:
            continue
        said = stated_facts(text)
        has_lead = f["lead_gap"] is not None
        lead_ok.append(said["lead"] == has_lead)
        if has_lead and said["gap"] is not None:
            gap_ok.append(_bucket(said["gap"]) == _bucket(f["lead_gap"]))
        elif has_lead:
            gap_ok.append(False)
        if f.get("light") and f.get("light_dist") is not None and f["light_dist"] > -2:
            light_ok.append(said["light"] == f["light"])

    def rate(xs):
        return float(np.mean(xs)) if xs else math.nan
    return dict(text_lead_acc=rate(lead_ok), text_gap_bucket_acc=rate(gap_ok), text_light_acc=rate(light_ok),
                text_frames=len(lead_ok), text_lead_frames=len(gap_ok), text_light_frames=len(light_ok))


@torch.inference_mode()
def head_metrics(policy, samples, bridges, batch: int = 32) -> dict:
    """Held-out accuracy of the expert's perception heads on the bridges' front frames (empty without heads)."""
    from ..data.samples import light_label
    from ..model.batch import ego_tensor, junction_tensor
    from ..model.bridge import collate_bridges
    from ..model.perception import crossing_metrics, crossing_targets_tensor, lead_metrics, lead_targets_tensor

    expert = policy.expert
    out: dict[str, float] = {}
    light_logits, lead_raw = [], []
    for b0 in range(0, len(samples), batch):
        bs = samples[b0:b0 + batch]
        br = collate_bridges(bridges[b0:b0 + batch])
        if policy.cfg.traffic_lights:
            light_logits.append(expert.light_logits(br))
        if policy.cfg.lead_perception:
            lead_raw.append(expert.lead_raw(br, ego_tensor(policy, bs), junction_tensor(bs)))
    if light_logits:
        labels = torch.tensor([light_label(s) for s in samples])
        pred = torch.cat(light_logits).argmax(-1)
        seen = labels >= 0
        out.update(light_acc=float((pred[seen] == labels[seen]).float().mean()) if seen.any() else math.nan,
                   light_frames=int(seen.sum()))
    if lead_raw:
        out.update(lead_metrics(torch.cat(lead_raw), lead_targets_tensor([s.meta.get("facts") for s in samples])))
    if policy.cfg.crossing_perception:
        raw = torch.cat([expert.crossing_raw(policy.crossing_tokens(s.images), ego_tensor(policy, [s]))
                         for s in samples])
        out.update(crossing_metrics(raw, crossing_targets_tensor([s.meta for s in samples], policy.cfg.dt)))
    return out
