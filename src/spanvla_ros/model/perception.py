"""Grounded perception of the lead vehicle from the front camera's vision tokens.

The flow expert did not find the lead vehicle's gap and closing speed in ~1000 bridge tokens refreshed at 1 Hz
(it kept speed into a braking lead, and the reasoning text repeated a prior gap). So, like the auxiliary heads
of TransFuser / InterFuser, a small head reads the VLM's vision-encoder tokens of the front camera's history
frames and is supervised with the simulator's truth (labels only; never a planner input):

* whether a vehicle is ahead in the ego lane (within ``LEAD_RANGE_M``),
* its bumper-to-bumper gap,
* its closing speed (ego speed minus lead speed along the ego heading; > 0 when the gap shrinks).

Each frame's tokens are attention-pooled (a per-token score says "this is the lead", the pooled vector is what it
looks like and where it is: each token carries its patch row / column, since the bottom edge's image row and the
apparent width are what tell the distance); the frames' pooled vectors, oldest first, and the ego speed give the
three outputs (how the gap changes across frames 0.5 s apart is the closing speed). Its outputs, detached, join the
action expert's conditioning, computed from the newest frames at control rate (SpanVLAPolicy.perceive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LEAD_RANGE_M = 60.0          # a vehicle farther ahead than this is not "the lead" (scene_text.facts_from_state)
GAP_SCALE_M = 30.0
CLOSING_SCALE_MPS = 10.0
LEAD_FEATURES = 3            # P(lead), P * gap / GAP_SCALE_M, P * closing / CLOSING_SCALE_MPS
POSITION_FREQS = 4


@dataclass(frozen=True)
class Percept:
    """What the perception heads read from the newest front frames, in physical units (for the planner core's
    safety envelope and for logging); None where the model has no such head or, for the light, no stop line is
    ahead on the route."""
    light: tuple[float, float, float] | None    # green, yellow, red probabilities
    stop_line_m: float | None                   # along the route from the ego's centre to the next stop line
    lead_probability: float | None
    lead_gap_m: float                           # bumper to bumper
    lead_closing_mps: float


def lead_targets(facts: dict | None) -> tuple[float, float, float]:
    """(present, gap / GAP_SCALE_M, closing / CLOSING_SCALE_MPS) from a sample's simulator facts; NaN for
    a regression target that does not exist (no lead, or a sample generated before facts were stored)."""
    if not facts or "lead_gap" not in facts:
        return math.nan, math.nan, math.nan
    gap = facts.get("lead_gap")
    if gap is None:
        return 0.0, math.nan, math.nan
    return 1.0, float(gap) / GAP_SCALE_M, float(facts.get("lead_closing") or 0.0) / CLOSING_SCALE_MPS


def _position_features(rc: torch.Tensor) -> torch.Tensor:
    """(N, 2) normalised row / col -> (N, 4 * POSITION_FREQS) sin/cos features."""
    freqs = math.pi * 2.0 ** torch.arange(POSITION_FREQS, dtype=torch.float32)
    args = rc[..., None] * freqs
    return torch.cat([args.sin(), args.cos()], -1).flatten(-2)


class LeadHead(nn.Module):
    token_mean: torch.Tensor
    token_std: torch.Tensor
    token_position: torch.Tensor

    def __init__(self, token_dim: int, num_tokens: int, frames: int, hidden: int = 64):
        super().__init__()
        self.frames = frames
        self.register_buffer("token_mean", torch.zeros(token_dim))
        self.register_buffer("token_std", torch.ones(token_dim))
        self.register_buffer("token_position", torch.zeros(num_tokens, 4 * POSITION_FREQS))
        self.token_mlp = nn.Sequential(nn.Linear(token_dim + 4 * POSITION_FREQS, hidden), nn.GELU(approximate="tanh"),
                                       nn.Linear(hidden, 1 + hidden))
        self.out = nn.Sequential(nn.Linear(frames * hidden + 1, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, 3))

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor, token_rc: torch.Tensor) -> None:
        """Input standardisation from training tokens (..., N, D) and the tokens' image positions (N, 2)."""
        flat = tokens.reshape(-1, tokens.shape[-1]).float()
        self.token_mean.copy_(flat.mean(0))
        self.token_std.copy_(flat.std(0).clamp(min=1e-3))
        self.token_position.copy_(_position_features(token_rc))

    def forward(self, front: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
        """front: (B, F, N, D) vision tokens of the front camera's history frames, oldest first; speed: (B,) the
        ego speed as the expert's conditioning has it (model.trajectory.ego_state_vector, normalised). Returns
        (B, 3) raw outputs: lead logit, gap and closing speed (normalised)."""
        B, Fr, N, _ = front.shape
        if Fr != self.frames:
            raise ValueError(f"lead head reads {self.frames} frames, got {Fr}")
        x = (front.to(self.token_mean.dtype) - self.token_mean) / self.token_std
        if x.is_inference() and torch.is_grad_enabled():
            x = x.clone()
        pos = self.token_position.expand(B, Fr, N, -1)
        h = self.token_mlp(torch.cat([x, pos], -1))                       # (B, F, N, 1 + hidden)
        w = torch.softmax(h[..., 0], dim=-1)[..., None]
        pooled = (w * h[..., 1:]).sum(2).reshape(B, -1)                    # (B, F * hidden)
        return self.out(torch.cat([pooled, speed.to(pooled.dtype)[:, None]], -1))

    @staticmethod
    def features(raw: torch.Tensor) -> torch.Tensor:
        """Detached conditioning for the expert: P(lead), P * gap, P * closing (normalised; zero with no lead)."""
        raw = raw.detach().float()
        p = torch.sigmoid(raw[:, :1])
        return torch.cat([p, p * raw[:, 1:2], p * raw[:, 2:3]], -1)

    @staticmethod
    def loss(raw: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """BCE on presence (where known) + smooth L1 on gap and closing speed (where a lead exists)."""
        present = targets[:, 0]
        known = torch.isfinite(present)
        if not known.any():
            return raw.sum() * 0.0
        loss = F.binary_cross_entropy_with_logits(raw[known, 0], present[known])
        lead = known & (present > 0.5)
        if lead.any():
            loss = loss + F.smooth_l1_loss(raw[lead, 1:], targets[lead, 1:], beta=0.1) * 4.0
        return loss


def lead_metrics(raw: torch.Tensor, targets: torch.Tensor) -> dict:
    """Held-out perception accuracy: lead-present F1, gap MAE (m) and closing-speed MAE (m/s) on true leads."""
    raw, targets = raw.detach().float(), targets.float()
    known = torch.isfinite(targets[:, 0])
    pred = torch.sigmoid(raw[known, 0]) > 0.5
    true = targets[known, 0] > 0.5
    tp, fp, fn = int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum())
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    lead = known & (targets[:, 0] > 0.5)
    gap_mae = float((raw[lead, 1] - targets[lead, 1]).abs().mean() * GAP_SCALE_M) if lead.any() else math.nan
    cl_mae = float((raw[lead, 2] - targets[lead, 2]).abs().mean() * CLOSING_SCALE_MPS) if lead.any() else math.nan
    return dict(lead_f1=f1, lead_precision=tp / max(tp + fp, 1), lead_recall=tp / max(tp + fn, 1),
                gap_mae_m=gap_mae, closing_mae_mps=cl_mae, frames=int(known.sum()), leads=int(lead.sum()))


def lead_targets_tensor(facts_list) -> torch.Tensor:
    return torch.tensor(np.array([lead_targets(f) for f in facts_list], np.float32))
