"""Sensor buffering (ROS-free): camera frame history and ego history in the form the model reads."""
