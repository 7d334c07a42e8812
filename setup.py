"""pip-installable ROS-free core of spanvla_ros (model/, sim/, eval/, data/) plus console scripts.

The ROS 2 package itself is built by colcon through CMakeLists.txt (ament_cmake, for msg/ generation);
this file is for `pip install .` of the core, e.g. on a training machine without ROS.
"""
from setuptools import find_packages, setup

setup(
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"spanvla_ros": ["py.typed"]},
)
