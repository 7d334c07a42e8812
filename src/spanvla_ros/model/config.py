"""SpanVLA configuration: what the reasoner sees and how the action expert plans. Saved as spanvla.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .route import STOP_FEATURES, feature_dim

COMMANDS = ("follow lane", "turn left", "turn right", "go straight")
CAMERAS = ("front", "front_left", "front_right")
# arc lengths (m) ahead of the ego's projection on the route at which the expert sees the route
ROUTE_LOOKAHEAD_M = (4.0, 8.0, 12.0, 18.0, 25.0, 35.0, 50.0, 70.0)


LIGHT_STATES = ("green", "yellow", "red")


def ego_dim_for(commands, route_lookahead_m, traffic_lights: bool = False) -> int:
    """speed, acceleration, yaw rate, command one-hot, then the route features (none without a lookahead), then
    the next stop line (distance, validity: the last entry) for a model with traffic-light input."""
    return (3 + len(commands) + (feature_dim(route_lookahead_m) if route_lookahead_m else 0)
            + (STOP_FEATURES if traffic_lights else 0))


@dataclass
class SpanVLAConfig:
    cameras: tuple[str, ...] = CAMERAS
    history_frames: int = 4            # per camera, oldest first
    history_dt: float = 0.5            # 2 Hz history
    image_height: int = 112            # frames are resized to this before the VLM's own processor
    image_width: int = 196
    past_poses: int = 4                # past ego poses in the prompt (and for the history initialisation)
    horizon: int = 8                   # future poses
    dt: float = 0.5                    # spacing of future poses (s)
    action_dim: int = 4                # x, y, heading, speed in the ego frame at the current time
    action_scale: tuple[float, ...] = (20.0, 5.0, 0.5, 10.0)  # normalisation of (x, y, heading, speed)
    bridge_layer_stride: int = 2       # KV of every k-th VLM layer feeds the expert
    expert_hidden: int = 128
    expert_mlp: int = 256
    flow_steps: int = 5
    flow_init: str = "history"         # "history" (SpanVLA) or "noise" (ablation)
    history_noise_std: float = 0.05    # noise on a_his during training, in normalised units
    max_new_tokens: int = 40
    action_token: str = "<|action|>"
    commands: tuple[str, ...] = COMMANDS
    route_lookahead_m: tuple[float, ...] = ROUTE_LOOKAHEAD_M   # () = no route input (checkpoints before it)
    route_dropout: float = 0.15        # training: share of samples planned without the route
    # The expert is not given the ego's acceleration (it stays in the reasoner's prompt): given it, the expert
    # learns to continue whatever the ego is doing (the copycat problem of behaviour cloning) and in closed loop
    # a small deceleration compounds into a stop on an empty road. The input slot stays, held at zero.
    expert_sees_accel: bool = False
    # Traffic lights (`spanvla-train --traffic-lights`; on in the shipped default's spanvla.json, off for
    # configs saved before it existed): the route's stop lines in the expert's conditioning, and a traffic-light
    # head on the VLM's vision tokens of the newest front frame whose (detached) colour probabilities condition
    # the expert when a stop line is ahead; the head is trained with an auxiliary cross-entropy in SFT stage 2.
    # Needs the route input.
    traffic_lights: bool = False
    # Lead vehicle perception (`spanvla-train --lead-perception`): a head on the front camera's history-frame vision
    # tokens gives P(lead), gap and closing speed (model.perception), detached, to the expert's conditioning.
    light_frames: int = 1              # front frames the traffic-light head reads (newest last; 1 before it existed)
    lead_perception: bool = False
    # Crossing traffic (`spanvla-train --heads-finetune --crossing-perception`): a head on every camera's newest
    # frames says whether another vehicle will be on the ego's path within the horizon (model.perception); read by
    # the safety envelope only (yield at the stop line), so adding it leaves the flow as it was.
    crossing_perception: bool = False
    # A second lead head for junctions (`spanvla-train --heads-finetune --finetune-heads junction_lead`): read instead
    # of the lead head while a stop line of the route is near (model.route.at_junction). Junction frames (oncoming
    # cars, cars beside a turn, leads receding through the box) and lane changes on the open road (a car moving in
    # from the next lane) pull one head two ways; the map says which of the two situations the car is in.
    junction_lead_head: bool = False
    # Grounded reasoning: the reasoning text starts with what the perception heads read from the frames (the light
    # before a stop line, the lead vehicle), in the text's own phrasing, and the VLM writes the rest from there, so
    # text, bridge and plan agree with what was perceived. The expert is trained on bridges made the same way.
    grounded_reasoning: bool = False
    ego_dim: int = 0                   # derived from commands + route lookahead + traffic lights (0 = derive)
    vlm_path: str = "vlm"              # relative to the checkpoint directory, or absolute (a Qwen2.5-VL-3B fine-tune)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 1 <= self.light_frames <= self.history_frames:
            raise ValueError(f"light_frames must be 1..history_frames ({self.history_frames}), got {self.light_frames}")
        if self.grounded_reasoning and not self.lead_perception:
            raise ValueError("grounded_reasoning needs the perception heads (lead_perception)")
        if self.junction_lead_head and not (self.lead_perception and self.traffic_lights):
            raise ValueError("junction_lead_head needs the lead head and the route's stop lines (traffic_lights)")
        if self.traffic_lights and not self.route_lookahead_m:
            raise ValueError("traffic_lights needs the route input (stop lines are measured along the route)")
        expected = ego_dim_for(self.commands, self.route_lookahead_m, self.traffic_lights)
        if not self.ego_dim:
            self.ego_dim = expected
        elif self.ego_dim != expected:
            raise ValueError(f"ego_dim {self.ego_dim} does not match commands + route lookahead + traffic lights "
                             f"({expected})")

    @property
    def num_images(self) -> int:
        return len(self.cameras) * self.history_frames

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SpanVLAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SpanVLA config keys: {sorted(unknown)}")
        d = dict(d)
        d.setdefault("route_lookahead_m", ())   # saved before the route input existed
        d.setdefault("expert_sees_accel", True)
        d.setdefault("traffic_lights", False)     # saved before the traffic-light input existed
        d.setdefault("lead_perception", False)
        d.setdefault("crossing_perception", False)
        d.setdefault("junction_lead_head", False)
        d.setdefault("light_frames", 1)
        d.setdefault("grounded_reasoning", False)
        for k in ("cameras", "action_scale", "commands", "route_lookahead_m"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> SpanVLAConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
