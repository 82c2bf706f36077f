"""What a user's ``ros2`` CLI calls would show about a running ``husarnet`` node, as JSON lines.

The demo runs this next to the lifecycle node, in the same network namespace, to show what

    ros2 topic echo /husarnet/status --once
    ros2 topic echo /husarnet/peers --once
    ros2 service call /husarnet/whitelist/list husarnet_msgs/srv/ListWhitelist
    ros2 service call /husarnet/ping husarnet_msgs/srv/PingPeer "{address: <peer>}"

print, without depending on the ros2cli package. It is one process (one DDS discovery) and prints one
JSON object per line as each step completes, so a caller can show them as they arrive::

    python -m husarnet_ros.testing.ros_probe --wait-base --peer fc94:... --path direct --ping fc94:...

Steps, each optional and in this order: wait for a Status with a base connection; wait for a PeerArray in
which ``--peer`` has a path in ``--path`` (and an RTT once secure); list the whitelist; ping. Exit code 0
when every requested step succeeded, 1 otherwise (the last line is then ``{"event": "error", ...}``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from typing import Any


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.IPv6Address(a) == ipaddress.IPv6Address(b)
    except ValueError:
        return False


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def peer_to_dict(p: Any) -> dict[str, Any]:
    """husarnet_msgs/Peer -> plain dict (the fields a peer table shows)."""
    return {
        "address": p.address,
        "hostname": p.hostname,
        "path": p.path,
        "endpoint": p.endpoint,
        "rtt_ms": p.rtt_ms,
        "is_whitelisted": p.is_whitelisted,
        "is_secure": p.is_secure,
        "cipher": p.cipher,
    }


def run(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    from husarnet_msgs.msg import PeerArray, Status
    from husarnet_msgs.srv import ListWhitelist, PingPeer

    from ..service_call import call_resending

    # Same QoS as the node's latched ~/peers and ~/status (what `ros2 topic echo` adapts to).
    latched = QoSProfile(
        depth=1,
        history=HistoryPolicy.KEEP_LAST,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )
    ns = args.node.rstrip("/")
    rclpy.init()
    node = rclpy.create_node("husarnet_probe")
    latest: dict[str, Any] = {}
    node.create_subscription(Status, f"{ns}/status", lambda m: latest.__setitem__("status", m), latched)
    node.create_subscription(PeerArray, f"{ns}/peers", lambda m: latest.__setitem__("peers", m), latched)
    deadline = time.monotonic() + args.timeout

    def spin_until(pred, within: float | None = None) -> Any:
        until = deadline if within is None else min(deadline, time.monotonic() + within)
        while time.monotonic() < until:
            value = pred()
            if value:
                return value
            rclpy.spin_once(node, timeout_sec=0.1)
        return pred()

    def fail(why: str) -> int:
        _emit("error", message=why)
        return 1

    def call(srv_type: Any, name: str, request: Any, resend: float) -> Any:
        client = node.create_client(srv_type, name)
        if not client.wait_for_service(timeout_sec=max(0.1, deadline - time.monotonic())):
            return None
        answer = call_resending(client, request, spin_until, max(0.0, deadline - time.monotonic()), resend)
        return None if answer is None else answer[0]

    try:
        if args.wait_base:
            if not spin_until(lambda: "status" in latest and latest["status"].base_connection != "none"):
                seen = latest.get("status")
                return fail(f"no base connection on {ns}/status (last: {seen.base_connection if seen else 'none'})")
            st = latest["status"]
            _emit(
                "status",
                topic=f"{ns}/status",
                address=st.address,
                hostname=st.hostname,
                interface=st.interface_name,
                base_connection=st.base_connection,
                base_address=st.base_address,
                whitelist_enabled=st.whitelist_enabled,
                dds_env_file=st.dds_env_file,
            )
        if args.peer:
            want = set(args.path)

            def peer_ready() -> bool:
                msg = latest.get("peers")
                if msg is None:
                    return False
                return any(
                    _same_address(p.address, args.peer) and p.path in want and p.is_secure and p.rtt_ms > 0
                    for p in msg.peers
                )

            latest.pop("peers", None)  # only tables received from now on
            if not spin_until(peer_ready):
                msg = latest.get("peers")
                last = [peer_to_dict(p) for p in msg.peers] if msg else []
                return fail(f"{args.peer} never had a secure {sorted(want)} path on {ns}/peers (last: {last})")
            _emit("peers", topic=f"{ns}/peers", peers=[peer_to_dict(p) for p in latest["peers"].peers])
        if args.whitelist:
            res = call(ListWhitelist, f"{ns}/whitelist/list", ListWhitelist.Request(), resend=2.0)
            if res is None:
                return fail(f"{ns}/whitelist/list did not answer")
            _emit(
                "whitelist",
                service=f"{ns}/whitelist/list",
                enabled=res.enabled,
                addresses=list(res.addresses),
                hostnames=list(res.hostnames),
            )
        if args.ping:
            res = call(PingPeer, f"{ns}/ping", PingPeer.Request(address=args.ping, timeout=2.0), resend=4.0)
            if res is None:
                return fail(f"{ns}/ping did not answer")
            _emit("ping", service=f"{ns}/ping", success=res.success, rtt_ms=res.rtt_ms, message=res.message)
            if not res.success:
                return 1
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m husarnet_ros.testing.ros_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--node", default="/husarnet", help="the node's name with namespace (default %(default)s)")
    ap.add_argument("--wait-base", action="store_true", help="wait for a base connection on <node>/status")
    ap.add_argument("--peer", default="", help="wait until this address has a secure path on <node>/peers")
    ap.add_argument("--path", action="append", default=[], help="acceptable paths (repeatable; default: lan, direct)")
    ap.add_argument("--whitelist", action="store_true", help="call <node>/whitelist/list")
    ap.add_argument("--ping", default="", help="call <node>/ping for this address or hostname")
    ap.add_argument("--timeout", type=float, default=30.0, help="for all steps together (default %(default)s s)")
    args = ap.parse_args(argv)
    if not args.path:
        args.path = ["lan", "direct"]
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
