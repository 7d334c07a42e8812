"""spanvla-train: SFT stage 1 (reasoning CE), SFT stage 2 (flow matching from the history initialisation, VLM
frozen), GRPO post-training of the action expert with r = PDMS - w_N*r_neg + w_R*r_rec - l_C*r_cot.

Runs on CPU here; under `torchrun --nproc_per_node N` the same code trains data-parallel (gloo/nccl process
group, each rank taking its shard of every epoch, gradients averaged across ranks before each step). Checkpoints
after each stage (resume picks up the last finished stage), CSV logs (step, stage, loss, reward terms) next to them.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..data.samples import (
    Sample,
    attach_routes,
    drop_off_route_labels,
    light_label,
    load_samples,
    relabel_signal_stops,
    scene_maps,
    score_plan,
)
from ..data.scene_text import light_token_weight
from ..model.batch import ego_tensor, his_tensor, junction_tensor, prompts, reason_all
from ..model.bridge import BridgeSnapshot, collate_bridges, split_bridge
from ..model.config import LIGHT_STATES, ROUTE_LOOKAHEAD_M, SpanVLAConfig, ego_dim_for
from ..model.perception import CROSSING_FRAMES, PooledTokenHead, crossing_targets_tensor, lead_targets_tensor
from ..model.policy import SpanVLAPolicy, state_digest, vlm_digest
from ..sim.scenarios import SCENARIOS, parse_seeds
from .config import HEAD_PREFIXES, TrainConfig

STAGES = ("sft", "grpo_warmup", "grpo_pos", "grpo_neg", "grpo_rec")


# ------------------------------------------------------------------ distributed helpers
def dist_info():
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def optimizer_step(opt, params, loss, max_norm: float = 1.0) -> None:
    """backward (under DistributedDataParallel the gradients are averaged across ranks during it) + clipping +
    step."""
    params = [p for p in params if p.requires_grad]
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


class LossModule(torch.nn.Module):
    """The losses call the model's own methods (teacher_forced, flow_loss, Euler rollouts), not one forward();
    routing each loss through this forward lets DistributedDataParallel reduce the gradients of every parameter
    it touches."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, loss_fn, *args):
        return loss_fn(*args)


def distributed(module: torch.nn.Module):
    """``loss = run(loss_fn, *args)``: loss_fn(*args) through DistributedDataParallel when torchrun started
    several ranks (gloo on CPU, nccl on GPU), directly otherwise."""
    if dist_info()[1] == 1:
        return lambda loss_fn, *args: loss_fn(*args)
    return torch.nn.parallel.DistributedDataParallel(LossModule(module), find_unused_parameters=True)


def shard(n: int, epoch: int, seed: int) -> np.ndarray:
    """This rank's samples of an epoch: one permutation for all ranks, rank r takes every world-th from r (so
    per-rank batches of B / world make the same global batches as one process with batch B), cut to a multiple
    of the world size so that every rank runs the same number of steps."""
    rank, world = dist_info()
    order = np.random.default_rng(seed + epoch).permutation(n)
    return order[: len(order) - len(order) % world][rank::world]


def per_rank_batch(batch: int) -> int:
    world = dist_info()[1]
    if batch % world:
        raise ValueError(f"batch {batch} is the global batch: it must divide by the {world} ranks")
    return batch // world


class CsvLog:
    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", newline="")
        self._w = csv.writer(self._f)
        if path.stat().st_size == 0:
            self._w.writerow(["time", "stage", "step", "key", "value"])

    def log(self, stage, step, **kv):
        for k, v in kv.items():
            self._w.writerow([f"{time.time():.1f}", stage, step, k, f"{float(v):.6g}"])
        self._f.flush()


# ------------------------------------------------------------------ batches
# ------------------------------------------------------------------ stages
READING_PREFIXES = ("light_", "lead_head.", "junction_lead_head.")   # the heads grounded reasoning's text is from
PERCEPTION_PREFIXES = READING_PREFIXES + ("crossing_head.",)


def load_perception_heads(policy: SpanVLAPolicy, checkpoint: Path) -> None:
    """Take the perception heads (and their input standardisation) from another checkpoint's expert and freeze
    them: a grounded-reasoning model's bridges are made with their outputs, which must not change afterwards."""
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(checkpoint / "expert.safetensors").items() if k.startswith(PERCEPTION_PREFIXES)}
    if any(k.startswith("crossing_head.") for k in state) and not policy.cfg.crossing_perception:
        new_crossing_head(policy)   # its weights and input standardisation come with the others
    if any(k.startswith("junction_lead_head.") for k in state) and not policy.cfg.junction_lead_head:
        add_junction_lead_head(policy)
    missing = [k for k in policy.expert.state_dict() if k.startswith(PERCEPTION_PREFIXES) and k not in state]
    if missing or not state:
        raise SystemExit(f"--heads-from {checkpoint}: its expert lacks the perception heads this model needs {missing}")
    policy.expert.load_state_dict(state, strict=False)
    for p in perception_parameters(policy.expert):
        p.requires_grad_(False)


