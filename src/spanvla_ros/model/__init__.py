"""SpanVLA model core (ROS-free): VLM reasoner, sparse-KV bridge, flow-matching action expert, AR baseline."""
from .bridge import BridgeSnapshot, LatestBridge, bridge_layer_ids
from .config import SpanVLAConfig
from .errors import CheckpointError

__all__ = ["BridgeSnapshot", "LatestBridge", "bridge_layer_ids", "SpanVLAConfig", "CheckpointError"]
