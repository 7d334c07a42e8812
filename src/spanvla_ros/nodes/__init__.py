"""ROS 2 nodes: thin wrappers that move messages in and out of the ROS-free core."""
