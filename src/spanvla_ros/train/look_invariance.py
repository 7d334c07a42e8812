"""A look-invariant vision encoder, distilled from the checkpoint's own encoder at the simulator's look.

The perception heads, the language model, the bridge and the action expert all learnt what the vision encoder makes
of the simulator's one look. At another look (a clear day's hard horizon, a paved shoulder, a bag this project did
not write) the encoder's tokens change and all of them read the scene wrong: the lead head reads a car on an empty
road. Retraining everything on many looks takes SFT 1 and every stage after it; instead, the encoder alone learns to
give a frame at a drawn look the tokens its frozen copy gives the same state at the default look (data.look_pairs),
while at the default look its tokens stay its copy's. Where that holds, everything downstream reads any look as it
reads the default, unchanged.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from ..data.look_pairs import LookPair

Encoder = Callable[[list[np.ndarray]], torch.Tensor]   # frames -> (n, N, D) tokens (reasoner.encode_images)

# A car 30 m ahead, a signal, a lane edge cover a few of a frame's tokens; a mean over all of them lets those drift
# while sky and asphalt hold still, and those few are what the heads read.
SALIENT_FRACTION = 0.05


def salient_tokens(target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(n, k) indices of each frame's SALIENT_FRACTION of tokens farthest from the frame's median token."""
    distance = (((target - target.median(1, keepdim=True).values) / scale) ** 2).mean(-1)
    return distance.topk(max(1, round(target.shape[1] * SALIENT_FRACTION)), 1).indices