def perception_parameters(expert, prefixes: tuple[str, ...] = PERCEPTION_PREFIXES) -> list:
    return [p for name, p in expert.named_parameters() if name.startswith(prefixes)]


def supervised_epochs(module, samples, epochs, batch, lr, pct_start, log: CsvLog, tag, desc, batch_loss, seed=0,
                      bf16: bool = False):
    """AdamW + one-cycle LR over this rank's shard of each epoch; batch_loss(indices) -> scalar loss. ``bf16``:
    the forward passes run under bfloat16 autocast (weights and optimizer state stay float32)."""
    import contextlib

    from tqdm import tqdm

    device = next(module.parameters()).device.type

    module.train()
    run = distributed(module)
    batch = per_rank_batch(batch)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    total = epochs * math.ceil(len(shard(len(samples), 0, seed)) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(total, 1), pct_start=pct_start)
    bar = tqdm(total=total, desc=desc, disable=dist_info()[0] != 0)
    step = 0
    for ep in range(epochs):
        idx = shard(len(samples), ep, seed)
        for b0 in range(0, len(idx), batch):
            with torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = run(batch_loss, idx[b0:b0 + batch])
            optimizer_step(opt, module.parameters(), loss)
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.log(tag, step, loss=loss.item())
    module.eval()


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]   # the language model's attention (the vision tower's are
                                                          # named qkv / proj: it stays as it is)


def sft_reasoning(policy, samples, epochs, batch, lr, log: CsvLog, seed=0, light_weight: float = 1.0,
                  lora_rank: int = 0, bf16: bool = False, grad_checkpointing: bool = False):
    """SFT stage 1: reasoning cross-entropy. ``lora_rank > 0`` trains LoRA adapters (peft) on the language model's
    attention instead of every weight, then merges them, so the checkpoint stays a plain Hugging Face model (the
    way a Qwen2.5-VL-3B fine-tune fits one GPU). ``bf16``: bfloat16 autocast; ``grad_checkpointing``: the VLM's
    layers recompute their activations in the backward pass (transformers' gradient checkpointing) instead of
    keeping them: the memory of a 3B model's long multi-image sequences, for ~30 % more compute."""
    if grad_checkpointing:
        model = policy.reasoner.model
        model.gradient_checkpointing_enable()
        try:
            return sft_reasoning(policy, samples, epochs, batch, lr, log, seed, light_weight, lora_rank, bf16)
        finally:
            model.gradient_checkpointing_disable()
    weights = policy.reasoner.vocab_weights(light_token_weight(light_weight)) if light_weight != 1.0 else None
    if lora_rank:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        # in place (no PeftModel wrapper), so the reasoner's own calls into the model keep working
        model = inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                   target_modules=LORA_TARGETS), policy.reasoner.model)
        trainable = {n: p.requires_grad for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        try:
            sft_reasoning(policy, samples, epochs, batch, lr, log, seed, light_weight, bf16=bf16)
        finally:
            for name, mod in list(model.named_modules()):
                if isinstance(mod, LoraLayer):
                    mod.merge()
                    parent, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(parent), leaf, mod.get_base_layer())
            for n, p in model.named_parameters():
                p.requires_grad_(trainable.get(n, True))
            model.eval()
        return

    def batch_loss(ii):
        bs = [samples[i] for i in ii]
        loss, _ = policy.reasoner.teacher_forced([s.images for s in bs], prompts(policy, bs),
                                                 [s.meta["reasoning"] for s in bs], with_bridge=False,
                                                 vocab_weights=weights)
        return loss

    supervised_epochs(policy.reasoner.model, samples, epochs, batch, lr, 0.1, log, "sft1", "sft stage 1 (reasoning)",
                      batch_loss, seed, bf16=bf16)


@torch.no_grad()
def precompute_bridges(policy, samples, batch=16, text: str = "generated") -> list[BridgeSnapshot]:
    """Bridges the action expert trains on (VLM frozen). ``generated``: over the reasoning the VLM itself writes
    from the frames, exactly what the planner hands the expert at run time. ``reference``: teacher-forced over
    the dataset's reasoning text (the paper's setup; with a VLM whose text is not yet right this trains the expert
    on text it never sees at run time, e.g. lead-vehicle distances the generated text gets wrong)."""
    from tqdm import tqdm
    if text == "generated":
        return reason_all(policy, samples, desc="bridges (frozen VLM, generated reasoning)",
                          progress=dist_info()[0] == 0)[0]
    if text != "reference":
        raise ValueError(f"bridge text must be 'generated' or 'reference', got {text!r}")
    out = []
    for b0 in tqdm(range(0, len(samples), batch), desc="bridges (frozen VLM)", disable=dist_info()[0] != 0):
        bs = samples[b0:b0 + batch]
        _, br = policy.reasoner.teacher_forced([s.images for s in bs], prompts(policy, bs),
                                               [s.meta["reasoning"] for s in bs], with_bridge=True)
        out.extend(split_bridge(br))
    return out


