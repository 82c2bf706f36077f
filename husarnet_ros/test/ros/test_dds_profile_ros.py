"""Fast DDS in the venv applies the generated profile (on loopback, so no overlay or root is needed).

* an rclpy process started with the generated dds.env starts without any XML parser error, and a
  deliberately broken profile does produce one (so the check can fail);
* two processes that both use the profile exchange messages over UDPv6 on the whitelisted address;
* a process without the profile (default transports: UDPv4, shared memory) cannot reach one that
  uses it, which shows the profile really confines the traffic.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from husarnet_ros import dds
from husarnet_ros.testing.ci import require

require("rclpy", "rclpy not importable")

TALK = r"""
import sys, time, rclpy
from std_msgs.msg import String
role, seconds, topic = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rclpy.init()
node = rclpy.create_node("dds_probe_" + role)
got = []
if role == "pub":
    pub = node.create_publisher(String, topic, 10)
else:
    node.create_subscription(String, topic, lambda m: got.append(m.data), 10)
end = time.monotonic() + seconds
while time.monotonic() < end and not got:
    if role == "pub":
        pub.publish(String(data="over-the-profile"))
    rclpy.spin_once(node, timeout_sec=0.1)
print("RECEIVED" if got else "NOTHING", flush=True)
node.destroy_node()
rclpy.shutdown()
"""


def base_env(domain: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in dds.ENV_VARIABLES and k != "ROS_LOCALHOST_ONLY"}
    env["ROS_DOMAIN_ID"] = str(domain)
    env["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    return env


def with_profile(env: dict[str, str], files: dds.DdsFiles) -> dict[str, str]:
    return {**env, **dds.parse_dds_env(files.env.read_bytes())}


def start(role: str, seconds: float, topic: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TALK, role, str(seconds), topic],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def loopback_profile(tmp_path: Path) -> dds.DdsFiles:
    d = tmp_path / "dds"
    dds.write_dds_config(d, "::1", [], interface="lo")
    return dds.DdsFiles(d)


def test_profile_loads_without_errors_and_a_broken_one_is_reported(
    loopback_profile: dds.DdsFiles, tmp_path: Path
) -> None:
    domain = random.randint(100, 200)
    env = with_profile(base_env(domain), loopback_profile)
    out = start("sub", 0.5, "dds_probe_load", env).communicate(timeout=60)[0]
    assert "XMLPARSER" not in out and "Error" not in out, out
    assert "NOTHING" in out  # it ran to the end

    broken = tmp_path / "broken.xml"
    broken.write_bytes(loopback_profile.fastdds.read_bytes().replace(b"maxMessageSize", b"maxMesageSize"))
    env_broken = {**env, "FASTDDS_DEFAULT_PROFILES_FILE": str(broken), "FASTRTPS_DEFAULT_PROFILES_FILE": str(broken)}
    out = start("sub", 0.5, "dds_probe_load", env_broken).communicate(timeout=60)[0]
    assert "XMLPARSER" in out and "maxMesageSize" in out, out


def test_processes_with_the_profile_talk_and_without_it_cannot(loopback_profile: dds.DdsFiles) -> None:
    domain = random.randint(100, 200)
    topic = f"dds_probe_{os.getpid()}"
    plain = base_env(domain)
    profiled = with_profile(plain, loopback_profile)

    pub = start("pub", 15, topic, profiled)
    sub = start("sub", 15, topic, profiled)
    try:
        assert "RECEIVED" in sub.communicate(timeout=60)[0]
    finally:
        pub.kill()
        pub.communicate()

    # Sanity: without any profile the pair talks too (so the next "NOTHING" is the profile's doing).
    pub = start("pub", 15, topic, plain)
    sub = start("sub", 15, topic, plain)
    try:
        assert "RECEIVED" in sub.communicate(timeout=60)[0]
    finally:
        pub.kill()
        pub.communicate()

    # Publisher confined to UDPv6 on ::1; subscriber on the default transports: no discovery, no data.
    pub = start("pub", 8, topic, profiled)
    sub = start("sub", 6, topic, plain)
    try:
        assert "NOTHING" in sub.communicate(timeout=60)[0]
    finally:
        pub.kill()
        pub.communicate()
