"""The bridge: the VLM's KV cache of a sparse set of layers, handed to the action expert.

A snapshot is made once per reasoner run (low rate) and read by every action-expert step (control rate),
so it is immutable: tensors are detached (no gradient can flow from the expert into the VLM) and the
holder swaps whole snapshots by reference, which readers pick up without taking a lock.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch


def bridge_layer_ids(num_layers: int, stride: int) -> tuple[int, ...]:
    """Every ``stride``-th layer counted back from the last one, so the deepest layer is always included.

    12 layers, stride 2 -> (1, 3, 5, 7, 9, 11); stride 1 -> every layer.
    """
    if stride < 1:
        raise ValueError(f"bridge layer stride must be >= 1, got {stride}")
    return tuple(sorted(range(num_layers - 1, -1, -stride)))


@dataclass(frozen=True)
class BridgeSnapshot:
    keys: tuple[torch.Tensor, ...]      # per bridge layer: (B, kv_heads, S, head_dim), RoPE already applied
    values: tuple[torch.Tensor, ...]
    key_mask: torch.Tensor              # (B, S) bool, True where a key is a real token (not padding)
    next_position: torch.Tensor         # (B,) RoPE position of the first token after the cached sequence
    layer_ids: tuple[int, ...]
    stamp: float = 0.0                  # sensor time of the newest frames the reasoner saw
    reasoning: tuple[str, ...] = ()
    latency_s: float = 0.0
    created_monotonic: float = field(default_factory=time.monotonic)
    # (B, N, D) the VLM's vision tokens of the newest front frame (what the expert's traffic-light head reads),
    # or None from a reasoner that does not provide them
    front_features: torch.Tensor | None = None

    def __post_init__(self):
        if self.front_features is not None and self.front_features.requires_grad:
            raise ValueError("bridge front features must be detached")
        if not (len(self.keys) == len(self.values) == len(self.layer_ids)):
            raise ValueError("keys, values and layer_ids must have one entry per bridge layer")
        for k, v in zip(self.keys, self.values):
            if k.shape != v.shape or k.requires_grad or v.requires_grad:
                raise ValueError("bridge tensors must be detached and keys/values equally shaped")

    @classmethod
    def from_cache(cls, cache, layer_ids, key_mask, next_position, **meta) -> BridgeSnapshot:
        """Take the selected layers of a transformers Cache (DynamicCache.layers[i].keys/values)."""
        keys = tuple(cache.layers[i].keys.detach() for i in layer_ids)
        values = tuple(cache.layers[i].values.detach() for i in layer_ids)
        return cls(keys, values, key_mask.bool(), next_position.long(), tuple(layer_ids), **meta)

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def seq_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def age(self, now_stamp: float) -> float:
        return now_stamp - self.stamp

    def nbytes(self) -> int:
        extra = () if self.front_features is None else (self.front_features,)
        return sum(t.numel() * t.element_size() for t in self.keys + self.values + extra)

    def expand(self, n: int) -> BridgeSnapshot:
        """Repeat a batch-1 snapshot n times (GRPO groups, batched sampling) without copying memory."""
        if self.batch_size != 1:
            raise ValueError("expand() needs a batch-1 snapshot")
        ex = lambda t: t.expand(n, *t.shape[1:])
        return BridgeSnapshot(tuple(map(ex, self.keys)), tuple(map(ex, self.values)), ex(self.key_mask),
                              self.next_position.expand(n), self.layer_ids, self.stamp,
                              self.reasoning * n, self.latency_s, self.created_monotonic,
                              _maybe(ex, self.front_features))

    def repeat_interleave(self, n: int) -> BridgeSnapshot:
        """Each batch entry n times in a row (a GRPO group per scene); copies, unlike expand()."""
        rep = lambda t: t.repeat_interleave(n, dim=0)
        return BridgeSnapshot(tuple(map(rep, self.keys)), tuple(map(rep, self.values)), rep(self.key_mask),
                              rep(self.next_position), self.layer_ids, self.stamp,
                              tuple(r for r in self.reasoning for _ in range(n)), self.latency_s,
                              self.created_monotonic, _maybe(rep, self.front_features))


def _maybe(fn, t):
    return None if t is None else fn(t)


def collate_bridges(items: list[BridgeSnapshot]) -> BridgeSnapshot:
    """Right-pad batch-1 snapshots of different lengths into one batch; key_mask marks the real keys."""
    S = max(b.seq_len for b in items)

    def pad(t):
        return torch.nn.functional.pad(t, (0, 0, 0, S - t.shape[2]))
    keys = tuple(torch.cat([pad(b.keys[i]) for b in items]) for i in range(items[0].num_layers))
    values = tuple(torch.cat([pad(b.values[i]) for b in items]) for i in range(items[0].num_layers))
    mask = torch.cat([torch.nn.functional.pad(b.key_mask, (0, S - b.key_mask.shape[1])) for b in items])
    pos = torch.cat([b.next_position for b in items])
    fronts = [b.front_features for b in items]
    front = None if any(f is None for f in fronts) else torch.cat([f for f in fronts if f is not None])
    return BridgeSnapshot(keys, values, mask, pos, items[0].layer_ids,
                          reasoning=tuple(r for b in items for r in b.reasoning), front_features=front)


def split_bridge(bridge: BridgeSnapshot) -> list[BridgeSnapshot]:
    """Inverse of collate_bridges: one batch-1 snapshot per entry, padding dropped (compact to keep in memory)."""
    out = []
    for i in range(bridge.key_mask.shape[0]):
        m = bridge.key_mask[i]
        out.append(BridgeSnapshot(tuple(k[i:i + 1, :, m].clone() for k in bridge.keys),
                                  tuple(v[i:i + 1, :, m].clone() for v in bridge.values), m[m][None].clone(),
                                  bridge.next_position[i:i + 1].clone(), bridge.layer_ids, bridge.stamp,
                                  bridge.reasoning[i:i + 1],
                                  front_features=_maybe(lambda t, i=i: t[i:i + 1].clone(), bridge.front_features)))
    return out


class LatestBridge:
    """Holds the newest snapshot. Writers swap under a lock (to count versions); readers just read the
    reference, which is atomic in CPython, so the control loop never waits on the reasoner."""

    def __init__(self):
        self._snapshot: BridgeSnapshot | None = None
        self._version = 0
        self._lock = threading.Lock()

    def publish(self, snapshot: BridgeSnapshot) -> int:
        with self._lock:
            self._snapshot = snapshot
            self._version += 1
            return self._version

    def latest(self) -> BridgeSnapshot | None:
        return self._snapshot

    @property
    def version(self) -> int:
        return self._version
