"""ROS-free evaluation: PDM-style scoring, open-loop metrics, closed-loop driving scores."""
