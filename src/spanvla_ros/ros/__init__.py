"""ROS 2 layer: message conversions and QoS. Imports rclpy/message packages; the core never imports this."""