def fit_perception_inputs(policy, samples, fronts: list[torch.Tensor]) -> None:
    """Input standardisation of the perception heads from the training frames' front tokens (one (1, F, N, D) per
    sample) and the tokens' image positions."""
    expert = policy.expert
    if policy.cfg.traffic_lights:
        labels = [light_label(s) for s in samples]
        at_light = [f for f, y in zip(fronts, labels) if y >= 0] or fronts
        expert.fit_light_normaliser(torch.cat([f[:, -1] for f in at_light]).float())
        if dist_info()[0] == 0:
            counts = {name: labels.count(i) for i, name in enumerate(LIGHT_STATES)}
            print(f"traffic-light head: {sum(counts.values())} samples with a stop line ahead {counts}")
    if policy.cfg.lead_perception:
        expert.lead_head.fit(torch.cat(fronts[::4]), policy.reasoner.front_token_rc)
        if dist_info()[0] == 0:
            t = lead_targets_tensor([s.meta.get("facts") for s in samples])
            print(f"lead head: {int((t[:, 0] > 0.5).sum())} of {int(torch.isfinite(t[:, 0]).sum())} labelled "
                  f"samples with a lead vehicle")


def front_tokens(policy, samples) -> list[torch.Tensor]:
    """The front camera's history-frame vision tokens of every sample, (1, F, N, D) each: the heads' input."""
    from tqdm import tqdm

    return [policy.reasoner.vision_tokens([s.images[i] for i in policy.reasoner.front_image_indices])[None]
            for s in tqdm(samples, desc="front tokens", disable=dist_info()[0] != 0)]


def crossing_views(policy, samples) -> list[torch.Tensor]:
    """Every camera's newest frames' vision tokens of every sample, (1, C * CROSSING_FRAMES, N, D) each: the
    crossing-traffic head's input."""
    from tqdm import tqdm

    return [policy.crossing_tokens(s.images) for s in tqdm(samples, desc="crossing views",
                                                            disable=dist_info()[0] != 0)]


def train_perception_heads(policy, samples, epochs: int, batch: int, lr: float, log: CsvLog, seed: int = 0,
                           fronts: list[torch.Tensor] | None = None, fit_inputs: bool = True,
                           crossing: tuple[list[torch.Tensor], torch.Tensor] | None = None,
                           prefixes: tuple[str, ...] = PERCEPTION_PREFIXES, lead_presence_weight: float = 1.0) -> None:
    """Perception heads first, on the front camera's vision tokens alone (no reasoning needed), then frozen: a
    grounded-reasoning model writes its training bridges' text from them. ``fit_inputs=False`` keeps the heads'
    input standardisation (continuing to train heads that are already fitted). ``crossing``: the crossing head's
    input per sample (crossing_views) and its targets (crossing_targets_tensor), for a model with one;
    ``prefixes``: which heads train (the others are neither read nor changed); ``lead_presence_weight``: the
    lead-present class's weight in the presence loss."""
    from tqdm import tqdm

    fronts = front_tokens(policy, samples) if fronts is None else fronts
    if fit_inputs:
        fit_perception_inputs(policy, samples, fronts)
    expert = policy.expert
    heads = perception_parameters(expert, prefixes)
    opt = torch.optim.AdamW(heads, lr=lr, weight_decay=0.01)
    run, batch = distributed(expert), per_rank_batch(batch)
    trains_crossing = crossing is not None and "crossing_head." in prefixes
    trains_lead = "lead_head." in prefixes or "junction_lead_head." in prefixes
    reads_ego = trains_lead or trains_crossing     # a light-only run may have label-only samples
    junction = junction_tensor(samples) if trains_lead else None   # once: a route projection per sample

    def batch_loss(ii):
        bs = [samples[i] for i in ii]
        front = torch.cat([fronts[i] for i in ii])
        ego = ego_tensor(policy, bs) if reads_ego else None
        light = expert.light_logits(front) if "light_" in prefixes else None       # None without the head
        lead = expert.lead_raw(front, ego, junction[torch.as_tensor(ii)]) if junction is not None else None
        loss = perception_loss(bs, light, lead, lead_presence_weight)
        if trains_crossing:
            raw = expert.crossing_raw(torch.cat([crossing[0][i] for i in ii]), ego)
            if raw is not None:
                loss = loss + expert.crossing_head.loss(raw, crossing[1][ii])
        return loss

    step = 0
    for ep in tqdm(range(epochs), desc="perception heads", disable=dist_info()[0] != 0):
        order = shard(len(samples), ep, seed)
        for b0 in range(0, len(order), batch):
            loss = run(batch_loss, order[b0:b0 + batch])
            optimizer_step(opt, heads, loss)
            step += 1
            log.log("heads", step, loss=loss.item())
    for p in heads:
        p.requires_grad_(False)


