"""ROS-free driving world: simulator backends (highway-env, CARLA), camera rendering, tracking control."""
