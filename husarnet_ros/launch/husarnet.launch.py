"""Launch the husarnet lifecycle node and bring it to 'active' (configure, then activate).

    ros2 launch husarnet_ros husarnet.launch.py hostname:=robot1 base_servers:="['base.example.org:443']"

Arguments: config_file (parameters YAML, default: this package's config/husarnet.yaml), namespace,
hostname and base_servers (override the file when given), log_level.

The transitions are driven by event handlers that exist on Humble, Jazzy and Kilted alike
(LifecycleNode's own autostart argument is newer than Humble): when the process starts, emit
'configure'; when the node reaches 'inactive', emit 'activate'. If configure fails the node stays
'unconfigured' and says why in its log. A later deactivate (to stop traffic) is left alone.
"""

from __future__ import annotations

import os

import yaml
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessStart
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition

NODE_NAME = "husarnet"


def _file_parameters(path: str) -> dict:
    """The node's section of a parameters file, whatever namespace the node is launched in.

    rcl only applies a 'husarnet:' section to /husarnet; reading it here makes the same file
    work with the namespace argument. '/**/husarnet' and '/**' sections are honoured too.
    """
    if not path:
        return {}
    with open(os.path.expanduser(path)) as f:
        doc = yaml.safe_load(f) or {}
    params: dict = {}
    for key in ("/**", "/**/husarnet", NODE_NAME, "/" + NODE_NAME):
        section = doc.get(key) or {}
        params.update(_flatten(section.get("ros__parameters") or {}))
    for name, value in params.items():
        if value is None:  # launch_ros would fail with a bare TypeError that names neither file nor key
            raise ValueError(f"{path}: parameter {name!r} has no value: give it one or delete the line")
    return params


def _launchable(params: dict) -> dict:
    """The parameters without empty lists, which launch_ros cannot pass on.

    launch_ros needs a list's first element to know its type, and stops the whole launch with a
    TypeError on an empty one (Humble to Kilted).  The node declares every list parameter with
    the default [], so leaving an empty list out changes nothing.
    """
    return {name: value for name, value in params.items() if not (isinstance(value, list) and not value)}


def _flatten(d: dict, prefix: str = "") -> dict:
    """{'dds': {'enabled': True}} -> {'dds.enabled': True}: ROS parameter names, on every distribution."""
    out: dict = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _parse_list(text: str) -> list[str]:
    """ "['a:443', 'b:443']" (YAML list) or "a:443,b:443" -> list of strings."""
    value = yaml.safe_load(text)
    if isinstance(value, list):
        return [str(v) for v in value]
    return [s.strip() for s in str(value).split(",") if s.strip()]


def _launch_node(context: LaunchContext) -> list:
    params = _file_parameters(LaunchConfiguration("config_file").perform(context))
    hostname = LaunchConfiguration("hostname").perform(context)
    base_servers = LaunchConfiguration("base_servers").perform(context)
    if hostname:
        params["hostname"] = hostname
    if base_servers:
        params["base_servers"] = _parse_list(base_servers)
    # The event handlers below drive the transitions: the node must not also start itself.
    params["autostart"] = False

    node = LifecycleNode(
        package="husarnet_ros",
        executable="husarnet_node",
        name=NODE_NAME,
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[_launchable(params)],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )
    configure = RegisterEventHandler(
        OnProcessStart(
            target_action=node,
            on_start=[
                EmitEvent(
                    event=ChangeState(
                        lifecycle_node_matcher=matches_action(node),
                        transition_id=Transition.TRANSITION_CONFIGURE,
                    )
                )
            ],
        )
    )
    activate = RegisterEventHandler(
        OnStateTransition(
            target_lifecycle_node=node,
            # Only right after configure: 'inactive' is also reached by an operator's deactivate,
            # which must not be undone at once by this handler.
            start_state="configuring",
            goal_state="inactive",
            entities=[
                EmitEvent(
                    event=ChangeState(
                        lifecycle_node_matcher=matches_action(node),
                        transition_id=Transition.TRANSITION_ACTIVATE,
                    )
                )
            ],
        )
    )
    # Handlers first, so that no event of the node can come before they listen.
    return [configure, activate, node]


def generate_launch_description() -> LaunchDescription:
    default_config = PathJoinSubstitution([FindPackageShare("husarnet_ros"), "config", "husarnet.yaml"])
    return LaunchDescription(
        [
            DeclareLaunchArgument("config_file", default_value=default_config, description="Parameters YAML file."),
            DeclareLaunchArgument("namespace", default_value="", description="Namespace of the husarnet node."),
            DeclareLaunchArgument(
                "hostname", default_value="", description="This robot's hostname on the overlay (overrides the file)."
            ),
            DeclareLaunchArgument(
                "base_servers",
                default_value="",
                description="Base servers, e.g. \"['base.example.org:443']\" (overrides the file).",
            ),
            DeclareLaunchArgument(
                "log_level", default_value="info", description="Log level: debug, info, warn, error or fatal."
            ),
            OpaqueFunction(function=_launch_node),
        ]
    )
