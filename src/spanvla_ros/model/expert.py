"""Flow-matching action expert.

A small transformer over the trajectory tokens. Layer i attends to its own tokens plus the bridge KV of the
matching VLM layer (pi0-style prefix attention: the VLM keys/values are read, never recomputed, and no
gradient flows back into the VLM). It shares the VLM's head layout (heads, KV heads, head dim) so its
queries can read the cached keys directly, and applies the same rotary embedding at the positions that
follow the cached sequence. Flow time and ego state condition every layer through adaLN-zero.

Flow from the history initialisation (SpanVLA): a_t = t*a + (1-t)*a_his, target velocity a - a_his; at
inference N Euler steps from a_his. ``flow_init="noise"`` is the ablation that starts from N(0, I).

Traffic lights (``cfg.traffic_lights``): a head on the VLM's vision tokens of the newest front frame (carried in
the bridge snapshot) classifies the light (green / yellow / red), supervised with an auxiliary cross-entropy like
the light heads of TransFuser / InterFuser. It is attention-pooled: a per-token MLP gives a "this is the signal"
score and class logits, and the softmax of the scores over tokens weights the logits, so the signal is found
wherever it is in the image (held-out accuracy 0.88 vs 0.77 for a linear head on the flattened tokens, measured
on the default VLM's features). Its probabilities, detached and gated by the stop-line validity (the last ego
entry), join the ego conditioning: a stop/go decision the flow would otherwise have to find in ~1000 bridge
tokens, which it did not (results/training/results.md).

Lead vehicle (``cfg.lead_perception``): a PooledTokenHead (model.perception) on the front camera's history frames
gives P(lead), gap and closing speed, detached, to the conditioning; a model with a junction lead head
(``cfg.junction_lead_head``) reads that one instead near the route's stop lines. Both heads can read tokens fresher
than the bridge: ``percept`` / ``front`` arguments take the newest frames' tokens computed at control rate. The
crossing-traffic head (``cfg.crossing_perception``) reads every camera's newest frames, at control rate only, for
the safety envelope.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bridge import BridgeSnapshot
from .config import LIGHT_STATES, SpanVLAConfig
from .perception import CROSSING_FRAMES, LEAD_FEATURES, PooledTokenHead, pooled_readings
from .trajectory import denormalise, normalise


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def flow_pair(a: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Point on the straight path from x0 (a_his, or noise) to a at time t, and the velocity to regress."""
    tt = t[:, None, None]
    return tt * a + (1 - tt) * x0, a - x0


