"""VLM reasoner: a Qwen2.5-VL-architecture model (transformers) that reads 3 cameras x 4 history frames and
the driving prompt, writes short reasoning text with the KV cache, and stops at the action token. The KV
cache of the bridge layers at that point is the bridge snapshot for the action expert.

One loading path for every checkpoint: tokenizer + image processor + model via ``from_pretrained(dir)``.
Image placeholders are expanded here with the same rule as ``Qwen2_5_VLProcessor`` because that class
insists on a video processor, which needs torchvision (not installable beside the CPU torch used here).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .bridge import BridgeSnapshot, bridge_layer_ids
from .config import SpanVLAConfig
from .errors import CheckpointError, ReasoningCancelled
from .perception import CROSSING_FRAMES
from .prompt import build_prompt

IMAGE_PAD = "<|image_pad|>"
# one token this many times in a row ends the text: the shipped default's greedy reasoning never repeats a token
# twice in a row on training frames (300 sampled), so this only cuts off a degenerate loop
MAX_TOKEN_REPEATS = 4


def degenerate(tokens: Sequence[int]) -> bool:
    """The decoded text has fallen into repeating one token (seen on frames far from the training data: "roundabout"
    thirty times); greedy decoding then stays there until the budget runs out, so the reasoner ends the text."""
    return len(tokens) >= MAX_TOKEN_REPEATS and len(set(tokens[-MAX_TOKEN_REPEATS:])) == 1


@dataclass
class ReasoningResult:
    text: str
    token_ids: list[int]
    bridge: BridgeSnapshot
    prefill_s: float
    decode_s: float
    num_vision_tokens: int
    hit_action_token: bool      # False when the action token was forced (budget out, or a degenerate repeat)
    cache: object = None        # full KV cache, only with keep_cache=True (the AR baseline continues from it)
    last_logits: torch.Tensor | None = None

    @property
    def latency_s(self) -> float:
        return self.prefill_s + self.decode_s


def vision_token_rows_cols(visual, grid_thw: torch.Tensor) -> torch.Tensor:
    """(N, 2) patch row and column, normalised to [0, 1], of each of one image's vision-encoder tokens in the order
    the encoder's last hidden states come out: the image processor lays patches out in 2x2 merge blocks, and the
    encoder permutes the blocks into attention windows (un-permuted only after the merger)."""
    from transformers.vision_utils import get_vision_window_index

    t, h, w = (int(v) for v in grid_thw[0])
    m = visual.spatial_merge_size
    rows, cols = [], []
    for hb in range(h // m):
        for wb in range(w // m):
            for i in range(m):
                for j in range(m):
                    rows.append(hb * m + i)
                    cols.append(wb * m + j)
    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=m, window_size=visual.window_size,
                                              patch_size=visual.patch_size)
    rc = torch.tensor([rows, cols], dtype=torch.float32).T.reshape(-1, m * m, 2)[window_index.long()].reshape(-1, 2)
    rc = rc.repeat(t, 1) if t > 1 else rc
    return rc / torch.tensor([max(h - 1, 1), max(w - 1, 1)], dtype=torch.float32)


class VLMReasoner:
    def __init__(self, model, tokenizer, image_processor, cfg: SpanVLAConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = cfg
        text_cfg = model.config.text_config
        self.num_layers = text_cfg.num_hidden_layers
        self.layer_ids = bridge_layer_ids(self.num_layers, cfg.bridge_layer_stride)
        self.num_heads = text_cfg.num_attention_heads
        self.num_kv_heads = text_cfg.num_key_value_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // self.num_heads
        rope = getattr(text_cfg, "rope_parameters", None) or getattr(text_cfg, "rope_scaling", None) or {}
        self.rope_theta = float(rope.get("rope_theta", getattr(text_cfg, "rope_theta", 10000.0)))
        self.merge = model.config.vision_config.spatial_merge_size
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.action_token_id = tokenizer.convert_tokens_to_ids(cfg.action_token)
        if self.action_token_id is None or self.action_token_id == tokenizer.unk_token_id:
            raise CheckpointError(f"tokenizer has no action token {cfg.action_token!r}: add it and fine-tune the VLM")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # the traffic-light head reads the vision encoder's last hidden states (before the 2x2 merger, which blurs
        # a signal head a few pixels wide) of the newest front frame; images are time-major, cameras inner
        grid = image_processor(images=[Image.new("RGB", (cfg.image_width, cfg.image_height))],
                               return_tensors="pt")["image_grid_thw"]
        self.front_tokens = int(grid.prod(-1)[0])
        self.front_token_dim = model.config.vision_config.hidden_size
        self.front_camera = cfg.cameras.index("front") if "front" in cfg.cameras else 0
        # the front camera's image at each history frame, oldest first (the perception heads read all of them)
        self.front_image_indices = [k * len(cfg.cameras) + self.front_camera for k in range(cfg.history_frames)]
        self.front_token_rc = vision_token_rows_cols(model.model.visual, grid)
        # the crossing-traffic head's views: each camera's CROSSING_FRAMES newest frames (camera-major, oldest first)
        self.crossing_image_indices = [k * len(cfg.cameras) + c for c in range(len(cfg.cameras))
                                       for k in range(cfg.history_frames - CROSSING_FRAMES, cfg.history_frames)]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, cfg: SpanVLAConfig, device="cpu", dtype=torch.float32):
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = Path(path)
        for name in ("config.json", "preprocessor_config.json"):
            if not (path / name).is_file():
                raise CheckpointError(f"VLM checkpoint {path} has no {name}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load VLM checkpoint {path}: {exc}") from exc
        model.to(device).eval()
        return cls(model, tokenizer, image_processor, cfg)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ inputs
    def prompt(self, command: str, speed: float, accel: float, past_xy: np.ndarray) -> str:
        c = self.cfg
        return build_prompt(c.cameras, c.history_frames, c.history_dt, command, speed, accel, past_xy)

    def fit_image(self, img: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 frame at the model's input size (the same array when it already is). Called where a
        frame is read, not in the node's image callbacks: there every arriving HD frame would be resized on the
        executor that also plans (results: README, HD cameras)."""
        if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8):
            raise ValueError(f"each image must be an HxWx3 uint8 array, got {getattr(img, 'shape', type(img))}")
        size = (self.cfg.image_width, self.cfg.image_height)
        if img.shape[:2] == size[::-1]:
            return img
        # reducing_gap: a box reduction first, then the bilinear filter (from 1080p 3.1 vs 7.2 ms here; pixels
        # within 0.2 grey levels on average)
        return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))

    def _resize(self, img: np.ndarray) -> Image.Image:
        return Image.fromarray(self.fit_image(img))

    def encode(self, images_per_sample: Sequence[Sequence[np.ndarray]], texts: Sequence[str]) -> dict:
        """Batch of samples -> model inputs with 3D RoPE positions. Right padding."""
        if len(images_per_sample) != len(texts):
            raise ValueError("one image list per text")
        flat: list[Image.Image] = []
        for imgs, text in zip(images_per_sample, texts):
            if len(imgs) != self.cfg.num_images:
                raise ValueError(f"expected {self.cfg.num_images} images ({len(self.cfg.cameras)} cameras x "
                                 f"{self.cfg.history_frames} frames), got {len(imgs)}")
            if text.count(IMAGE_PAD) != len(imgs):
                raise ValueError(f"prompt has {text.count(IMAGE_PAD)} image placeholders for {len(imgs)} images")
            flat.extend(self._resize(im) for im in imgs)
        vis = self.image_processor(images=flat, return_tensors="pt")
        grid = vis["image_grid_thw"]
        n_tokens = (grid.prod(-1) // (self.merge ** 2)).tolist()
        expanded, k = [], 0
        for text in texts:
            parts = text.split(IMAGE_PAD)
            out = parts[0]
            for part in parts[1:]:
                out += IMAGE_PAD * n_tokens[k] + part
                k += 1
            expanded.append(out)
        tok = self.tokenizer(expanded, return_tensors="pt", padding=True, padding_side="right")
        input_ids, attn = tok["input_ids"], tok["attention_mask"]
        mm = (input_ids == self.image_token_id).int()
        position_ids, _ = self.model.model.get_rope_index(input_ids, mm, image_grid_thw=grid, attention_mask=attn)
        dev = self.device
        return {"input_ids": input_ids.to(dev), "attention_mask": attn.to(dev),
                "pixel_values": vis["pixel_values"].to(dev, self.model.dtype), "image_grid_thw": grid.to(dev),
                "position_ids": position_ids.to(dev), "num_vision_tokens": int(mm[0].sum())}

    def _forward(self, inputs: dict, cache=None, **model_kw):
        """Model forward with a fresh KV cache; also returns the front features (B, F, N, D), the vision encoder's
        last hidden states of the front camera's F history frames (oldest first), taken with a forward hook so the
        encoder runs once. Within an image they are in the encoder's window order; ``front_token_rc`` says where
        each token sits in the image."""
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        kw = {k: v for k, v in inputs.items() if k != "num_vision_tokens"}
        seen = []
        hook = self.model.model.visual.register_forward_hook(lambda _m, _i, out: seen.append(out.last_hidden_state))
        try:
            out = self.model(**kw, past_key_values=cache, use_cache=True, return_dict=True, **model_kw)
        finally:
            hook.remove()
        B = inputs["input_ids"].shape[0]
        vis = seen[0].reshape(B, self.cfg.num_images, self.front_tokens, -1)
        return out, vis[:, self.front_image_indices].detach().float()

    @torch.inference_mode()
    def vision_tokens(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(n, N, D) the vision encoder's last hidden states of these images alone: the same tokens the reasoner's
        forward gives them (Qwen2.5-VL encodes each image on its own), at a fraction of its cost, so perception can
        run on the newest frames at control rate while the reasoner runs at a low rate."""
        return self.encode_images(images)

    def encode_images(self, images: Sequence[np.ndarray], visual: torch.nn.Module | None = None) -> torch.Tensor:
        """vision_tokens through ``visual`` (the model's own encoder, or a copy of it), with gradients where the
        encoder trains (train.look_invariance)."""
        visual = self.model.model.visual if visual is None else visual
        vis = self.image_processor(images=[self._resize(im) for im in images], return_tensors="pt")
        out = visual(vis["pixel_values"].to(self.device, self.model.dtype),
                     grid_thw=vis["image_grid_thw"].to(self.device))
        return out.last_hidden_state.reshape(len(images), self.front_tokens, -1).float()

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def reason(self, images: Sequence[np.ndarray], prompt: str, max_new_tokens: int | None = None,
               stamp: float = 0.0, temperature: float = 0.0, generator: torch.Generator | None = None,
               keep_cache: bool = False, prefix: str = "",
               cancel: Callable[[], bool] | None = None) -> ReasoningResult:
        """Prefill, then decode token by token with the KV cache until the action token (fed too, so the
        bridge contains it); if the budget runs out the action token is forced, and ``hit_action_token`` says so.
        ``prefix``: the start of the reasoning, given rather than generated (what the perception heads saw: the
        text then states it and the model writes the rest from there); the returned text includes it.
        ``cancel``: checked before each decode step; when it returns True the run raises ReasoningCancelled."""
        max_new_tokens = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        t0 = time.perf_counter()
        inputs = self.encode([images], [prompt + prefix])
        # decoding needs the last position's logits only (a 3B-class vocabulary makes all of them ~0.3 GB)
        out, front = self._forward(inputs, logits_to_keep=1)
        cache = out.past_key_values
        next_pos = int(inputs["position_ids"].max()) + 1
        t1 = time.perf_counter()
        generated: list[int] = []
        logits = out.logits[:, -1]
        while True:
            if cancel is not None and cancel():
                raise ReasoningCancelled(f"cancelled after {len(generated)} decode steps")
            forced = len(generated) >= max_new_tokens or degenerate(generated)
            if forced:
                tok = self.action_token_id
            elif temperature > 0:
                probs = torch.softmax(logits.float() / temperature, -1)
                tok = int(torch.multinomial(probs, 1, generator=generator))
            else:
                tok = int(logits.argmax(-1))
            generated.append(tok)
            pos = torch.full((3, 1, 1), next_pos, dtype=torch.long, device=self.device)
            out = self.model(input_ids=torch.tensor([[tok]], device=self.device), position_ids=pos,
                             past_key_values=cache, use_cache=True, return_dict=True)
            next_pos += 1
            logits = out.logits[:, -1]
            if tok == self.action_token_id:
                break
        t2 = time.perf_counter()
        hit = not forced      # the action token came from the model, not from the budget or a degenerate text
        text = (prefix + self.tokenizer.decode(generated[:-1], skip_special_tokens=True)).strip()
        seq_len = cache.get_seq_length()
        bridge = BridgeSnapshot.from_cache(
            cache, self.layer_ids, torch.ones(1, seq_len, dtype=torch.bool, device=self.device),
            torch.tensor([next_pos], device=self.device), stamp=stamp, reasoning=(text,), latency_s=t2 - t0,
            front_features=front)
        return ReasoningResult(text, generated, bridge, t1 - t0, t2 - t1, inputs["num_vision_tokens"], hit,
                               cache if keep_cache else None, logits if keep_cache else None)

    # ------------------------------------------------------------------ training
    def vocab_weights(self, token_weight: Callable[[str], float]) -> torch.Tensor:
        """Per-token-id CE weights for ``teacher_forced``: ``token_weight`` applied to every vocabulary entry's
        text (built once per training run, not per batch)."""
        words = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return torch.tensor([token_weight(self.tokenizer.convert_tokens_to_string([w]).strip()) for w in words])

    def teacher_forced(self, images_per_sample, prompts: Sequence[str], reasoning: Sequence[str],
                       with_bridge: bool = True, vocab_weights: torch.Tensor | None = None):
        """One forward over prompt + reasoning + action token. Returns (CE loss on reasoning and action
        token, bridge snapshot or None). Used by SFT stage 1 (loss) and stage 2 / GRPO (bridge only).
        ``vocab_weights`` (per token id, from ``vocab_weights()``) reweights each target token's CE (weighted mean):
        the tokens that only the frames can tell (a light's colour, a distance) are a few per sentence, and with a
        plain mean the text prior wins over looking at the image."""
        texts = [p + r + self.cfg.action_token for p, r in zip(prompts, reasoning)]
        inputs = self.encode(images_per_sample, texts)
        # Prompt length in tokens with one placeholder per image; expansion adds n_vis - num_images tokens.
        # Prompts end in "\n", a pre-tokenizer boundary, so the prompt's tokens prefix the full text's.
        prompt_lens = [len(self.tokenizer(p)["input_ids"]) for p in prompts]
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        n_vis = inputs["num_vision_tokens"]
        for i, plen in enumerate(prompt_lens):
            labels[i, : plen + n_vis - self.cfg.num_images] = -100
        out, front = self._forward(inputs)
        logits = out.logits[:, :-1].float()
        targets = labels[:, 1:].reshape(-1)
        per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                                                      ignore_index=-100, reduction="none")
        w = (targets != -100).float()
        if vocab_weights is not None:
            w = w * vocab_weights.to(per_token.device)[targets.clamp(min=0)]
        loss = (per_token * w).sum() / w.sum().clamp(min=1e-6)
        bridge = None
        if with_bridge:
            mask = inputs["attention_mask"].bool()
            pos = inputs["position_ids"].masked_fill(~mask[None], -1).amax(dim=(0, 2)) + 1
            bridge = BridgeSnapshot.from_cache(out.past_key_values, self.layer_ids, mask, pos, front_features=front)
        return loss, bridge
