"""SpanVLAPolicy: reasoner + action expert + config, saved and loaded as one checkpoint directory.

    <dir>/spanvla.json             SpanVLAConfig (vlm_path points at the VLM, default "vlm")
    <dir>/vlm/                     Hugging Face Qwen2.5-VL checkpoint: config, weights, tokenizer, preprocessor
    <dir>/expert.safetensors       action expert weights

A real Qwen2.5-VL-3B fine-tune plugs in by setting vlm_path to its directory; the expert's shapes follow
the VLM's head layout and layer count automatically.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SpanVLAConfig
from .errors import CheckpointError
from .expert import FlowActionExpert
from .perception import Percept
from .reasoner import ReasoningResult, VLMReasoner
from .route import at_junction, route_features, stop_line_features
from .trajectory import ego_state_vector, history_trajectory

# Shapes of the VLMs this project builds from scratch. "tiny" is the embedded default; "qwen0.5b-class" has
# the language-model shapes of Qwen2.5-0.5B with a reduced vision tower; "qwen2.5-vl-3b-class" has every shape of
# Qwen2.5-VL-3B-Instruct (vision tower, language model, the 151936-row embedding the real checkpoint pads its
# vocabulary to): random weights, for timing and memory where the real weights cannot be downloaded.
VLM_PRESETS = {
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, rope_section=[4, 6, 6]),
        vision=dict(depth=4, hidden_size=96, intermediate_size=256, num_heads=4, fullatt_block_indexes=[1, 3])),
    "qwen0.5b-class": dict(
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, rope_section=[8, 12, 12]),
        vision=dict(depth=8, hidden_size=640, intermediate_size=1728, num_heads=10, fullatt_block_indexes=[3, 7])),
    "qwen2.5-vl-3b-class": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, rope_section=[16, 24, 24], rope_theta=1000000.0, vocab_size=151936),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                    fullatt_block_indexes=[7, 15, 23, 31])),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


PLAN_NOISE_SEED = 0


def vlm_config(preset: str, tokenizer):
    """The Hugging Face Qwen2.5-VL config of a preset, with this tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig

    p = VLM_PRESETS[preset]
    t: dict[str, Any] = dict(p["text"])
    v = p["vision"]
    section, theta = t.pop("rope_section"), t.pop("rope_theta", 10000.0)
    vocab = max(len(tokenizer), t.pop("vocab_size", 0))
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_scaling={"type": "mrope", "mrope_section": section, "rope_theta": theta},
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **t),
        vision_config=dict(out_hidden_size=t["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, **v),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)


def build_vlm(preset: str, tokenizer, cfg: SpanVLAConfig, seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vcfg = vlm_config(preset, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(vcfg).eval()
    pixels = cfg.image_height * cfg.image_width
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)
    return VLMReasoner(model, tokenizer, image_processor, cfg)


class SpanVLAPolicy:
    def __init__(self, cfg: SpanVLAConfig, reasoner: VLMReasoner, expert: FlowActionExpert,
                 model_id: str = "untrained"):
        self.cfg, self.reasoner, self.expert, self.model_id = cfg, reasoner, expert, model_id

    @staticmethod
    def make_expert(cfg: SpanVLAConfig, reasoner: VLMReasoner) -> FlowActionExpert:
        return FlowActionExpert(cfg, len(reasoner.layer_ids), reasoner.num_heads, reasoner.num_kv_heads,
                                reasoner.head_dim, reasoner.rope_theta, reasoner.front_token_dim, reasoner.front_tokens)

    @classmethod
    def build(cls, cfg: SpanVLAConfig, tokenizer, preset: str = "tiny", seed: int = 0) -> SpanVLAPolicy:
        reasoner = build_vlm(preset, tokenizer, cfg, seed)
        torch.manual_seed(seed + 1)
        return cls(cfg, reasoner, cls.make_expert(cfg, reasoner).eval(), model_id=f"untrained-{preset}")

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str = "float32",
                        **overrides) -> SpanVLAPolicy:
        """``dtype`` is the VLM's (bfloat16 halves a large VLM's memory and time on a GPU); the action expert is
        small and stays float32, reading the bridge's keys/values in its own precision."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        cfg_file, expert_file = path / "spanvla.json", path / "expert.safetensors"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path} is not a SpanVLA checkpoint: spanvla.json is missing")
        try:
            cfg = SpanVLAConfig.load(cfg_file)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{cfg_file} is corrupt: {exc}") from exc
        for k, v in overrides.items():
            setattr(cfg, k, v)
        vlm_dir = Path(cfg.vlm_path) if Path(cfg.vlm_path).is_absolute() else path / cfg.vlm_path
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        reasoner = VLMReasoner.from_pretrained(vlm_dir, cfg, device=device, dtype=DTYPES[dtype])
        expert = cls.make_expert(cfg, reasoner)
        if not expert_file.is_file():
            raise CheckpointError(f"{path} has no expert.safetensors")
        try:
            state = load_file(expert_file, device=str(device))
            expert.load_state_dict(state)
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"cannot load {expert_file}: {exc}") from exc
        digest = hashlib.sha256(cfg_file.read_bytes() + expert_file.read_bytes()).hexdigest()[:8]
        return cls(cfg, reasoner, expert.to(device).eval(), model_id=f"{path.name}@{digest}")

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not Path(self.cfg.vlm_path).is_absolute():
            self.reasoner.save_pretrained(path / self.cfg.vlm_path)
        self.cfg.save(path / "spanvla.json")
        save_file({k: v.contiguous() for k, v in self.expert.state_dict().items()}, path / "expert.safetensors")

    # ------------------------------------------------------------------ inference
    def reason(self, images: Sequence[np.ndarray], command: str, speed: float, accel: float, past_xyh: np.ndarray,
               stamp: float = 0.0, route_xy: np.ndarray | None = None, pose=None, stop_xy: np.ndarray | None = None,
               **kw) -> ReasoningResult:
        """Reasoning over the frames; a grounded-reasoning model (cfg.grounded_reasoning) starts its text with what
        its perception heads see in these frames (route, pose and stop lines as for ``plan``: where the light is)."""
        prompt = self.reasoner.prompt(command, speed, accel, past_xyh[:, :2])
        if self.cfg.grounded_reasoning:
            kw["prefix"] = self.perceived_text(
                self.reasoner.vision_tokens([images[i] for i in self.reasoner.front_image_indices])[None],
                speed, self.route_input(route_xy, pose, stop_xy), self.at_junction(route_xy, stop_xy, pose))
        return self.reasoner.reason(images, prompt, stamp=stamp, **kw)

    @torch.inference_mode()
    def perceived_text(self, front: torch.Tensor, speed: float, route: np.ndarray | None,
                       junction: bool = False) -> str:
        """The facts the perception heads read from the front frames, in the reasoning text's own phrasing
        (data.scene_text): the light when a stop line is ahead, the lead vehicle when one is seen (by the junction
        lead head at a junction, for a model with one); with neither, that the lane ahead is free, as the training
        text says of such a scene (left to the decoder, it states facts no head saw, and the plan follows them)."""
        from ..data.scene_text import free_road_clause, lead_clause, light_clause
        from ..sim.types import VEHICLE_LENGTH_M
        from .config import LIGHT_STATES

        ego = torch.from_numpy(self.ego_vector(speed, 0.0, 0.0, self.cfg.commands[0], route))[None]
        seen = self._percept(self.expert.light_logits(front), self.expert.lead_raw(front, ego, junction), route)
        parts = []
        if seen is not None and seen.light is not None and seen.stop_line_m is not None:   # a stop line ahead
            state = LIGHT_STATES[int(np.argmax(seen.light))]
            parts.append(light_clause(state, seen.stop_line_m - VEHICLE_LENGTH_M / 2))   # from the bumper
        if seen is not None and seen.lead_probability is not None and seen.lead_probability > 0.5:
            parts.append(lead_clause(seen.lead_gap_m, seen.lead_closing_mps, speed))
        return "; ".join(parts) or free_road_clause()

    def history_init(self, past_xyh: np.ndarray, speed: float, horizon: int | None = None) -> np.ndarray:
        return history_trajectory(past_xyh, speed, self.cfg.history_dt, horizon or self.cfg.horizon, self.cfg.dt)

    @property
    def uses_route(self) -> bool:
        return bool(self.cfg.route_lookahead_m)

    def route_input(self, route_xy: np.ndarray | None, pose, stop_xy: np.ndarray | None = None) -> np.ndarray | None:
        """Route features for the ego at world ``pose`` (x, y, yaw), then (traffic-light model) the next of the
        stop lines ``stop_xy`` (world points on the route); None for a model without route input."""
        if not self.uses_route:
            return None
        route = route_features(route_xy, pose, self.cfg.route_lookahead_m)
        if not self.cfg.traffic_lights:
            return route
        return np.concatenate([route, stop_line_features(route_xy, stop_xy, pose)])

    def ego_vector(self, speed: float, accel: float, yaw_rate: float, command: str,
                   route: np.ndarray | None = None) -> np.ndarray:
        if self.uses_route and route is None:
            route = self.route_input(None, None)   # "no route known": zeros, validity 0
        return ego_state_vector(speed, accel if self.cfg.expert_sees_accel else 0.0, yaw_rate, command,
                                self.cfg.commands, route)

    def crossing_tokens(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(1, C * CROSSING_FRAMES, N, D) the crossing head's views of a frame set (history_frames x cameras,
        time-major, as the reasoner reads it)."""
        return self.reasoner.vision_tokens([images[i] for i in self.reasoner.crossing_image_indices])[None]

    @property
    def reads_front_camera(self) -> bool:
        """Whether the expert has perception heads on the front camera's tokens (traffic light, lead vehicle)."""
        return bool(self.cfg.traffic_lights or self.cfg.lead_perception)

    def plan(self, bridge, past_xyh: np.ndarray, speed: float, accel: float, yaw_rate: float, command: str,
             steps: int | None = None, horizon: int | None = None, route_xy: np.ndarray | None = None,
             pose=None, stop_xy: np.ndarray | None = None, front: torch.Tensor | None = None) -> np.ndarray:
        """(horizon, 4) trajectory x, y, heading, speed in the ego frame, from the latest bridge (plan_perceived
        without what the heads perceived)."""
        return self.plan_perceived(bridge, past_xyh, speed, accel, yaw_rate, command, steps, horizon, route_xy,
                                   pose, stop_xy, front)[0]

    @torch.inference_mode()
    def plan_perceived(self, bridge, past_xyh: np.ndarray, speed: float, accel: float, yaw_rate: float,
                       command: str, steps: int | None = None, horizon: int | None = None,
                       route_xy: np.ndarray | None = None, pose=None, stop_xy: np.ndarray | None = None,
                       front: torch.Tensor | None = None,
                       crossing: torch.Tensor | None = None) -> tuple[np.ndarray, Percept | None]:
        """(horizon, 4) trajectory x, y, heading, speed in the ego frame, from the latest bridge, and what the
        perception heads read (None for a model without them).

        ``route_xy`` (world polyline) and the ego's world ``pose`` (x, y, yaw) in the same frame give the route
        input; without them a route-conditioned model plans from the cameras alone. ``stop_xy``: the route's
        stop lines (world points), for a traffic-light model. ``front``: the newest front-camera tokens
        (FreshPerception), else the perception heads read the bridge's frames; ``crossing``: every camera's newest
        frames' tokens for the crossing-traffic head (FreshPerception.crossing_views), which reads nothing else.

        The noise start draws the same noise for every plan: consecutive plans then differ only where the inputs
        do, instead of by a fresh sample of the flow's spread each time."""
        dev = self.reasoner.device
        a_his = torch.from_numpy(self.history_init(past_xyh, speed, horizon))[None].to(dev)
        route, ego, junction = self._route_and_ego(speed, accel, yaw_rate, command, route_xy, pose, stop_xy)
        gen = torch.Generator(device=dev).manual_seed(PLAN_NOISE_SEED)
        source = bridge if front is None else front
        light, lead = self.expert.light_logits(source), self.expert.lead_raw(source, ego, junction)
        traj = self.expert.sample(bridge, a_his, ego, steps=steps, generator=gen,
                                  percept=self.expert.percept_from(light, lead))[0].cpu().numpy()
        return traj, self._percept(light, lead, route, self.expert.crossing_raw(crossing, ego))

    @torch.inference_mode()
    def perceive(self, front: torch.Tensor, speed: float, accel: float, yaw_rate: float, command: str,
                 route_xy: np.ndarray | None = None, pose=None, stop_xy: np.ndarray | None = None) -> Percept | None:
        """What the perception heads read in the newest front frames' tokens (FreshPerception) without a bridge,
        as ``plan_perceived`` reads them: before the reasoner's first bridge the planner still knows the lead and
        the light (None for a model without heads)."""
        route, ego, junction = self._route_and_ego(speed, accel, yaw_rate, command, route_xy, pose, stop_xy)
        return self._percept(self.expert.light_logits(front), self.expert.lead_raw(front, ego, junction), route)

    def _route_and_ego(self, speed: float, accel: float, yaw_rate: float, command: str, route_xy, pose,
                       stop_xy) -> tuple[np.ndarray | None, torch.Tensor, bool]:
        """The route input (None without a route), the (1, ego_dim) ego vector the expert and the heads read, and
        whether the ego is at a junction (model.route.at_junction: which lead head reads the frames)."""
        route = self.route_input(route_xy, pose, stop_xy)
        ego = torch.from_numpy(self.ego_vector(speed, accel, yaw_rate, command, route))[None].to(self.reasoner.device)
        return route, ego, self.at_junction(route_xy, stop_xy, pose)

    def at_junction(self, route_xy, stop_xy, pose) -> bool:
        """Whether the junction lead head reads the frames: a stop line of the route is near (model.route)."""
        return self.uses_route and pose is not None and at_junction(route_xy, stop_xy, pose)

    def _percept(self, light: torch.Tensor | None, lead: torch.Tensor | None, route: np.ndarray | None,
                 crossing: torch.Tensor | None = None) -> Percept | None:
        from .perception import CLOSING_SCALE_MPS, CROSSING_SCALE_M, CROSSING_TIME_SCALE_S, GAP_SCALE_M
        from .route import STOP_SCALE_M

        if light is None and lead is None:
            return None
        stop_ahead = self.cfg.traffic_lights and route is not None and route[-1] > 0.5
        probs = tuple(float(x) for x in torch.softmax(light[0].float(), -1)) if light is not None else None
        return Percept(light=probs if stop_ahead else None,          # type: ignore[arg-type]
                       stop_line_m=float(route[-2]) * STOP_SCALE_M if stop_ahead and route is not None else None,
                       lead_probability=float(torch.sigmoid(lead[0, 0])) if lead is not None else None,
                       lead_gap_m=float(lead[0, 1]) * GAP_SCALE_M if lead is not None else math.nan,
                       lead_closing_mps=float(lead[0, 2]) * CLOSING_SCALE_MPS if lead is not None else math.nan,
                       crossing_probability=float(torch.sigmoid(crossing[0, 0])) if crossing is not None else None,
                       crossing_where_m=float(crossing[0, 1]) * CROSSING_SCALE_M if crossing is not None else math.nan,
                       crossing_when_s=(float(crossing[0, 2]) * CROSSING_TIME_SCALE_S if crossing is not None
                                        else math.nan))


def state_digest(state: dict, prefixes: tuple[str, ...] = ("",)) -> str:
    """Digest of the tensors of a state dict whose names start with one of ``prefixes``."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        if k.startswith(prefixes):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def vlm_digest(policy: SpanVLAPolicy) -> str:
    """Digest of the VLM's weights: policies that share it share the reasoner's outputs (bridges computed once)."""
    return state_digest(policy.reasoner.model.state_dict())


class FreshPerception:
    """Vision tokens of the newest frames for the perception heads, at control rate.

    The reasoner refreshes the bridge at ~1 Hz from frames ~1 s old by the time the expert uses them; the heads
    need only the vision encoder's tokens, which it computes per image in a few ms. Each frame is encoded once
    (cached by camera and stamp) and the newest of them are handed to the planner."""

    def __init__(self, policy: SpanVLAPolicy):
        self.policy = policy
        self._cache: dict[tuple[str, float], torch.Tensor] = {}

    def tokens(self, images: Sequence[np.ndarray], stamps: Sequence[float], camera: str) -> torch.Tensor:
        """(1, F, N, D) tokens of ``images`` (one camera's history, oldest first, stamped)."""
        keys = [(camera, st) for st in stamps]
        missing = list({key: i for i, key in enumerate(keys) if key not in self._cache}.values())   # once each
        if missing:
            new = self.policy.reasoner.vision_tokens([images[i] for i in missing])
            for i, tok in zip(missing, new):
                self._cache[keys[i]] = tok
        # frames between the history's picks are kept: at a camera rate above 1 / history_dt each of them is one of
        # the next plans' picks (the picks move with the newest frame)
        oldest = min(stamps)
        for key in [key for key in self._cache if key[0] == camera and key[1] < oldest]:
            del self._cache[key]
        return torch.stack([self._cache[key] for key in keys])[None]

    def crossing_views(self, histories: Sequence[tuple[str, tuple[Sequence[np.ndarray], Sequence[float]]]]
                       ) -> torch.Tensor:
        """(1, C * CROSSING_FRAMES, N, D): each camera's newest frames, in the crossing head's order. ``histories``:
        (camera, its history as FrameBuffers.camera_history gives it), in the model's camera order."""
        from .perception import CROSSING_FRAMES

        return torch.cat([self.tokens(*hist, camera=cam)[0, -CROSSING_FRAMES:] for cam, hist in histories])[None]