class ExpertLayer(nn.Module):
    def __init__(self, hidden: int, mlp: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.h, self.kv, self.d = num_heads, num_kv_heads, head_dim
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(hidden, num_heads * head_dim)
        self.k = nn.Linear(hidden, num_kv_heads * head_dim)
        self.v = nn.Linear(hidden, num_kv_heads * head_dim)
        self.o = nn.Linear(num_heads * head_dim, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden))
        self.ada = nn.Linear(hidden, 6 * hidden)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, cond, cos, sin, bridge_k, bridge_v, attn_mask):
        B, T, _ = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(cond)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q = self.q(h).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys = torch.cat([bridge_k.to(q.dtype), k], dim=2)
        values = torch.cat([bridge_v.to(q.dtype), v], dim=2)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, enable_gqa=self.h != self.kv)
        x = x + g1 * self.o(a.transpose(1, 2).reshape(B, T, self.h * self.d))
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class FlowActionExpert(nn.Module):
    light_mean: torch.Tensor
    light_std: torch.Tensor

    def __init__(self, cfg: SpanVLAConfig, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: float, front_token_dim: int = 0, front_tokens: int = 0):
        super().__init__()
        self.cfg = cfg
        self.num_layers, self.head_dim, self.rope_theta = num_layers, head_dim, rope_theta
        D = cfg.expert_hidden
        self.in_proj = nn.Linear(cfg.action_dim, D)
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        n_light = len(LIGHT_STATES) if cfg.traffic_lights else 0
        if cfg.traffic_lights:
            if front_token_dim <= 0:
                raise ValueError("traffic_lights needs the reasoner's vision token size")
            # per-channel standardisation of the tokens, fitted on the training frames (fit_light_normaliser)
            self.register_buffer("light_mean", torch.zeros(front_token_dim))
            self.register_buffer("light_std", torch.ones(front_token_dim))
            # light_frames > 1: the head pools over the front camera's newest frames, each token tagged with its
            # frame, so a signal that has left the view near the stop line is still read from an earlier frame
            frame_tag = cfg.light_frames if cfg.light_frames > 1 else 0
            self.light_head = nn.Sequential(nn.Linear(front_token_dim + frame_tag, D), nn.GELU(approximate="tanh"),
                                            nn.Linear(D, 1 + n_light))
        n_lead = LEAD_FEATURES if cfg.lead_perception else 0
        if cfg.lead_perception:
            if front_token_dim <= 0 or front_tokens <= 0:
                raise ValueError("lead_perception needs the reasoner's vision token size and count")
            self.lead_head = PooledTokenHead(front_token_dim, front_tokens, cfg.history_frames)
        if cfg.junction_lead_head:
            self.junction_lead_head = PooledTokenHead(front_token_dim, front_tokens, cfg.history_frames)
        if cfg.crossing_perception:
            self.crossing_head = PooledTokenHead(front_token_dim, front_tokens, len(cfg.cameras) * CROSSING_FRAMES)
        self.ego_mlp = nn.Sequential(nn.Linear(cfg.ego_dim + n_light + n_lead, D), nn.SiLU(), nn.Linear(D, D))
        self.layers = nn.ModuleList(ExpertLayer(D, cfg.expert_mlp, num_heads, num_kv_heads, head_dim)
                                    for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.out_ada = nn.Linear(D, 2 * D)
        self.out = nn.Linear(D, cfg.action_dim)
        for m in (self.out_ada, self.out):  # zero velocity at init: sampling returns the initialisation
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _rope(self, next_position: torch.Tensor, T: int, dtype):
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=next_position.device,
                                                       dtype=torch.float32) / self.head_dim))
        pos = next_position[:, None].float() + torch.arange(T, device=next_position.device)[None]
        freqs = pos[..., None] * inv
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def _front(source: BridgeSnapshot | torch.Tensor) -> torch.Tensor:
        """(B, F, N, D) front tokens from a bridge (the reasoner's frames) or given directly (fresher frames)."""
        front = source.front_features if isinstance(source, BridgeSnapshot) else source
        if front is None:
            raise ValueError("this expert reads the front camera: the bridge needs front_features "
                             "(VLMReasoner sets them)")
        return front if front.dim() == 4 else front[:, None]    # (B, N, D): the newest frame only

    def light_logits(self, source: BridgeSnapshot | torch.Tensor) -> torch.Tensor | None:
        """(B, 3) green / yellow / red logits from the newest front frame's tokens; None without a light head."""
        if not self.cfg.traffic_lights:
            return None
        out = self._light_token_outputs(self._front(source)[:, -self.cfg.light_frames:])   # (B, L, N, 1 + classes)
        out = out.flatten(1, 2)
        weight = torch.softmax(out[..., 0], dim=-1)[..., None]    # where the signal is
        return (weight * out[..., 1:]).sum(1)

    def _light_token_outputs(self, front: torch.Tensor) -> torch.Tensor:
        """(B, L, N, D) the newest L front frames -> (B, L, N, 1 + classes) per token: a "this is the signal"
        logit, then class scores."""
        L = front.shape[1]
        f = (front.to(self.light_mean.dtype) - self.light_mean) / self.light_std
        if f.is_inference() and torch.is_grad_enabled():
            f = f.clone()   # bridges made under inference_mode, read while training the head
        if self.cfg.light_frames > 1:
            B, _, N, _ = f.shape
            tag = torch.eye(self.cfg.light_frames, dtype=f.dtype, device=f.device)[-L:]
            f = torch.cat([f, tag[None, :, None].expand(B, L, N, -1)], -1)
        return self.light_head(f)

    def view_readings(self, tokens: torch.Tensor, front: bool) -> torch.Tensor:
        """(n, N, D) single views' tokens -> (n, K): what every perception head that reads such a view takes from
        it (PooledTokenHead.view_readings; the light head's the same, as the newest frame), the front camera's heads
        only for ``front``. Two encoders whose tokens give equal readings give equal perception."""
        heads = [self.crossing_head] if self.cfg.crossing_perception else []
        if front:
            heads += [self.lead_head] if self.cfg.lead_perception else []
            heads += [self.junction_lead_head] if self.cfg.junction_lead_head else []
        parts = [h.view_readings(tokens) for h in heads]
        if front and self.cfg.traffic_lights:
            parts.append(pooled_readings(self._light_token_outputs(tokens[:, None])[:, 0]))
        return torch.cat(parts, -1) if parts else tokens.new_zeros(tokens.shape[0], 0)

    @torch.no_grad()
    def fit_light_normaliser(self, features: torch.Tensor) -> None:
        """Set the light head's input standardisation from training front tokens (..., D)."""
        flat = features.reshape(-1, features.shape[-1])
        self.light_mean.copy_(flat.mean(0))
        self.light_std.copy_(flat.std(0).clamp(min=1e-3))

    def lead_raw(self, source: BridgeSnapshot | torch.Tensor, ego: torch.Tensor,
                 junction: bool | torch.Tensor = False) -> torch.Tensor | None:
        """(B, 3) the lead head's raw outputs (model.perception.PooledTokenHead); None without one. ``junction``
        (one flag, or (B,) per sample; model.route.at_junction): read by the junction lead head there, for a model
        with one."""
        if not self.cfg.lead_perception:
            return None
        front = self._front(source)
        front, speed = front.expand(ego.shape[0], *front.shape[1:]), ego[:, 0]   # ego[:, 0]: the speed
        where = torch.as_tensor(junction, dtype=torch.bool, device=ego.device).expand(ego.shape[0])
        if not self.cfg.junction_lead_head or not where.any():
            return self.lead_head(front, speed)
        if where.all():
            return self.junction_lead_head(front, speed)
        return torch.where(where[:, None], self.junction_lead_head(front, speed), self.lead_head(front, speed))

    def crossing_raw(self, views: torch.Tensor | None, ego: torch.Tensor) -> torch.Tensor | None:
        """(B, 3) the crossing-traffic head's raw outputs from every camera's newest frames (B, C * CROSSING_FRAMES,
        N, D) in the reasoner's crossing_image_indices order; None without the head or the views."""
        if not self.cfg.crossing_perception or views is None:
            return None
        return self.crossing_head(views.expand(ego.shape[0], *views.shape[1:]), ego[:, 0])

    @staticmethod
    def percept_from(light_logits: torch.Tensor | None, lead_raw: torch.Tensor | None) -> torch.Tensor | None:
        """Detached conditioning from the heads' outputs: light probabilities, then the lead features."""
        parts = ([torch.softmax(light_logits.detach().float(), -1)] if light_logits is not None else []) + \
                ([PooledTokenHead.features(lead_raw)] if lead_raw is not None else [])
        return torch.cat(parts, -1) if parts else None

    def percept(self, source: BridgeSnapshot | torch.Tensor, ego: torch.Tensor,
                junction: bool | torch.Tensor = False) -> torch.Tensor | None:
        """(B, P) what the heads perceive in the front frames (the bridge's, or fresher ones), detached: the flow
        reads it; only the auxiliary losses train the heads. Computed once per plan, not per Euler step."""
        return self.percept_from(self.light_logits(source), self.lead_raw(source, ego, junction))

    def conditioning(self, ego: torch.Tensor, percept: torch.Tensor | None) -> torch.Tensor:
        """The ego vector, plus the light probabilities (zero unless a stop line is ahead) for a light model, plus
        the lead features for a lead-perception model."""
        if not (self.cfg.traffic_lights or self.cfg.lead_perception):
            return ego
        if percept is None:
            raise ValueError("a perception model's conditioning needs its percept")
        parts, k = [ego], 0
        if self.cfg.traffic_lights:
            n = len(LIGHT_STATES)
            stop_line_ahead = ego[:, -1:]
            parts.append(percept[:, :n].to(ego.dtype).expand(ego.shape[0], -1) * stop_line_ahead)
            k = n
        if self.cfg.lead_perception:
            parts.append(percept[:, k:k + LEAD_FEATURES].to(ego.dtype).expand(ego.shape[0], -1))
        return torch.cat(parts, -1)

    def forward(self, bridge: BridgeSnapshot, x_t: torch.Tensor, t: torch.Tensor, ego: torch.Tensor,
                percept: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity field v(x_t, t | bridge, ego) in normalised action units. x_t: (B, T, A), t: (B,)."""
        if bridge.num_layers != self.num_layers:
            raise ValueError(f"bridge has {bridge.num_layers} layers, expert expects {self.num_layers}")
        B, T, _ = x_t.shape
        pos_idx = torch.arange(T, device=x_t.device)
        x = self.in_proj(x_t) + sinusoidal(pos_idx, self.cfg.expert_hidden).to(x_t.dtype)[None]
        cond = (self.time_mlp(sinusoidal(t * 1000.0, self.cfg.expert_hidden).to(x_t.dtype))
                + self.ego_mlp(self.conditioning(ego, self.percept(bridge, ego) if percept is None else percept)))
        cos, sin = self._rope(bridge.next_position.expand(B), T, x.dtype)
        key_mask = bridge.key_mask.expand(B, -1)
        attn_mask = torch.cat([key_mask, torch.ones(B, T, dtype=torch.bool, device=x.device)], dim=1)[:, None, None]
        for layer, bk, bv in zip(self.layers, bridge.keys, bridge.values):
            x = layer(x, cond, cos, sin, bk.expand(B, -1, -1, -1), bv.expand(B, -1, -1, -1), attn_mask)
        sh, sc = self.out_ada(cond)[:, None].chunk(2, dim=-1)
        return self.out(self.out_norm(x) * (1 + sc) + sh)

    # ------------------------------------------------------------------ flow matching
    def initial_state(self, a_his_n: torch.Tensor, generator=None) -> torch.Tensor:
        if self.cfg.flow_init == "history":
            return a_his_n
        if self.cfg.flow_init == "noise":
            return torch.randn(a_his_n.shape, generator=generator, device=a_his_n.device, dtype=a_his_n.dtype)
        raise ValueError(f"flow_init must be 'history' or 'noise', got {self.cfg.flow_init!r}")

    def flow_loss(self, bridge: BridgeSnapshot, a: torch.Tensor, a_his: torch.Tensor, ego: torch.Tensor,
                  t: torch.Tensor | None = None, generator=None,
                  percept: torch.Tensor | None = None) -> torch.Tensor:
        """Conditional flow matching. a, a_his: (B, T, A) in physical units."""
        a_n, his_n = normalise(a, self.cfg.action_scale), normalise(a_his, self.cfg.action_scale)
        x0 = self.initial_state(his_n, generator)
        if self.cfg.flow_init == "history" and self.cfg.history_noise_std > 0:
            x0 = x0 + self.cfg.history_noise_std * torch.randn(x0.shape, generator=generator, device=x0.device)
        if t is None:
            t = torch.rand(a.shape[0], generator=generator, device=a.device)
        x_t, target = flow_pair(a_n, x0, t)
        return F.mse_loss(self(bridge, x_t, t, ego, percept), target)

    def sample(self, bridge: BridgeSnapshot, a_his: torch.Tensor, ego: torch.Tensor, steps: int | None = None,
               generator=None, step_std: float = 0.0, return_log_prob: bool = False,
               front: torch.Tensor | None = None, reference: FlowActionExpert | None = None,
               percept: torch.Tensor | None = None):
        """Euler integration from t=0 to 1 (the one integrator: planning, evaluation and GRPO). ``step_std > 0``
        makes each step Gaussian (x' ~ N(x + v dt, s^2 dt)), the stochastic policy GRPO needs; with
        ``return_log_prob`` the summed log-density of the path is returned, and with a ``reference`` expert also the
        path's summed KL to it (GRPO's regulariser): (trajectory, log_prob[, kl]).
        ``front``: front-camera tokens fresher than the bridge's, for the perception heads; ``percept``: their
        outputs already computed (``percept_from``)."""
        steps = steps or self.cfg.flow_steps
        if percept is None:
            percept = self.percept(bridge if front is None else front, ego)
        x = self.initial_state(normalise(a_his, self.cfg.action_scale), generator)
        dt = 1.0 / steps
        log_prob = torch.zeros(x.shape[0], device=x.device)
        kl = torch.zeros(x.shape[0], device=x.device)
        for i in range(steps):
            t = torch.full((x.shape[0],), i * dt, device=x.device, dtype=x.dtype)
            mean = x + self(bridge, x, t, ego, percept) * dt
            if step_std > 0:
                std = step_std * math.sqrt(dt)
                if reference is not None:
                    with torch.no_grad():
                        mean_ref = x + reference(bridge, x, t, ego) * dt
                    kl = kl + (((mean - mean_ref) ** 2) / (2 * std ** 2)).flatten(1).sum(-1)
                x = mean + std * torch.randn(mean.shape, generator=generator, device=x.device, dtype=x.dtype)
                if return_log_prob:
                    lp = -0.5 * ((x.detach() - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
                    log_prob = log_prob + lp.flatten(1).sum(-1)
                x = x.detach()
            else:
                x = mean
        out = denormalise(x, self.cfg.action_scale)
        if reference is not None:
            return out, log_prob, kl
        return (out, log_prob) if return_log_prob else out
