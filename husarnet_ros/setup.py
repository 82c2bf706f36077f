"""ament_python packaging of husarnet_ros: the package, its data files and its commands.

colcon runs this from the package directory; `ros2 run husarnet_ros <command>` finds the commands
because setup.cfg puts them in lib/husarnet_ros. Runtime dependencies come from package.xml (rosdep),
as usual for ROS 2 Python packages, not from install_requires.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE_NAME = "husarnet_ros"

setup(
    name=PACKAGE_NAME,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE_NAME}"]),
        (f"share/{PACKAGE_NAME}", ["package.xml"]),
        (f"share/{PACKAGE_NAME}/launch", sorted(glob("launch/*.py"))),
        (f"share/{PACKAGE_NAME}/config", sorted(glob("config/*.yaml"))),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="husarnet_ros maintainers",
    maintainer_email="husarnet-ros@example.com",
    description="Peer-to-peer fc94::/16 overlay network for ROS 2 robots (Noise IK, base server, LAN discovery).",
    license="Apache-2.0",
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={
        "console_scripts": [
            "husarnet_node = husarnet_ros.node:main",
            "husarnet-ros = husarnet_ros.cli:main",
            "husarnet-base = husarnet_ros.base.server:main",
        ],
    },
)