def token_error(tokens: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                salient: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error per token dimension in units of ``scale``, averaged over all tokens, or over the ``salient``
    ones (salient_tokens) when given."""
    err = (((tokens - target) / scale) ** 2).mean(-1)
    return (err if salient is None else err.gather(1, salient)).mean()


class HeadReadings:
    """What the checkpoint's frozen perception heads take from each view (model.expert.FlowActionExpert.view_readings),
    in units of their spread over the teacher's default-look views: the heads' error where the token error weighs
    every token alike, though a head reads a car or a signal from a few."""

    def __init__(self, expert, front_camera: str, sample_tokens: torch.Tensor, sample_cameras: list[str]):
        self.expert, self.front_camera = expert, front_camera
        self.scale = {}
        with torch.no_grad():
            for front in (True, False):
                views = sample_tokens[[(c == front_camera) == front for c in sample_cameras]]
                readings = expert.view_readings(views, front) if len(views) else None
                self.scale[front] = (readings.std(0).clamp(min=1e-3)
                                     if readings is not None and readings.shape[0] > 1 else None)

    def error(self, tokens: torch.Tensor, target: torch.Tensor, cameras: list[str]) -> torch.Tensor:
        """(looks,) mean squared reading error of ``tokens`` against ``target`` (the teacher's tokens of n views of
        ``cameras``; ``tokens``: the student's of the same n views at one or more looks, look-major), per reading in
        units of its spread, over the views of each kind (front, the others) that some head reads, one mean per look.
        The teacher's readings are taken once, whatever the number of looks."""
        looks = tokens.shape[0] // target.shape[0]
        errors = []
        for front in (True, False):
            pick = torch.tensor([(c == self.front_camera) == front for c in cameras])
            scale = self.scale[front]
            if not pick.any() or scale is None or scale.numel() == 0:
                continue
            with torch.no_grad():
                want = self.expert.view_readings(target[pick], front)
            got = self.expert.view_readings(tokens[pick.repeat(looks)], front)
            errors.append((((got - want.repeat(looks, 1)) / scale) ** 2).mean(-1).reshape(looks, -1))
        return torch.cat(errors, 1).mean(1) if errors else tokens.sum() * torch.zeros(looks)


def token_errors(student: Encoder, teacher: Encoder, pairs: list[LookPair], scale: torch.Tensor,
                 heads: HeadReadings, batch: int = 64) -> dict[str, float]:
    """Mean squared token error, per dimension in units of the default look's token spread, of the student at the
    drawn look and at the default look against the teacher at the default look, over all tokens, over each
    frame's salient ones (``*_salient``) and of the heads' readings (``*_heads``)."""
    sums = dict(drawn=0.0, default=0.0, drawn_salient=0.0, default_salient=0.0, drawn_heads=0.0, default_heads=0.0)
    with torch.no_grad():
        for b0 in range(0, len(pairs), batch):
            bs = pairs[b0:b0 + batch]
            target = teacher([p.default for p in bs])
            salient = salient_tokens(target, scale)
            for look in ("drawn", "default"):
                out = student([getattr(p, look) for p in bs])
                sums[look] += float(token_error(out, target, scale)) * len(bs)
                sums[f"{look}_salient"] += float(token_error(out, target, scale, salient)) * len(bs)
                sums[f"{look}_heads"] += float(heads.error(out, target, [p.camera for p in bs]).mean()) * len(bs)
    n = max(len(pairs), 1)
    return {k: v / n for k, v in sums.items()}


def distil_look_invariant_encoder(policy, pairs: list[LookPair], held_out: list[LookPair], epochs: int, batch: int,
                                  lr: float, log, seed: int = 0,
                                  salient_weight: float = 0.0, head_weight: float = 0.0,
                                  default_weight: float = 1.0) -> dict[str, dict[str, float]]:
    """Trains ``policy``'s vision encoder in place on ``pairs``; returns the token errors on ``held_out`` before and
    after (token_errors). Only the encoder's blocks train: the patch merger that feeds the language model reads
    their output and stays as it is. The loss is the mean token error plus ``salient_weight`` x the error on each
    frame's salient tokens plus ``head_weight`` x the frozen perception heads' reading error (HeadReadings), both
    looks against the copy at the default look, each term the mean of the drawn look's error and ``default_weight``
    x the default look's (1: both alike)."""
    from .trainer import supervised_epochs

    reasoner = policy.reasoner
    visual = reasoner.model.model.visual
    teacher_module = copy.deepcopy(visual).eval()
    for p in teacher_module.parameters():
        p.requires_grad_(False)
    teacher: Encoder = partial(reasoner.encode_images, visual=teacher_module)
    student: Encoder = reasoner.encode_images
    sampled = pairs[:: max(1, len(pairs) // 256)]
    with torch.no_grad():
        sample = teacher([p.default for p in sampled])
    scale = sample.reshape(-1, sample.shape[-1]).std(0).clamp(min=1e-3)
    expert = policy.expert
    heads = HeadReadings(expert, reasoner.cfg.cameras[reasoner.front_camera], sample, [p.camera for p in sampled])
    before = token_errors(student, teacher, held_out, scale, heads)
    print(f"look invariance, held-out token error before: drawn look {before['drawn']:.3f} (salient tokens "
          f"{before['drawn_salient']:.3f}, heads' readings {before['drawn_heads']:.3f}), default look "
          f"{before['default']:.3f} ({len(pairs)} training pairs, {len(held_out)} held out)")
    for name, p in visual.named_parameters():
        p.requires_grad_(not name.startswith("merger."))   # the optimiser skips what gets no gradient
    expert_trainable = [p for p in expert.parameters() if p.requires_grad]
    for p in expert_trainable:   # the heads pass the gradient to the encoder and stay as they are
        p.requires_grad_(False)

    def batch_loss(ii):
        bs = [pairs[i] for i in ii]
        with torch.no_grad():
            target = teacher([p.default for p in bs])
        out = student([p.drawn for p in bs] + [p.default for p in bs])
        drawn, default = out[: len(bs)], out[len(bs):]

        def looks_error(error: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            return 0.5 * (error(drawn) + default_weight * error(default))

        loss = looks_error(lambda tokens: token_error(tokens, target, scale))
        if salient_weight:   # one pick per state: the drawn and the default frame show the same scene
            salient = salient_tokens(target, scale)
            loss = loss + salient_weight * looks_error(lambda tokens: token_error(tokens, target, scale, salient))
        if head_weight:
            readings = heads.error(out, target, [p.camera for p in bs])
            loss = loss + head_weight * 0.5 * (readings[0] + default_weight * readings[1])
        return loss

    t0 = time.time()
    supervised_epochs(visual, pairs, epochs, batch, lr, 0.1, log, "look_invariance",
                      "look-invariant encoder", batch_loss, seed)
    for p in visual.parameters():
        p.requires_grad_(False)
    for p in expert_trainable:
        p.requires_grad_(True)
    after = token_errors(student, teacher, held_out, scale, heads)
    print(f"look invariance, held-out token error after {epochs} epochs ({time.time() - t0:.0f} s): drawn look "
          f"{after['drawn']:.3f} (salient tokens {after['drawn_salient']:.3f}, heads' readings "
          f"{after['drawn_heads']:.3f}), default look {after['default']:.3f} (salient tokens "
          f"{after['default_salient']:.3f}, heads' readings {after['default_heads']:.3f})")
    if not math.isfinite(after["drawn"]):
        raise SystemExit("look invariance: the encoder diverged (non-finite token error)")
    return dict(before=before, after=after)
