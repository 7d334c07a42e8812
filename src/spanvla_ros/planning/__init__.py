"""ROS-free planning logic shared by the planner node, the closed loop and replay."""
