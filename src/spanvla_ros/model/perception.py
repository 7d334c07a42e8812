"""Grounded perception of the lead vehicle from the front camera's vision tokens.

The flow expert did not find the lead vehicle's gap and closing speed in ~1000 bridge tokens refreshed at 1 Hz
(it kept speed into a braking lead, and the reasoning text repeated a prior gap). So, like the auxiliary heads
of TransFuser / InterFuser, a small head reads the VLM's vision-encoder tokens of the front camera's history
frames and is supervised with the simulator's truth (labels only; never a planner input):

* whether a vehicle is ahead on the ego's route (``data.scene_text.route_lead``, within ``LEAD_RANGE_M``),
* its bumper-to-bumper gap along the route,
* its closing speed (ego speed minus lead speed along the route; > 0 when the gap shrinks).

Each frame's tokens are attention-pooled (a per-token score says "this is the lead", the pooled vector is what it
looks like and where it is: each token carries its patch row / column, since the bottom edge's image row and the
apparent width are what tell the distance); the frames' pooled vectors, oldest first, and the ego speed give the
three outputs (how the gap changes across frames 0.5 s apart is the closing speed). Its outputs, detached, join the
action expert's conditioning, computed from the newest frames at control rate (SpanVLAPolicy.perceive).

Crossing traffic: the same head on all three cameras' two newest frames (0.5 s apart) reads whether another vehicle
will be on the ego's path within ``CROSSING_HORIZON_S`` (a car crossing an intersection, an oncoming car across a
left turn), where along the path and when. The lead head does not cover it: a crossing car is in the ego lane only
for the moment it crosses, and the closed loop's intersection collisions were all such cars (results.md). It is a
safety-envelope input only (planning.envelope: yield at the stop line); the flow does not read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GAP_SCALE_M = 30.0
CLOSING_SCALE_MPS = 10.0
LEAD_FEATURES = 3            # P(lead), P * gap / GAP_SCALE_M, P * closing / CLOSING_SCALE_MPS
POSITION_FREQS = 4
CROSSING_FRAMES = 2          # each camera's newest frames the crossing head reads (0.5 s apart: the motion)
CROSSING_HORIZON_S = 4.0     # the expert's planning horizon: what will cross the path before the plan ends
CROSSING_RADIUS_M = 3.0      # an agent's centre this near the path's centre line is on it (half a length + a width)
CROSSING_PATH_M = (20.0, 30.0)   # the path checked: the expert's, extended straight to the first, cut at the second
CROSSING_SCALE_M = 30.0
CROSSING_TIME_SCALE_S = 4.0
LEAD_LIKE_HEADING_RAD = math.radians(35.0)   # an agent ahead in the lane within this heading is the lead head's


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
    crossing_probability: float | None = None   # another vehicle on the ego's path within the horizon
    crossing_where_m: float = math.nan          # along the path, where it first comes onto it
    crossing_when_s: float = math.nan           # and when


def lead_targets(facts: dict | None) -> tuple[float, float, float]:
    """(present, gap / GAP_SCALE_M, closing / CLOSING_SCALE_MPS) from a sample's simulator facts; NaN for
    a regression target that does not exist (no lead, or a sample generated before facts were stored)."""
    if not facts or "lead_gap" not in facts:
        return math.nan, math.nan, math.nan
    gap = facts.get("lead_gap")
    if gap is None:
        return 0.0, math.nan, math.nan
    return 1.0, float(gap) / GAP_SCALE_M, float(facts.get("lead_closing") or 0.0) / CLOSING_SCALE_MPS


def crossing_targets(meta: dict, dt: float) -> tuple[float, float, float]:
    """(present, along-path distance / CROSSING_SCALE_M, time / CROSSING_TIME_SCALE_S) of the first other vehicle to
    come onto the ego's path within CROSSING_HORIZON_S, from a sample's pose, the expert's future and the agents'
    futures, both ``dt`` apart (simulator truth: labels only); NaN for a sample without agents' futures. The lead in
    the ego lane and vehicles behind going the same way are not crossing traffic."""
    from ..geometry import arc_lengths, to_ego
    from ..sim.agents import futures_from_json

    if meta.get("agents_future") is None or "pose" not in meta:
        return math.nan, math.nan, math.nan
    agents = futures_from_json(meta["agents_future"])
    if agents.size == 0:
        return 0.0, math.nan, math.nan
    future = np.asarray(meta["future"], np.float64)
    path = np.vstack([[0.0, 0.0], future[:, :2]])
    short = CROSSING_PATH_M[0] - arc_lengths(path)[-1]
    if short > 0:   # a stopped expert: its path straight on, where the crossing traffic would be met
        h = future[-1, 2]
        path = np.vstack([path, path[-1] + np.array([math.cos(h), math.sin(h)]) * np.array([[short]])])
    dense = _densify(path, 0.5)
    arc = arc_lengths(dense)
    dense, arc = dense[arc <= CROSSING_PATH_M[1]], arc[arc <= CROSSING_PATH_M[1]]
    steps = min(agents.shape[0], int(round(CROSSING_HORIZON_S / dt)) + 1)
    first: tuple[float, float] | None = None
    for a in range(agents.shape[1]):
        now = agents[0, a]
        if not np.isfinite(now[0]):
            continue
        x, y, rel = to_ego(meta["pose"], now[None, :3])[0]
        if abs(rel) < LEAD_LIKE_HEADING_RAD and (x < 0.0 or abs(y) < CROSSING_RADIUS_M):
            continue
        track = agents[:steps, a]
        seen = np.isfinite(track[:, 0])
        if not seen.any():
            continue
        ego_xy = to_ego(meta["pose"], track[seen, :3])[:, :2]
        d = np.linalg.norm(ego_xy[:, None] - dense[None], axis=-1)          # (K, P)
        hits = np.nonzero(d.min(1) < CROSSING_RADIUS_M)[0]
        if hits.size:
            k = int(hits[0])
            t = float(np.nonzero(seen)[0][k]) * dt
            if first is None or t < first[1]:
                first = (float(arc[int(d[k].argmin())]), t)
    if first is None:
        return 0.0, math.nan, math.nan
    return 1.0, first[0] / CROSSING_SCALE_M, first[1] / CROSSING_TIME_SCALE_S


def crossing_targets_tensor(metas, dt: float) -> torch.Tensor:
    return torch.tensor(np.array([crossing_targets(m, dt) for m in metas], np.float32))


def _densify(path: np.ndarray, step: float) -> np.ndarray:
    out = [path[:1]]
    for a, b in zip(path[:-1], path[1:]):
        n = max(1, int(math.ceil(np.linalg.norm(b - a) / step)))
        out.append(a + (b - a) * (np.arange(1, n + 1)[:, None] / n))
    return np.vstack(out)


def _position_features(rc: torch.Tensor) -> torch.Tensor:
    """(N, 2) normalised row / col -> (N, 4 * POSITION_FREQS) sin/cos features."""
    freqs = math.pi * 2.0 ** torch.arange(POSITION_FREQS, dtype=torch.float32)
    args = rc[..., None] * freqs
    return torch.cat([args.sin(), args.cos()], -1).flatten(-2)


def pooled_readings(token_outputs: torch.Tensor) -> torch.Tensor:
    """(..., N, 1 + C) per-token outputs of an attention-pooled head (an attention logit, then C features) ->
    (..., 1 + C): the log-sum-exp of the logits (a view's weight when views are pooled together), then the
    attention-weighted features."""
    w = torch.softmax(token_outputs[..., 0], dim=-1)[..., None]
    return torch.cat([torch.logsumexp(token_outputs[..., 0], -1)[..., None], (w * token_outputs[..., 1:]).sum(-2)], -1)


class PooledTokenHead(nn.Module):
    """Attention-pooled vision tokens of several views (frames, or cameras x frames, in a fixed order) and the ego
    speed -> a presence logit and two regressions (the lead: gap, closing speed; crossing traffic: where on the
    path, when)."""
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

    def forward(self, views: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
        """views: (B, F, N, D) vision tokens (the lead: the front camera's history frames, oldest first); speed: (B,)
        the ego speed as the expert's conditioning has it (model.trajectory.ego_state_vector, normalised). Returns
        (B, 3) raw outputs: presence logit and the two regressions (normalised)."""
        B, Fr = views.shape[:2]
        if Fr != self.frames:
            raise ValueError(f"head reads {self.frames} views, got {Fr}")
        pooled = self.view_readings(views)[..., 1:].reshape(B, -1)         # (B, F * hidden)
        return self.out(torch.cat([pooled, speed.to(pooled.dtype)[:, None]], -1))

    def view_readings(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., N, D) one view's tokens -> (..., 1 + hidden): the log-sum-exp of its attention logits, then its
        attention-pooled token features. Everything the head takes from a view: equal readings, equal outputs."""
        x = (tokens.to(self.token_mean.dtype) - self.token_mean) / self.token_std
        if x.is_inference() and torch.is_grad_enabled():
            x = x.clone()
        pos = self.token_position.expand(*x.shape[:-1], -1)
        return pooled_readings(self.token_mlp(torch.cat([x, pos], -1)))

    @staticmethod
    def features(raw: torch.Tensor) -> torch.Tensor:
        """Detached conditioning for the expert: P(lead), P * gap, P * closing (normalised; zero with no lead)."""
        raw = raw.detach().float()
        p = torch.sigmoid(raw[:, :1])
        return torch.cat([p, p * raw[:, 1:2], p * raw[:, 2:3]], -1)

    @staticmethod
    def loss(raw: torch.Tensor, targets: torch.Tensor, presence_weight: float = 1.0) -> torch.Tensor:
        """BCE on presence (where known; the present class weighted ``presence_weight``) + smooth L1 on gap and
        closing speed (where a lead exists)."""
        present = targets[:, 0]
        known = torch.isfinite(present)
        if not known.any():
            return raw.sum() * 0.0
        weight = torch.tensor(presence_weight, dtype=raw.dtype, device=raw.device)
        loss = F.binary_cross_entropy_with_logits(raw[known, 0], present[known], pos_weight=weight)
        lead = known & (present > 0.5)
        if lead.any():
            loss = loss + F.smooth_l1_loss(raw[lead, 1:], targets[lead, 1:], beta=0.1) * 4.0
        return loss


def lead_metrics(raw: torch.Tensor, targets: torch.Tensor) -> dict:
    """Held-out perception accuracy: lead-present F1, gap MAE (m) and closing-speed MAE (m/s) on true leads."""
    m = presence_metrics(raw, targets, (GAP_SCALE_M, CLOSING_SCALE_MPS))
    return dict(lead_f1=m["f1"], lead_precision=m["precision"], lead_recall=m["recall"], gap_mae_m=m["mae"][0],
                closing_mae_mps=m["mae"][1], frames=m["frames"], leads=m["present"])


def crossing_metrics(raw: torch.Tensor, targets: torch.Tensor) -> dict:
    """Held-out crossing-traffic accuracy: presence F1 / precision / recall, where (m) and when (s) MAE."""
    m = presence_metrics(raw, targets, (CROSSING_SCALE_M, CROSSING_TIME_SCALE_S))
    return dict(crossing_f1=m["f1"], crossing_precision=m["precision"], crossing_recall=m["recall"],
                crossing_where_mae_m=m["mae"][0], crossing_when_mae_s=m["mae"][1], crossing_frames=m["frames"],
                crossings=m["present"])


def presence_metrics(raw: torch.Tensor, targets: torch.Tensor, scales: tuple[float, float]) -> dict:
    raw, targets = raw.detach().float(), targets.float()
    known = torch.isfinite(targets[:, 0])
    pred = torch.sigmoid(raw[known, 0]) > 0.5
    true = targets[known, 0] > 0.5
    tp, fp, fn = int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum())
    present = known & (targets[:, 0] > 0.5)
    mae = [float((raw[present, j] - targets[present, j]).abs().mean() * scale) if present.any() else math.nan
           for j, scale in ((1, scales[0]), (2, scales[1]))]
    return dict(f1=2 * tp / max(2 * tp + fp + fn, 1), precision=tp / max(tp + fp, 1), recall=tp / max(tp + fn, 1),
                mae=mae, frames=int(known.sum()), present=int(present.sum()))


def lead_targets_tensor(facts_list) -> torch.Tensor:
    return torch.tensor(np.array([lead_targets(f) for f in facts_list], np.float32))
