"""ROS-free training: SFT (reasoning, then flow-matching action expert) and GRPO post-training."""
