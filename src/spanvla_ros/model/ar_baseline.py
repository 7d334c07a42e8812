"""Baseline for the speed comparison: the same VLM emits the trajectory as discrete action tokens,
autoregressively after the reasoning (AutoVLA-style). Each token is one motion primitive for one step:
a (speed, yaw rate) pair on a grid, integrated as a unicycle, so T waypoints cost T decode steps of the
full VLM instead of a few passes of the small expert."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from .reasoner import ReasoningResult, VLMReasoner

CODEBOOK_SPEEDS = np.linspace(0.0, 30.0, 16)          # m/s
CODEBOOK_YAW_RATES = np.linspace(-0.8, 0.8, 16)      # rad/s


class MotionCodebook:
    def __init__(self, speeds=CODEBOOK_SPEEDS, yaw_rates=CODEBOOK_YAW_RATES, dt: float = 0.5):
        v, w = np.meshgrid(np.asarray(speeds, float), np.asarray(yaw_rates, float), indexing="ij")
        self.codes = np.stack([v.ravel(), w.ravel()], 1)  # (K, 2)
        self.dt = dt

    def __len__(self) -> int:
        return len(self.codes)

    def encode(self, traj: np.ndarray) -> np.ndarray:
        """(T, >=3) x, y, heading in the ego frame -> (T,) code indices, chosen greedily against the decoded
        pose so quantisation errors do not accumulate."""
        tokens, pose = [], np.zeros(3)
        for target in np.asarray(traj)[:, :3]:
            cands = np.stack([self._step(pose, v, w) for v, w in self.codes])
            heading_err = np.abs(np.angle(np.exp(1j * (cands[:, 2] - target[2]))))
            err = np.linalg.norm(cands[:, :2] - target[:2], axis=1) + heading_err
            k = int(err.argmin())
            tokens.append(k)
            pose = cands[k]
        return np.asarray(tokens)

    def decode(self, tokens) -> np.ndarray:
        pose, out = np.zeros(3), []
        for k in tokens:
            v, w = self.codes[int(k)]
            pose = self._step(pose, v, w)
            out.append([*pose, v])
        return np.asarray(out, np.float32)

    def _step(self, pose, v, w, substeps: int = 5):
        x, y, h = pose
        for _ in range(substeps):
            x += v * np.cos(h) * self.dt / substeps
            y += v * np.sin(h) * self.dt / substeps
            h += w * self.dt / substeps
        return np.array([x, y, h])


class ARActionDecoder:
    """The reasoner's VLM with the codebook's tokens added to its vocabulary: in the embedding rows a padded
    vocabulary leaves unused (Qwen2.5-VL pads to 151936), sharing the weights; else in a resized copy."""

    def __init__(self, reasoner: VLMReasoner, codebook: MotionCodebook | None = None):
        self.codebook = codebook or MotionCodebook(dt=reasoner.cfg.dt)
        self.reasoner = copy.copy(reasoner)
        tok = copy.deepcopy(reasoner.tokenizer)
        names = [f"<|act_{i:04d}|>" for i in range(len(self.codebook))]
        tok.add_tokens(names, special_tokens=True)
        self.reasoner.tokenizer = tok
        if len(tok) > reasoner.model.get_input_embeddings().num_embeddings:
            self.reasoner.model = copy.deepcopy(reasoner.model)
            self.reasoner.model.resize_token_embeddings(len(tok))
        self.first_id = tok.convert_tokens_to_ids(names[0])
        self.reasoner.model.eval()

    @torch.inference_mode()
    def decode_trajectory(self, result: ReasoningResult, num_points: int) -> tuple[np.ndarray, float]:
        """Greedy decode of num_points action tokens after the action token, restricted to the codebook.
        ``result`` must come from ``self.reasoner.reason(..., keep_cache=True)``. Returns (trajectory, seconds)."""
        if result.cache is None or result.last_logits is None:
            raise ValueError("reason() must be called with keep_cache=True")
        model, dev, K = self.reasoner.model, self.reasoner.device, len(self.codebook)
        cache, next_pos = result.cache, int(result.bridge.next_position[0])
        logits = result.last_logits
        t0 = time.perf_counter()
        codes = []
        for i in range(num_points):
            code = int(logits[0, self.first_id:self.first_id + K].argmax())
            codes.append(code)
            if i == num_points - 1:
                break
            pos = torch.full((3, 1, 1), next_pos, dtype=torch.long, device=dev)
            out = model(input_ids=torch.tensor([[self.first_id + code]], device=dev), position_ids=pos,
                        past_key_values=cache, use_cache=True, return_dict=True)
            logits = out.logits[:, -1]
            next_pos += 1
        elapsed = time.perf_counter() - t0
        return self.codebook.decode(codes), elapsed
