"""Tiny rclpy talker and listener for the demo and DDS-over-overlay checks.

Run inside a namespace with the DDS profile of that node in the environment::

    python -m husarnet_ros.testing.ros_chat talk --topic /husarnet_demo --prefix robot1 --count 40
    python -m husarnet_ros.testing.ros_chat listen --topic /husarnet_demo --count 5 --timeout 40

The listener prints one line per message (``heard: <text>``) and exits 0 after ``count`` messages, or
1 on timeout, so a caller can judge the result from the exit code and the lines.
"""

from __future__ import annotations

import argparse
import sys
import time


def _talk(topic: str, prefix: str, count: int, period: float) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from std_msgs.msg import String

    rclpy.init()
    node = rclpy.create_node(f"{prefix}_talker")
    pub = node.create_publisher(String, topic, 10)
    try:
        for i in range(1, count + 1):
            msg = String()
            msg.data = f"hello from {prefix} #{i}"
            pub.publish(msg)
            print(f"said: {msg.data}", flush=True)
            end = time.monotonic() + period
            while time.monotonic() < end:
                rclpy.spin_once(node, timeout_sec=max(0.0, end - time.monotonic()))
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # stopped by a signal: a normal end for a demo talker
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _listen(topic: str, count: int, timeout: float) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from std_msgs.msg import String

    rclpy.init()
    node = rclpy.create_node("demo_listener")
    heard: list[str] = []

    def on_msg(msg: String) -> None:
        heard.append(msg.data)
        print(f"heard: {msg.data}", flush=True)

    node.create_subscription(String, topic, on_msg, 10)
    deadline = time.monotonic() + timeout
    try:
        while len(heard) < count and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0 if len(heard) >= count else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m husarnet_ros.testing.ros_chat")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("talk")
    t.add_argument("--topic", default="/husarnet_demo")
    t.add_argument("--prefix", default="robot")
    t.add_argument("--count", type=int, default=40)
    t.add_argument("--period", type=float, default=0.5)
    lsn = sub.add_parser("listen")
    lsn.add_argument("--topic", default="/husarnet_demo")
    lsn.add_argument("--count", type=int, default=5)
    lsn.add_argument("--timeout", type=float, default=40.0)
    a = ap.parse_args(argv)
    if a.cmd == "talk":
        return _talk(a.topic, a.prefix, a.count, a.period)
    return _listen(a.topic, a.count, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
