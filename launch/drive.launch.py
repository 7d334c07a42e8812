"""ros2 launch spanvla_ros drive.launch.py [params_file:=...] [rviz:=true] [checkpoint:=...]

Starts the composed driving process (reasoner + action expert sharing the KV bridge in one process, plus
the simulator/sensor source) with params/spanvla.yaml, and optionally RViz with rviz/spanvla.rviz.
The same composition runs without `ros2 launch` as the console script `spanvla-drive`: both run
spanvla_ros.cli.drive (the ROS executable lib/spanvla_ros/spanvla_drive wraps it), so they cannot drift apart.
Each run is recorded (MCAP bag of inputs and plans) with a rendered view next to it under `record`.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory("spanvla_ros")
    params_file = LaunchConfiguration("params_file")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "params", "spanvla.yaml"),
                              description="ROS 2 parameter file for every spanvla_ros node"),
        DeclareLaunchArgument("rviz", default_value="false", description="also start RViz"),
        DeclareLaunchArgument("duration", default_value="0", description="seconds to run (0 = until stopped)"),
        DeclareLaunchArgument("record", default_value="runs/{time}",
                              description="run directory for the MCAP bag and run_view.png ({time}: start time)"),
        Node(
            package="spanvla_ros",
            executable="spanvla_drive",
            name="spanvla_drive",
            output="screen",
            parameters=[params_file],
            arguments=["--params-file", params_file, "--duration", LaunchConfiguration("duration"),
                       "--record", LaunchConfiguration("record")],
        ),
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            arguments=["-d", os.path.join(share, "rviz", "spanvla.rviz")],
            condition=IfCondition(LaunchConfiguration("rviz")),
        ),
    ])
