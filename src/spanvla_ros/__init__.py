"""spanvla_ros: SpanVLA-style driving VLA for ROS 2.

ROS-free core: ``model`` (reasoner, bridge, action expert), ``sim``, ``data``, ``eval``.
ROS layer: ``ros`` (conversions) and ``nodes``; they import rclpy, the core never does.
The generated interfaces live in ``spanvla_ros.msg`` once the package is built with colcon.
"""
__version__ = "0.1.0"