@torch.no_grad()
def head_readings(policy, samples, fronts: list[torch.Tensor], junction: torch.Tensor) -> list[tuple[int, bool]]:
    """What the heads read on each sample (``junction``: junction_tensor(samples)): (light class or -1, lead
    present)."""
    expert, out = policy.expert, []
    for s, f, j in zip(samples, fronts, junction):
        light = expert.light_logits(f)
        lead = expert.lead_raw(f, ego_tensor(policy, [s]), j)
        out.append((int(light.argmax(-1)) if light is not None else -1,
                    bool(lead[0, 0] > 0) if lead is not None else False))
    return out


def finetune_heads(a: TrainConfig, samples, log: CsvLog) -> int:
    """Continue training a finished checkpoint's perception heads on ``samples`` (e.g. DAgger frames of states its
    own driving reaches and its training never showed), everything else unchanged. The expert was trained on
    bridges written from the old heads' readings, so the run reports how many of the old data's readings change:
    where they do, SFT 2 should be run again on the new heads."""
    assert a.heads_finetune is not None
    policy = SpanVLAPolicy.from_pretrained(a.heads_finetune)
    if not (policy.cfg.traffic_lights or policy.cfg.lead_perception):
        raise SystemExit(f"--heads-finetune {a.heads_finetune}: the checkpoint has no perception heads")
    attach_routes(samples, scene_maps(samples))
    samples, dropped = drop_off_route_labels(samples)
    fronts = front_tokens(policy, samples)
    junction = junction_tensor(samples)
    before = head_readings(policy, samples, fronts, junction)
    prefixes: tuple[str, ...] = PERCEPTION_PREFIXES
    if a.finetune_heads:
        prefixes = tuple(HEAD_PREFIXES[h] for h in a.finetune_heads.split(","))
    crossing = None
    if a.crossing_perception or (policy.cfg.crossing_perception and "crossing_head." in prefixes):
        views = crossing_views(policy, samples)
        if not policy.cfg.crossing_perception:   # a new head: trained alone, the others stay as they are
            add_crossing_head(policy, views)
            prefixes = ("crossing_head.",)
        t = crossing_targets_tensor([s.meta for s in samples], policy.cfg.dt)   # once: geometry over every agent
        print(f"crossing head: {int((t[:, 0] > 0.5).sum())} of {int(torch.isfinite(t[:, 0]).sum())} labelled "
              f"samples with crossing traffic")
        crossing = (views, t)
    train_samples, train_fronts = samples, fronts
    if "junction_lead" in a.finetune_heads.split(",") and not policy.cfg.junction_lead_head:
        add_junction_lead_head(policy)   # named: a new head (the default, every head, means those it has)
    if policy.cfg.junction_lead_head and prefixes in (("junction_lead_head.",), ("lead_head.",)):
        # each lead head reads its own frames: the other head's would only pass through it, frozen
        keep = (junction == (prefixes == ("junction_lead_head.",))).tolist()
        train_samples = [s for s, k in zip(samples, keep) if k]
        train_fronts = [f for f, k in zip(fronts, keep) if k]
        print(f"{prefixes[0].rstrip('.')}: {len(train_samples)} of {len(samples)} samples "
              f"({int(junction.sum())} at a junction)")
    if a.signal_views:
        if not policy.cfg.traffic_lights:
            raise SystemExit(f"--signal-views: {a.heads_finetune} has no traffic-light head")
        lit = [i for i, s in enumerate(samples) if light_label(s) >= 0]
        rendered, rendered_fronts = signal_view_tokens(policy, parse_seeds(a.signal_views))
        print(f"traffic-light head: {len(lit)} samples with a stop line ahead + {len(rendered)} rendered views "
              f"{dict(Counter(v.meta['lights'][0.0] for v in rendered))}")
        train_samples = [samples[i] for i in lit] + rendered
        train_fronts = [fronts[i] for i in lit] + rendered_fronts
        prefixes = ("light_",)
    for p in perception_parameters(policy.expert, prefixes):
        p.requires_grad_(True)
    t0 = time.time()
    train_perception_heads(policy, train_samples, a.head_epochs, 64, a.head_lr, log, a.seed, train_fronts,
                           fit_inputs=False, crossing=crossing, prefixes=prefixes,
                           lead_presence_weight=a.lead_presence_weight)
    after = head_readings(policy, samples, fronts, junction)
    old = [i for i, s in enumerate(samples) if s.meta["kind"] != "dagger"]
    old_lit = [i for i in old if light_label(samples[i]) >= 0]
    light_changed = sum(before[i][0] != after[i][0] for i in old_lit)
    lead_changed = sum(before[i][1] != after[i][1] for i in old)
    print(f"perception heads fine-tuned ({dropped} off-route samples dropped): {time.time() - t0:.0f} s; readings "
          f"changed on the non-DAgger samples: light {light_changed} of {len(old_lit)}, lead presence "
          f"{lead_changed} of {len(old)}")
    if dist_info()[0] == 0:
        policy.save_pretrained(a.out / "sft")
    return 0


