"""ros2 launch spanvla_ros drive.launch.py [sim:=true|false] [checkpoint:=DIR] [params_file:=FILE] [rviz:=true]
                                         [duration:=S] [record:=DIR]

sim:=true (default) starts the composed driving process: the highway-env simulator on carla-ros-bridge topic
names plus the planner (reasoner + action expert sharing the KV bridge in one process). sim:=false starts the
planner alone, for carla-ros-bridge or a car publishing the topics of the params file. checkpoint:= overrides
the params file's checkpoint; rviz:=true adds RViz with rviz/spanvla.rviz. The same composition runs without
`ros2 launch` as the console script `spanvla-drive` (spanvla_ros.cli.drive; these arguments become its command
line through spanvla_ros.cli.drive.launch_command_line, so the two cannot drift apart). Each run is recorded
(MCAP bag of inputs and plans) with a rendered view next to it under `record`.

The planner's topics are node-relative (~/input/..., ~/output/...); spanvla_drive remaps them onto the params
file's names on the wire (spanvla_ros.ros.topics) after any remapping given here, so a launch file that includes
this one can point the planner elsewhere with the spanvla_drive Node's remappings, e.g.
("spanvla_planner:~/input/odometry", "/localization/kinematic_state").
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from spanvla_ros.cli.drive import launch_command_line


def _drive(context):
    value = {k: LaunchConfiguration(k).perform(context) for k in ("params_file", "sim", "checkpoint", "duration",
                                                                   "record")}
    # respawn: a planner process that dies is started again (a car must not lose its planner to one crash)
    return [Node(package="spanvla_ros", executable="spanvla_drive", name="spanvla_drive", output="screen",
                 parameters=[value["params_file"]], arguments=launch_command_line(**value),
                 respawn=True, respawn_delay=2.0)]


def generate_launch_description():
    share = get_package_share_directory("spanvla_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "params", "spanvla.yaml"),
                              description="ROS 2 parameter file for every spanvla_ros node"),
        DeclareLaunchArgument("sim", default_value="true",
                              description="true: simulator + planner; false: planner alone (bridge or car)"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="checkpoint directory (empty: the params file's)"),
        DeclareLaunchArgument("rviz", default_value="false", description="also start RViz"),
        DeclareLaunchArgument("duration", default_value="0", description="seconds to run (0 = until stopped)"),
        DeclareLaunchArgument("record", default_value="runs/{time}",
                              description="run directory for the MCAP bag and run_view.png ({time}: start time)"),
        OpaqueFunction(function=_drive),
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            arguments=["-d", os.path.join(share, "rviz", "spanvla.rviz")],
            condition=IfCondition(LaunchConfiguration("rviz")),
        ),
    ])
