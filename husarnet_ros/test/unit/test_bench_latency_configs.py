"""The benchmark's latency configurations and table: flags and variables reach the right place (issue #6)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import latency_ab
import run as bench_run


def test_ours_items_split_into_environment_and_daemon_flags() -> None:
    config = "ours:--warm-interval=0,HUSARNET_ROS_SUPER=0"
    assert latency_ab.daemon_env(config) == {"HUSARNET_ROS_SUPER": "0"}
    assert latency_ab.daemon_options(config) == {"warm_interval": "0"}
    assert latency_ab.daemon_env("ours") is None and latency_ab.daemon_options("ours") == {}
    assert latency_ab.daemon_options("wg") == {}


@pytest.mark.parametrize("config", ["ours:--warm-interval", "ours:=1", "ours:A=1,"])
def test_malformed_ours_items_are_refused(config: str) -> None:
    with pytest.raises(SystemExit, match="NAME=VAL"):
        latency_ab.daemon_env(config)


def _run(wg: float, ours: float, below: int) -> dict:
    return {
        "wireguard-go": {"avg_ms": wg, "p99_ms": wg * 1.5, "rounds_below_first": 0},
        "husarnet_ros": {"avg_ms": ours, "p99_ms": ours * 1.5, "rounds_below_first": below},
    }


def test_latency_table_shows_each_run_against_its_own_wireguard_go() -> None:
    latency = {"rounds": 10, "pings_per_round": 100, **_run(0.550, 0.450, 9), "warmer_off": _run(0.450, 0.610, 0)}
    text = bench_run.latency_table(latency, {"raw veth": {"ping_avg_ms": 0.050}})
    lines = text.splitlines()
    on = next(line for line in lines if line.startswith("husarnet_ros ") and "ms" not in line and "x" in line)
    off = next(line for line in lines if line.startswith("husarnet_ros, warmer off "))
    assert on.split()[-1] == "x0.80"  # (0.450 - 0.050) / (0.550 - 0.050)
    assert off.split()[-1] == "x1.40"  # (0.610 - 0.050) / (0.450 - 0.050): its own run's wireguard-go
    assert "husarnet_ros lower than wireguard-go in 9 of 10 rounds" in text
    assert "husarnet_ros, warmer off lower than wireguard-go in 0 of 10 rounds" in text


def test_the_median_interval_is_the_sign_tests_order_statistics() -> None:
    ten = [1.0, 0.9, 1.1, 1.3, 0.7, 1.2, 0.8, 1.05, 0.95, 2.0]
    # n = 10: P(B <= 1) = 11/1024 <= 0.025 < P(B <= 2) = 56/1024, so the 2nd smallest and the 2nd largest.
    assert latency_ab.median_interval(ten) == (0.8, 1.3)
    assert latency_ab.median_interval(ten, confidence=0.8) == (0.9, 1.2)  # P(B <= 2) <= 0.1 < P(B <= 3)
    # n = 6: P(B <= 0) = 1/64 <= 0.025: the extremes; n = 5: 1/32 > 0.025, no interval at 95 %.
    assert latency_ab.median_interval(ten[:6]) == (0.7, 1.3)
    assert latency_ab.median_interval(ten[:5]) is None
    assert latency_ab.median_interval([]) is None


def test_round_ratios_pair_rounds_and_the_summary_gives_median_and_interval() -> None:
    ours, wg = [0.45, 0.60, 0.55, 0.50, 0.70, 0.52], [0.55, 0.55, 0.55, 0.50, 0.65, 0.60]
    ratios = latency_ab.round_ratios(ours, wg, base=0.05)
    assert ratios[0] == pytest.approx(0.8) and ratios[3] == pytest.approx(1.0) and len(ratios) == 6
    assert latency_ab.round_ratios([0.5], [0.04], base=0.05) == []  # no added latency to divide by
    lo, hi = min(ratios), max(ratios)
    assert latency_ab.ratio_summary(ratios) == (
        f", per round x{sorted(ratios)[2] / 2 + sorted(ratios)[3] / 2:.2f} (95 % interval x{lo:.2f}-x{hi:.2f})"
    )
    assert latency_ab.ratio_summary(ratios[:5]).endswith("(too few rounds for an interval)")
    assert latency_ab.ratio_summary([]) == ""


def test_latency_table_gives_the_per_round_added_ratio_when_the_rounds_are_there() -> None:
    latency = {"rounds": 6, "pings_per_round": 100, **_run(0.55, 0.45, 5)}
    latency["wireguard-go"]["round_avgs_ms"] = [0.55, 0.55, 0.55, 0.50, 0.65, 0.60]
    latency["husarnet_ros"]["round_avgs_ms"] = [0.45, 0.60, 0.55, 0.50, 0.70, 0.52]
    text = bench_run.latency_table(latency, {"raw veth": {"ping_avg_ms": 0.05}})
    # Added latency per round: 0.8, 1.1, 1.0, 1.0, 0.65/0.60, 0.47/0.55; n = 6 gives the extremes at 95 %.
    assert "in 5 of 6 rounds, added / wg per round x1.00 (95 % interval x0.80-x1.10)" in text


def test_latency_table_of_an_older_result_without_the_warmer_run() -> None:
    latency = {"rounds": 4, "pings_per_round": 50, **_run(0.5, 0.6, 1)}
    text = bench_run.latency_table(latency, {})
    assert "warmer off" not in text and "husarnet_ros lower than wireguard-go in 1 of 4 rounds" in text


def test_node_configurations_run_this_or_another_checkouts_lifecycle_node(tmp_path: Path) -> None:
    assert latency_ab.daemon_env("node") is None  # this checkout: the environment as it is
    (tmp_path / "husarnet_ros" / "husarnet_ros").mkdir(parents=True)
    (tmp_path / "husarnet_ros" / "husarnet_ros" / "daemon.py").write_text("")
    env = latency_ab.daemon_env(f"node:{tmp_path}")
    assert env is not None and env["PYTHONPATH"].split(":")[0] == str(tmp_path / "husarnet_ros")
    with pytest.raises(SystemExit, match="holds no husarnet_ros package"):
        latency_ab.daemon_env(f"node:{tmp_path / 'missing'}")
    with pytest.raises(SystemExit, match="unknown configuration"):
        latency_ab.daemon_env("nodes")


def test_the_node_is_started_as_ros2_launch_would_with_one_static_peer(tmp_path: Path) -> None:
    argv = latency_ab.node_argv(tmp_path / "a", "fc94::1", "198.18.0.2")
    assert argv[1:4] == ["-m", "husarnet_ros.node", "--ros-args"]
    params = dict(arg.split(":=", 1) for arg in argv[4:] if arg != "-p")
    assert params["autostart"] == "true" and params["state_dir"] == str(tmp_path / "a")
    assert params["peers"] == "['fc94::1@198.18.0.2:5582']" and params["whitelist"] == "['fc94::1']"
    assert (params["interface_name"], params["udp_port"], params["lan_discovery"]) == ("hnet0", "5582", "false")


def test_the_udp_probe_answers_and_is_read_as_ping_is() -> None:
    """bench/udp_echo.py over loopback: every request answered, printed and summed the way ping's lines are."""
    import socket
    import subprocess
    import threading

    import common
    import udp_echo

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    threading.Thread(target=udp_echo.echo, args=(server,), daemon=True).start()
    out = subprocess.run(
        [sys.executable, str(common.UDP_ECHO), "client", "127.0.0.1", str(port), "20", "0.001"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.count("time=") == 20
    avg, p99, lost = common._round_trips(out, 20)
    assert lost == 0 and 0 < avg <= p99
    assert common._round_trips("seq=0 time=1.000 ms\nseq=1 time=3.000 ms\n", 4) == (2.0, 3.0, 0.5)


def test_the_udp_probes_name_themselves_for_the_tracer() -> None:
    """perf reports a process by its kernel name: latency_trace.py --probe udp tells the two ends apart by it."""
    import subprocess
    import time

    import common
    import latency_trace
    import udp_echo

    proc = subprocess.Popen([sys.executable, str(common.UDP_ECHO), "serve", "127.0.0.1", "0"])
    try:
        comm = Path(f"/proc/{proc.pid}/comm")
        deadline = time.monotonic() + 30
        while comm.read_text().strip() != udp_echo.SERVER_NAME and time.monotonic() < deadline:
            time.sleep(0.05)
        assert comm.read_text().strip() == udp_echo.SERVER_NAME
    finally:
        proc.kill()
        proc.wait()
    assert len(udp_echo.SERVER_NAME) <= 15 and len(udp_echo.CLIENT_NAME) <= 15  # the kernel keeps 15 characters
    assert udp_echo.CLIENT_NAME in latency_trace.CLIENTS and udp_echo.SERVER_NAME == latency_trace.SERVER
