"""DESIGN.md 6, the proof that counts: ROS 2 traffic between two namespaces flows over the overlay.

Two hosts on one link with IPv4 underlay addresses only and multicast dropped between them,
so DDS cannot discover anything by itself. Each runs the husarnet daemon (hnet0, whitelisting the
other). A talker and a listener that source the dds.env written for their node exchange messages;
the same pair without the profile exchanges nothing.
"""

from __future__ import annotations

import random
import shlex
import sys
from pathlib import Path

import pytest

from husarnet_ros import dds
from husarnet_ros.testing.ci import require
from husarnet_ros.testing.netns import Lab, wait_until

require("rclpy", "rclpy not importable")

TALK = r"""
import sys, time, rclpy
from std_msgs.msg import String
role, seconds = sys.argv[1], float(sys.argv[2])
rclpy.init()
node = rclpy.create_node("overlay_" + role)
got = []
if role == "pub":
    pub = node.create_publisher(String, "overlay_chatter", 10)
else:
    node.create_subscription(String, "overlay_chatter", lambda m: got.append(m.data), 10)
end = time.monotonic() + seconds
while time.monotonic() < end and not got:
    if role == "pub":
        pub.publish(String(data="hello over fc94"))
    rclpy.spin_once(node, timeout_sec=0.1)
print("RECEIVED" if got else "NOTHING", flush=True)
node.destroy_node()
rclpy.shutdown()
"""


# Inherited DDS configuration is removed with env(1): the lab's spawn can only add variables.
UNSET = ["env", *(f"--unset={v}" for v in dds.ENV_VARIABLES), "--unset=FASTDDS_BUILTIN_TRANSPORTS"]


def clean_env(domain: int) -> dict[str, str]:
    return {
        "ROS_DOMAIN_ID": str(domain),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET",
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
    }


@pytest.mark.netns
def test_ros_topic_crosses_the_overlay_only_with_the_generated_profiles(tmp_path: Path) -> None:
    with Lab("dds") as lab:
        a, b = lab.host("a"), lab.host("b")
        ifa = lab.link(a, b, "198.18.7.1/24", other_addr4="198.18.7.2/24")
        # No multicast between the hosts (as across the internet or many Wi-Fi networks): a veth's
        # "multicast off" flag does not stop sockets that pick the interface, so drop it with nft.
        for host in (a, b):
            lab.add_rule(host, "ip daddr 224.0.0.0/4 drop", local=True)
        addr_a = lab.daemon_address(lab.tmp / "state-a")
        addr_b = lab.daemon_address(lab.tmp / "state-b")
        da = lab.start_daemon(
            a, lab.tmp / "state-a", whitelist=[addr_b], peer=[f"{addr_b}@198.18.7.2:5582"], no_lan_discovery=True
        )
        db = lab.start_daemon(
            b, lab.tmp / "state-b", whitelist=[addr_a], peer=[f"{addr_a}@198.18.7.1:5582"], no_lan_discovery=True
        )
        da.wait_path(addr_b, ("lan", "direct"), timeout=30)
        db.wait_path(addr_a, ("lan", "direct"), timeout=30)
        assert ifa

        files = {}
        for name, own, peer in (("a", addr_a, addr_b), ("b", addr_b, addr_a)):
            d = tmp_path / f"dds-{name}"
            dds.write_dds_config(d, own, [peer], interface="hnet0")
            files[name] = dds.parse_dds_env(dds.DdsFiles(d).env.read_bytes())

        # Two robots have two machine ids; Fast DDS derives its host id from it and treats
        # participants with the same host id as local, so each lab host gets its own.
        machine_ids = {}
        for name in ("a", "b"):
            machine_ids[name] = lab.tmp / f"machine-id-{name}"
            machine_ids[name].write_text(f"{random.getrandbits(128):032x}\n")

        def exchange(env_a: dict[str, str], env_b: dict[str, str], seconds: float) -> str:
            # env(1) first removes what was inherited, then sets exactly this case's variables.
            def argv(host: str, env: dict[str, str], *args: str) -> list[str]:
                cmd = [*UNSET, *(f"{k}={v}" for k, v in env.items()), sys.executable, "-c", TALK, *args]
                script = f"mount --bind {machine_ids[host]} /etc/machine-id && exec {shlex.join(cmd)}"
                return ["unshare", "--mount", "sh", "-c", script]

            pub = lab.spawn(a, argv("a", env_a, "pub", str(seconds + 5)))
            sub = lab.spawn(b, argv("b", env_b, "sub", str(seconds)))
            wait_until(lambda: sub.returncode is not None, seconds + 30)
            pub.stop()
            return sub.output()

        domain = random.randint(100, 200)
        # Without the profiles: default transports, no multicast between the hosts -> nothing.
        out = exchange(clean_env(domain), clean_env(domain), 8)
        assert "NOTHING" in out, out
        # With them: unicast discovery and data to the peer's fc94 address, through the tunnel.
        before = da.counters().get("tx_packets", 0)
        out = exchange({**clean_env(domain), **files["a"]}, {**clean_env(domain), **files["b"]}, 30)
        assert "RECEIVED" in out, out
        assert "XMLPARSER" not in out
        assert da.counters().get("tx_packets", 0) > before  # the DDS traffic went through the overlay