def finetune_encoder(a: TrainConfig, log: CsvLog) -> int:
    """A finished checkpoint with a look-invariant vision encoder (train.look_invariance), all else bit-identical."""
    from tqdm import tqdm

    from ..data.look_pairs import look_pairs
    from ..sim.scenarios import resolve
    from .look_invariance import distil_look_invariant_encoder

    assert a.encoder_finetune is not None
    policy = SpanVLAPolicy.from_pretrained(a.encoder_finetune)
    seeds = parse_seeds(a.look_seeds)
    if len(seeds) < 2:
        raise SystemExit(f"--look-seeds {a.look_seeds}: at least two seeds (the last tenth is held out)")
    n_held = max(1, len(seeds) // 10)
    scenarios = resolve(a.look_scenarios)
    pairs = list(tqdm(look_pairs(scenarios, seeds[:-n_held], a.look_every_s), desc="look pairs",
                      disable=dist_info()[0] != 0))
    held_out = list(look_pairs(scenarios, seeds[-n_held:], a.look_every_s))
    report = distil_look_invariant_encoder(policy, pairs, held_out, a.encoder_epochs, a.batch, a.encoder_lr, log,
                                           a.seed, salient_weight=a.look_salient_weight,
                                           head_weight=a.look_head_weight, default_weight=a.look_default_weight)
    if dist_info()[0] == 0:
        policy.save_pretrained(a.out / "sft")
        (a.out / "look_invariance.json").write_text(json.dumps(report, indent=1))
    return 0


def signal_view_tokens(policy, seeds: list[int]) -> tuple[list[Sample], list[torch.Tensor]]:
    """data.signal_views over the intersection scenarios on ``seeds``: label-carrying samples (meta only; the light
    head reads their tokens) and the front tokens of each view's frames."""
    from tqdm import tqdm

    from ..data.signal_views import signal_views

    cfg = policy.cfg
    scenarios = [name for name, sc in SCENARIOS.items() if sc.traffic_light]
    samples, fronts = [], []
    for view in tqdm(signal_views(scenarios, seeds, cfg.history_frames, cfg.history_dt, cfg.dt),
                     desc="signal views", disable=dist_info()[0] != 0):
        samples.append(Sample(view.meta, []))
        fronts.append(policy.reasoner.vision_tokens(view.front)[None])
    return samples, fronts


def add_junction_lead_head(policy) -> None:
    """A junction lead head on a finished checkpoint, starting as a copy of its lead head (weights and input
    standardisation): it is then trained on the frames at a junction only (model.route.at_junction)."""
    import copy

    if not (policy.cfg.lead_perception and policy.cfg.traffic_lights):
        raise SystemExit("a junction lead head needs a checkpoint with a lead head and the route's stop lines")
    policy.cfg.junction_lead_head = True
    policy.expert.junction_lead_head = copy.deepcopy(policy.expert.lead_head)


def new_crossing_head(policy) -> PooledTokenHead:
    """An untrained crossing-traffic head on ``policy``'s expert."""
    r = policy.reasoner
    policy.cfg.crossing_perception = True
    policy.expert.crossing_head = PooledTokenHead(r.front_token_dim, r.front_tokens,
                                                  len(policy.cfg.cameras) * CROSSING_FRAMES)
    return policy.expert.crossing_head


def add_crossing_head(policy, views: list[torch.Tensor]) -> None:
    """A fresh crossing-traffic head on a finished checkpoint, its input standardisation fitted on ``views``."""
    new_crossing_head(policy).fit(torch.cat(views[::4]), policy.reasoner.front_token_rc)


def perception_loss(bs, light_logits, lead_raw, lead_presence_weight: float = 1.0) -> torch.Tensor:
    """Auxiliary losses of the perception heads: light CE on samples with a stop line ahead, lead head losses."""
    loss = torch.zeros(())
    if light_logits is not None:
        labels = torch.tensor([light_label(s) for s in bs])
        if (labels >= 0).any():
            loss = loss + torch.nn.functional.cross_entropy(light_logits, labels, ignore_index=-100)
    if lead_raw is not None:
        loss = loss + PooledTokenHead.loss(lead_raw, lead_targets_tensor([s.meta.get("facts") for s in bs]),
                                           lead_presence_weight)
    return loss


def perception_digest(policy) -> str:
    """"" for a model whose reasoning does not depend on its heads, else a digest of the heads' weights."""
    return state_digest(policy.expert.state_dict(), READING_PREFIXES) if policy.cfg.grounded_reasoning else ""


def cached_bridges(policy, samples, text: str, cache: Path | None) -> list[BridgeSnapshot]:
    """precompute_bridges, kept in ``cache`` (a file) when given: experts trained on one frozen VLM (history vs
    noise start, with or without perception heads, with more data) share the bridges of the samples they share.
    Keyed by sample (episode bag, stamp); the whole cache is dropped when the VLM, the bridge text or the way the
    text is written (grounded reasoning) differ."""
    if cache is None:
        return precompute_bridges(policy, samples, text=text)

    def key(s):
        m = s.meta
        return (m["bag_path"], round(float(m["stamp"]), 3))

    header = dict(vlm=vlm_digest(policy), text=text, grounded=perception_digest(policy))
    stored: dict = {}
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved.get("header") == header:
            stored = saved["bridges"]
        else:
            print(f"bridges: {cache} is for another VLM or reasoning text: recomputing")
    todo = [s for s in samples if key(s) not in stored]
    print(f"bridges: {len(samples) - len(todo)} from {cache}, {len(todo)} to compute")
    if todo:
        for s, b in zip(todo, precompute_bridges(policy, todo, text=text)):
            stored[key(s)] = b
        if dist_info()[0] == 0:
            torch.save(dict(header=header, bridges=stored), cache)
    return [stored[key(s)] for s in samples]


def sft_flow(policy, samples, bridges, epochs, batch, lr, log: CsvLog, seed=0, tag="sft2"):
    """Flow matching; a model with perception heads also trains them (light CE on the samples with a stop line
    ahead, lead vehicle presence / gap / closing speed; the flow reads their outputs detached, so the heads stay
    plain perception models supervised by the simulator's truth) unless they are frozen: a grounded-reasoning
    model's (trained first, or taken with --heads-from) and an expert fine-tuned on a finished checkpoint's."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    heads_frozen = not any(p.requires_grad for p in perception_parameters(policy.expert))
    if not heads_frozen:
        fit_perception_inputs(policy, samples, [b.front_features for b in bridges])
    expert = policy.expert
    junction = junction_tensor(samples)   # once: a route projection per sample

    def batch_loss(ii):
        bs = [samples[i] for i in ii]
        a = torch.from_numpy(np.stack([s.future for s in bs]))
        br = collate_bridges([bridges[i] for i in ii])
        ego = ego_tensor(policy, bs, policy.cfg.route_dropout, rng)
        # once per batch, not per flow step
        light, lead = expert.light_logits(br), expert.lead_raw(br, ego, junction[torch.as_tensor(ii)])
        loss = expert.flow_loss(br, a, his_tensor(policy, bs), ego, generator=gen,
                                percept=expert.percept_from(light, lead))
        if heads_frozen:
            return loss
        return loss + perception_loss(bs, light, lead)

    supervised_epochs(policy.expert, samples, epochs, batch, lr, 0.05, log, tag, f"{tag} (flow matching)",
                      batch_loss, seed)


# ------------------------------------------------------------------ GRPO
def rewards(sample: Sample, trajs: np.ndarray, scene, w_neg, w_rec, l_cot, use_neg, use_rec, metric: str = "PDMS"):
    """Per trajectory: PDMS - w_N * closeness to negatives + w_R * closeness to recovery - l_C * reasoning penalty.
    ``metric="EPDMS"`` uses the extended score instead, whose traffic-light compliance (TLC) and driving-direction
    terms PDMS leaves out: with PDMS a plan through a red light scores as well as one that stops.

    Closeness is exp(-mean L2 distance / 2 m), so a plan within a metre or two of a known failure costs up to w_N
    and one that follows the expert's way back from a drift earns up to w_R."""
    m = sample.meta
    negs = [np.asarray(n["traj"], np.float32) for n in m["negatives"]]
    r_cot = min(1.0, len(m["reasoning"].split()) / 60.0)   # longer than ~60 words is penalised
    out = []
    for tr in trajs:
        r = getattr(score_plan(sample, tr, scene), metric)
        if use_neg and negs:
            d = min(np.linalg.norm(tr[:, :2] - n[:, :2], axis=1).mean() for n in negs)
            r -= w_neg * math.exp(-d / 2.0)
        if use_rec and m["kind"] == "recovery":
            d = np.linalg.norm(tr[:, :2] - sample.future[:, :2], axis=1).mean()
            r += w_rec * math.exp(-d / 2.0)
        out.append(r - l_cot * r_cot)
    return np.array(out)


def grpo(policy, ref_expert, samples, bridges, scenes, iters, batch, group, lr, beta, step_std, log: CsvLog,
         tag, use_neg, use_rec, w_neg=0.5, w_rec=0.5, l_cot=0.05, seed=0, metric="PDMS"):
    expert = policy.expert
    opt = torch.optim.AdamW(expert.parameters(), lr=lr)
    rank, world = dist_info()
    gen = torch.Generator().manual_seed(seed + rank)   # each rank rolls out its own groups
    rng = np.random.default_rng(seed)                  # the same draw of samples on every rank
    run = distributed(expert)
    from tqdm import tqdm
    for it in tqdm(range(iters), desc=f"{tag} (GRPO)", disable=rank != 0):
        ii = rng.choice(len(samples), size=batch, replace=False)[rank::world]   # batch is global
        loss, R, kl = run(_grpo_loss, policy, ref_expert, [samples[i] for i in ii], [bridges[i] for i in ii], scenes,
                          group, gen, step_std, beta, (w_neg, w_rec, l_cot, use_neg, use_rec, metric))
        optimizer_step(opt, expert.parameters(), loss)
        log.log(tag, it, loss=loss.item(), reward=R.mean(), kl=kl.mean().item())
    expert.eval()


def _grpo_loss(policy, ref_expert, bs, bridges, scenes, group, gen, step_std, beta, reward_args):
    """One GRPO step's loss on these samples: ``group`` stochastic Euler rollouts each, group-normalised rewards as
    advantages, KL to the SFT reference. Returns (loss, rewards, per-rollout KL)."""
    expert, steps, batch = policy.expert, policy.cfg.flow_steps, len(bs)
    br = collate_bridges(bridges).repeat_interleave(group)
    a_his = his_tensor(policy, bs).repeat_interleave(group, 0)
    ego = ego_tensor(policy, bs).repeat_interleave(group, 0)
    # stochastic Euler rollouts of the expert's own integrator: log-probs under the current expert, KL to the SFT one
    expert.train()
    out, logp, kl = expert.sample(br, a_his, ego, steps, generator=gen, step_std=step_std, return_log_prob=True,
                                  reference=ref_expert)
    trajs = out.detach().numpy()
    R = np.concatenate([rewards(s, trajs[j * group:(j + 1) * group], scenes[(s.meta["scenario"], s.meta["seed"])],
                                *reward_args) for j, s in enumerate(bs)])
    Rg = R.reshape(batch, group)
    adv = (Rg - Rg.mean(1, keepdims=True)) / (Rg.std(1, keepdims=True) + 1e-4)
    adv_t = torch.from_numpy(adv.reshape(-1)).float()
    per_path = steps * out[0].numel()
    loss = -(adv_t * logp).mean() / per_path + beta * kl.mean() / per_path
    return loss, R, kl


def build_initial(samples, flow_init: str, seed: int, route: bool = True, lights: bool = False,
                  lead: bool = False, light_frames: int = 1) -> SpanVLAPolicy:
    from ..model.corpus import tokenizer_corpus
    from ..model.tokenizer import train_tokenizer

    cfg = SpanVLAConfig(flow_init=flow_init, traffic_lights=route and lights, lead_perception=lead,
                        light_frames=light_frames if route and lights else 1,
                        **({} if route else {"route_lookahead_m": ()}))  # type: ignore[arg-type]
    corpus = list(tokenizer_corpus(cfg, seed=seed)) + [s.meta["reasoning"] for s in samples]
    tok = train_tokenizer(corpus)
    return SpanVLAPolicy.build(cfg, tok, preset="tiny", seed=seed)


def fresh_expert(policy: SpanVLAPolicy, flow_init: str, seed: int, route: bool = True,
                 lights: bool = False, lead: bool = False, grounded: bool = False,
                 light_frames: int = 1) -> SpanVLAPolicy:
    """Same VLM, a newly initialised action expert with the given flow start (for the noise-start ablation)."""
    policy.cfg.flow_init = flow_init
    policy.cfg.light_frames = light_frames
    policy.cfg.lead_perception = lead
    policy.cfg.grounded_reasoning = grounded
    policy.cfg.route_lookahead_m = ROUTE_LOOKAHEAD_M if route else ()
    policy.cfg.traffic_lights = route and lights
    policy.cfg.ego_dim = ego_dim_for(policy.cfg.commands, policy.cfg.route_lookahead_m, policy.cfg.traffic_lights)
    policy.cfg.expert_sees_accel = SpanVLAConfig.expert_sees_accel
    torch.manual_seed(seed + 1)
    policy.expert = SpanVLAPolicy.make_expert(policy.cfg, policy.reasoner).eval()
    return policy


def main(argv=None) -> int:
    return train(TrainConfig.from_args(argv))


def train(a: TrainConfig) -> int:
    """The whole recipe for one config: SFT 1 (or a VLM taken over), perception heads, SFT 2, GRPO branches."""
    a.check()
    from ..config import set_torch_threads

    set_torch_threads(a.threads)
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    a.save(a.out / "train_config.json")
    log = CsvLog(a.out / "train_log.csv")
    if a.encoder_finetune:
        return finetune_encoder(a, log)
    cams = SpanVLAConfig().cameras
    samples = [s for d in a.data for s in load_samples(d, cams, limit=a.limit or None)]
    pos = [s for s in samples if s.meta["kind"] == "positive"]
    print(f"{len(samples)} samples {dict(Counter(s.meta['kind'] for s in samples))}")
    if a.sft_scenarios:
        keep = set(a.sft_scenarios.split(","))
        pos = [s for s in pos if s.meta["scenario"] in keep]
        if not pos:
            raise SystemExit(f"--sft-scenarios {a.sft_scenarios}: no positive samples of those scenarios in "
                             f"{', '.join(map(str, a.data))}")
        print(f"SFT stage 1 on {len(pos)} positives of {a.sft_scenarios}")
    rank = dist_info()[0]
    if a.heads_finetune:
        return finetune_heads(a, samples, log)

    def done(stage):
        return (a.out / stage / "spanvla.json").is_file()

    todo = [st for st in (STAGES[:1] if a.skip_grpo else STAGES) if not done(st)]
    if not todo:
        print(f"resume: loaded finished stage sft; stage {STAGES[-1]} already finished: nothing to train")
        return 0
    if done("sft"):
        policy = SpanVLAPolicy.from_pretrained(a.out / "sft")
        print("resume: loaded finished stage sft")
    elif a.expert_finetune:
        policy = SpanVLAPolicy.from_pretrained(a.expert_finetune)
        for p in perception_parameters(policy.expert):
            p.requires_grad_(False)
        print(f"SFT stage 1 and the perception heads skipped: {a.expert_finetune}'s VLM and expert, the expert "
              f"fine-tuned")
    elif a.vlm_from:
        policy = fresh_expert(SpanVLAPolicy.from_pretrained(a.vlm_from), a.flow_init, a.seed,
                              route=not a.no_route, lights=a.traffic_lights, lead=a.lead_perception,
                              grounded=a.grounded_reasoning, light_frames=a.light_frames)
        if a.heads_from:
            load_perception_heads(policy, a.heads_from)
        if a.more_sft_epochs:
            t0 = time.time()
            sft_reasoning(policy, pos, a.more_sft_epochs, a.batch, a.sft_lr or 1e-3, log, a.seed + 1, a.light_weight,
                          a.lora_rank, a.bf16, a.grad_checkpointing)
            print(f"VLM from {a.vlm_from}, SFT stage 1 continued {a.more_sft_epochs} epochs: {time.time() - t0:.0f} s; "
                  f"fresh expert (flow_init={a.flow_init})")
        else:
            print(f"SFT stage 1 skipped: VLM from {a.vlm_from}, fresh expert (flow_init={a.flow_init})")
    else:
        policy = build_initial(samples, a.flow_init, a.seed, route=not a.no_route, lights=a.traffic_lights,
                               lead=a.lead_perception, light_frames=a.light_frames)
        t0 = time.time()
        sft_reasoning(policy, pos, a.sft_epochs, a.batch, a.sft_lr or 2e-3, log, a.seed, a.light_weight, a.lora_rank,
                      a.bf16, a.grad_checkpointing)
        print(f"sft stage 1: {time.time() - t0:.0f} s")
    scenes = scene_maps(samples) if policy.uses_route or not a.skip_grpo else {}   # route input, GRPO rewards
    if policy.uses_route:
        attach_routes(samples, scenes)
        samples, dropped = drop_off_route_labels(samples)
        print(f"route: {dropped} samples dropped, their future leaves the route they are given")
    if policy.cfg.grounded_reasoning and not (a.heads_from or a.expert_finetune) and not done("sft"):
        t0 = time.time()
        train_perception_heads(policy, samples, a.head_epochs, 64, 1e-3, log, a.seed,
                               lead_presence_weight=a.lead_presence_weight)
        print(f"perception heads (then frozen): {time.time() - t0:.0f} s")
    bridges = cached_bridges(policy, samples, a.bridge_text, a.bridge_cache)
    if a.signal_labels == "stop":
        print(f"signal stops: {relabel_signal_stops(samples)} futures relabelled to stop before the line")
    if not done("sft"):
        t0 = time.time()
        # stage 2 trains on positives and recovery alike: both are the expert's behaviour
        sft_flow(policy, samples, bridges, a.flow_epochs, a.batch, a.flow_lr, log, a.seed)
        print(f"sft stage 2: {time.time() - t0:.0f} s")
        if rank == 0:
            policy.save_pretrained(a.out / "sft")
    if a.skip_grpo:
        return 0
    ref = copy.deepcopy(policy.expert).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    sft_state = copy.deepcopy(policy.expert.state_dict())
    pos_idx = [i for i, s in enumerate(samples) if s.meta["kind"] == "positive"]
    all_idx = list(range(len(samples)))

    def run_stage(name, start_state, use_neg, use_rec, idx, seed):
        if done(name):
            print(f"resume: stage {name} already finished")
            return SpanVLAPolicy.from_pretrained(a.out / name).expert.state_dict()
        policy.expert.load_state_dict(start_state)
        sub, sub_b = [samples[i] for i in idx], [bridges[i] for i in idx]
        t0 = time.time()
        grpo(policy, ref, sub, sub_b, scenes, a.grpo_iters, min(a.batch, len(sub)), a.group, a.grpo_lr,
             a.grpo_beta, a.grpo_std, log, name, use_neg, use_rec, seed=seed, metric=a.grpo_reward)
        print(f"{name}: {time.time() - t0:.0f} s")
        if rank == 0:
            policy.save_pretrained(a.out / name)
        return copy.deepcopy(policy.expert.state_dict())

    # Paper's shape: a positive-only warm-up, then the same number of further iterations three ways, so the
    # rows (c) positive only, (d) + negatives, (e) + negatives + recovery differ only in what they add.
    warm = run_stage("grpo_warmup", sft_state, False, False, pos_idx, a.seed)
    for name, use_neg, use_rec, idx in (("grpo_pos", False, False, pos_idx), ("grpo_neg", True, False, pos_idx),
                                        ("grpo_rec", True, True, all_idx)):
        run_stage(name, warm, use_neg, use_rec, idx, a.seed + 1)
    (a.out / "stages.json").write_text(json.dumps(list(STAGES)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
