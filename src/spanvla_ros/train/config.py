"""spanvla-train's settings as one dataclass: the command line is generated from its fields (name, type, default,
help), the run writes it next to its checkpoints (train_config.json), and code that trains calls it directly."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --finetune-heads names: weights
HEAD_PREFIXES = dict(light="light_", lead="lead_head.", junction_lead="junction_lead_head.", crossing="crossing_head.")


def _opt(default: Any, help: str = "", choices: tuple | None = None) -> Any:
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class TrainConfig:
    data: list[Path] = field(default_factory=list, metadata=dict(
        help="spanvla-generate-data output(s); several are concatenated (e.g. extra intersection seeds)"))
    out: Path = _opt(Path(), "run directory: a checkpoint per stage, train_log.csv, train_config.json")
    sft_epochs: int = _opt(10, "SFT stage 1 (reasoning cross-entropy) epochs")
    lora_rank: int = _opt(0, "SFT stage 1 trains LoRA adapters of this rank (peft) on the VLM's attention, then "
                             "merges them (0: full fine-tune)")
    bf16: bool = _opt(False, "SFT stage 1 forward passes under bfloat16 autocast (GPUs; CPUs with bf16)")
    grad_checkpointing: bool = _opt(False, "SFT stage 1: the VLM recomputes activations in the backward pass "
                                           "(memory for a 3B model's long multi-image sequences)")
    flow_epochs: int = _opt(30, "SFT stage 2 (flow matching) epochs")
    flow_lr: float = _opt(1e-3, "SFT stage 2 peak LR")
    grpo_iters: int = _opt(40, "per GRPO stage (warm-up and each branch)")
    grpo_lr: float = _opt(5e-5)
    grpo_std: float = _opt(0.05, "per-Euler-step std (normalised units)")
    grpo_beta: float = _opt(0.1, "KL weight to the SFT reference")
    grpo_reward: str = _opt("PDMS", "driving score in the GRPO reward (EPDMS adds traffic-light and direction "
                                    "compliance)", ("PDMS", "EPDMS"))
    batch: int = _opt(16)
    group: int = _opt(8, "GRPO rollouts per scene")
    flow_init: str = _opt("history", "where the flow starts: the history initialisation or noise",
                          ("history", "noise"))
    vlm_from: Path | None = _opt(None, "reuse this finished checkpoint's VLM (skip SFT stage 1) with a fresh expert")
    bridge_text: str = _opt("generated", "reasoning the expert's training bridges are computed over (see "
                                         "precompute_bridges)", ("generated", "reference"))
    no_route: bool = _opt(False, "train the expert without the route input (cameras + command only)")
    traffic_lights: bool = _opt(False, "expert with the route's stop lines and a traffic-light head on the VLM's "
                                       "front-frame vision tokens (model.expert; needs the route input)")
    light_frames: int = _opt(4, "front frames (newest last, 2 Hz) the traffic-light head reads: near the stop line "
                                "the signal leaves the camera's view and an earlier frame still shows it")
    lead_perception: bool = _opt(False, "expert with a lead-vehicle head (presence, gap, closing speed) on the front "
                                        "camera's history-frame vision tokens, supervised by the simulator")
    grounded_reasoning: bool = _opt(False, "the reasoning text starts with what the perception heads see; needs "
                                           "--lead-perception --traffic-lights --vlm-from; the heads are trained "
                                           "first (frozen) or taken with --heads-from")
    heads_from: Path | None = _opt(None, "take the trained perception heads from this checkpoint (frozen)")
    head_epochs: int = _opt(30, "--grounded-reasoning without --heads-from (or --heads-finetune): epochs of the "
                                "perception heads")
    head_lr: float = _opt(1e-4, "--heads-finetune: peak LR (training heads from scratch uses 1e-3)")
    lead_presence_weight: float = _opt(1.0, "weight of the lead-present class in the lead heads' presence loss "
                                            "(> 1: a missed lead costs more than a false one)")
    expert_finetune: Path | None = _opt(None, "continue SFT stage 2 of this finished checkpoint's action expert on "
                                              "--data (e.g. DAgger frames of states its own driving reaches), its VLM "
                                              "and perception heads unchanged; saved as OUT/sft")
    heads_finetune: Path | None = _opt(None, "continue training this finished checkpoint's perception heads on "
                                             "--data, nothing else (e.g. DAgger frames of states its own driving "
                                             "reaches); saved as OUT/sft")
    encoder_finetune: Path | None = _opt(None, "make this finished checkpoint's vision encoder look-invariant, "
                                               "nothing else changed (train.look_invariance: distilled from itself "
                                               "at the default look over --look-scenarios at drawn looks); needs no "
                                               "--data; saved as OUT/sft")
    look_scenarios: str = _opt("all", "--encoder-finetune: the scenes (comma list of 'all', built-in names, YAML "
                                      "scenario files), each seen at a look drawn per seed")
    look_seeds: str = _opt("900:930", "--encoder-finetune: the episodes' seeds (the last tenth held out to measure)")
    look_every_s: float = _opt(1.0, "--encoder-finetune: a pair of renders every this many seconds of an episode")
    encoder_epochs: int = _opt(3, "--encoder-finetune epochs")
    encoder_lr: float = _opt(3e-4, "--encoder-finetune peak LR")
    look_salient_weight: float = _opt(0.0, "--encoder-finetune: weight of a second term, the token error on each "
                                           "frame's most salient tokens (cars, signals, lane edges: those farthest "
                                           "from the frame's median token), beside the mean over all tokens")
    look_head_weight: float = _opt(0.0, "--encoder-finetune: weight of a term on the frozen perception heads' readings "
                                        "of each view (what the lead, junction lead, light and crossing heads take "
                                        "from it), beside the token error: the heads then read a drawn look as the "
                                        "default, and the default as before")
    look_default_weight: float = _opt(1.0, "--encoder-finetune: weight of the default look's error against the drawn "
                                           "look's in every term (> 1 holds what the heads read at the default look "
                                           "tighter than it pulls the drawn look to it)")
    finetune_heads: str = _opt("", "with --heads-finetune: train only these heads (comma list of light, lead, "
                                   "junction_lead, crossing; default: every head the checkpoint has); the others stay "
                                   "bit-identical. junction_lead alone adds a junction lead head to a checkpoint "
                                   "without one (a copy of its lead head) and trains it on the frames at a junction")
    crossing_perception: bool = _opt(False, "with --heads-finetune: add a crossing-traffic head (every camera's "
                                            "newest frames; read by the safety envelope only) and train it alone")
    signal_views: str = _opt("", "with --heads-finetune: retrain the traffic-light head alone on the data's "
                                 "stop-line frames plus views of these seeds' intersections rendered with the signal "
                                 "in every colour (data.signal_views; e.g. 0:60): the head reads the colour, not "
                                 "where the car stands")
    signal_labels: str = _opt("stop", "at a light the ego must stop for: teach stopping before the line (a "
                                      "camera-only planner cannot know the phase timing) or keep the expert's "
                                      "logged future (data.samples)", ("stop", "logged"))
    more_sft_epochs: int = _opt(0, "with --vlm-from: continue SFT stage 1 on that VLM for this many epochs first")
    light_weight: float = _opt(1.0, "SFT stage 1: CE weight of the light-colour words "
                                    "(scene_text.light_token_weight)")
    sft_lr: float = _opt(0.0, "SFT stage 1 peak LR (0: 2e-3 from scratch, 1e-3 with --more-sft-epochs)")
    sft_scenarios: str = _opt("", "SFT stage 1 only on these scenarios' positives (comma list; default all)")
    bridge_cache: Path | None = _opt(None, "file to keep the frozen VLM's training bridges in (reused by runs on the "
                                           "same VLM and data)")
    skip_grpo: bool = _opt(False, "stop after SFT")
    limit: int = _opt(0, "at most this many samples per dataset (0: all)")
    threads: int = _opt(0, "torch threads (0: one per CPU; give each of several processes on one machine its share)")
    seed: int = _opt(0)

    def check(self) -> None:
        """Combinations that cannot train, refused before anything runs."""
        if self.encoder_finetune:
            if self.data or self.vlm_from or self.heads_from or self.heads_finetune or self.expert_finetune:
                raise ValueError("--encoder-finetune renders its own views and changes the encoder alone: no --data, "
                                 "--vlm-from, --heads-from, --heads-finetune or --expert-finetune")
            return
        if not self.data:
            raise ValueError("--data: at least one dataset directory")
        if self.traffic_lights and self.no_route:
            raise ValueError("--traffic-lights needs the route input (stop lines are measured along the route)")
        if self.heads_finetune and (self.vlm_from or self.heads_from):
            raise ValueError("--heads-finetune starts from a finished checkpoint: no --vlm-from / --heads-from")
        if self.expert_finetune and (self.vlm_from or self.heads_from or self.heads_finetune):
            raise ValueError("--expert-finetune starts from a finished checkpoint and keeps its VLM and heads: no "
                             "--vlm-from / --heads-from / --heads-finetune")
        if self.crossing_perception and not self.heads_finetune:
            raise ValueError("--crossing-perception is added to a finished checkpoint: use it with --heads-finetune")
        if self.signal_views and not self.heads_finetune:
            raise ValueError("--signal-views retrains a finished checkpoint's light head: use it with "
                             "--heads-finetune")
        if self.finetune_heads and not self.heads_finetune:
            raise ValueError("--finetune-heads chooses the heads --heads-finetune trains: use it with --heads-finetune")
        if unknown := set(filter(None, self.finetune_heads.split(","))) - set(HEAD_PREFIXES):
            raise ValueError(f"--finetune-heads: no head {sorted(unknown)} ({', '.join(HEAD_PREFIXES)})")
        if self.finetune_heads and (self.signal_views or self.crossing_perception):
            raise ValueError("--signal-views and --crossing-perception choose their head: no --finetune-heads")
        if self.signal_views and self.crossing_perception:
            raise ValueError("--signal-views and --crossing-perception each train one head alone: run "
                             "them one after the other")
        if self.grounded_reasoning and not (self.lead_perception and self.traffic_lights and self.vlm_from):
            raise ValueError("--grounded-reasoning needs --lead-perception --traffic-lights and --vlm-from (the "
                             "text is written from the perception heads, trained first or taken with --heads-from)")

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(description="spanvla-train: SFT, then GRPO of the action expert")
        for f in dataclasses.fields(cls):
            flag, meta = "--" + f.name.replace("_", "-"), f.metadata
            typ = str(f.type)
            if typ == "bool":
                ap.add_argument(flag, action="store_true", help=meta.get("help"))
            elif typ.startswith("list"):
                ap.add_argument(flag, type=Path, nargs="+", default=[], help=meta.get("help"))
            else:
                conv = {"int": int, "float": float, "str": str}.get(typ, Path)
                ap.add_argument(flag, type=conv, default=f.default, choices=meta.get("choices"),
                                required=f.name == "out", help=meta.get("help"))
        return ap

    @classmethod
    def from_args(cls, argv=None) -> TrainConfig:
        a = cls.parser().parse_args(argv)
        cfg = cls(**vars(a))
        try:
            cfg.check()
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        return cfg

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({k: (str(v) if isinstance(v, Path) else [str(x) for x in v]
                                        if isinstance(v, list) else v)
                                    for k, v in dataclasses.asdict(self).items()}, indent=1))
