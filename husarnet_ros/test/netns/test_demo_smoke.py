"""``scripts/demo.py`` (what ``make demo`` runs) end to end, as a newcomer would run it.

The full demo, not ``--quick``: it takes about 15 s and is the only place where the real lifecycle node
runs inside a namespace next to daemons behind NATs, so its "ok" lines are the check that the whole
story still holds (hole-punched direct path, the node's /husarnet/peers and services, a ROS topic over
the overlay). A second test interrupts it the way Ctrl-C does and checks nothing is left behind.

Skipped with a reason when the ROS environment (rclpy, husarnet_msgs) is not usable, since then the
demo cannot run the node; failed instead in CI (``CI=true``), where ``make test`` builds and sources it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from husarnet_ros.testing.ci import skip_or_fail

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "scripts" / "demo.py"
RUN_TIMEOUT = 150  # the demo promises < 2 minutes; this only stops a hung run


def _ros_skip_reason() -> str | None:
    probe = (
        "import rclpy, std_msgs.msg; from husarnet_msgs.msg import PeerArray; from husarnet_msgs.srv import PingPeer"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return f"ROS env not usable ({last}); source scripts/ros_env.sh after scripts/build_ros.sh"
    return None


@pytest.fixture(scope="module")
def ros_ready() -> None:
    reason = _ros_skip_reason()
    if reason:
        skip_or_fail(reason)


def _namespaces_of(pid: int) -> list[str]:
    """Namespaces created by the demo process ``pid`` (Lab names them hr<pid>x<n>...)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(f"hr{pid}x")]


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (the demo's temp dir: its node, daemons, probe)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(d.name))
    return pids


def _tmp_dir(output: str) -> str:
    """The demo's temp dir, from the 'parameters: <tmp>/husarnet-robot1.yaml' line."""
    for line in output.splitlines():
        if "parameters:" in line and "husarnet-robot1.yaml" in line:
            return str(Path(line.split("parameters:")[1].strip()).parent)
    raise AssertionError(f"no 'parameters:' line in the demo output:\n{output}")


def _start_demo() -> subprocess.Popen[str]:
    """scripts/demo.py with its output (stdout and stderr) on one pipe."""
    return subprocess.Popen(
        [sys.executable, str(DEMO)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )


def test_full_demo_succeeds(ros_ready: None) -> None:
    proc = _start_demo()
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # its own cleanup runs on SIGINT
            proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    lines = [ln.strip() for ln in out.splitlines()]
    expected = [
        "ok robot1 logged in to the base (UDP), as /husarnet/status says",
        "ok robot1 <-> robot2: direct through both NATs (hole punched)",
        "ok robot3 <-> laptop: on the LAN (found by multicast beacons, no base)",
        "ok robot1's PeerArray on /husarnet/peers: robot2 path direct, rtt ",
        "ok whitelist enabled, 1 entry:",
        "ok rtt_ms: ",
        "ok robot2 received 5 messages from robot1 over fc94 addresses only",
        "ok nothing left behind",
    ]
    missing = [e for e in expected if not any(ln.startswith(e) for ln in lines)]
    assert not missing, f"missing lines {missing} in:\n{out}"
    assert not any(ln.startswith("FAILED") for ln in lines), out
    # The ROS table's robot2 row: hostname, the address the whitelist lists, direct, a NAT endpoint.
    table = next(i for i, ln in enumerate(lines) if ln.startswith("$ ros2 topic echo /husarnet/peers"))
    row = lines[table + 3].split()
    assert row[0] == "robot2" and row[2] == "direct" and row[3].startswith("198.18.0."), lines[table : table + 4]
    assert _namespaces_of(proc.pid) == []
    assert _processes_mentioning(_tmp_dir(out)) == []


def test_interrupted_demo_cleans_up(ros_ready: None) -> None:
    proc = _start_demo()
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            seen.append(line)
            # Interrupt once the node and its probe are running, as Ctrl-C would (SIGINT to the demo).
            if "husarnet node active" in line or time.monotonic() > deadline:
                break
        assert any("husarnet node active" in ln for ln in seen), "".join(seen)
        tmp = _tmp_dir("".join(seen))
        assert _processes_mentioning(tmp), "the node should be running before the interrupt"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    out = "".join(seen) + rest
    assert "interrupted" in out
    assert "ok nothing left behind" in out, out
    assert proc.returncode == 1, out
    assert _namespaces_of(proc.pid) == []
    assert _processes_mentioning(tmp) == []
