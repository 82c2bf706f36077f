"""husarnet-ros commands that need no ROS node: usage errors, genid, ip from a state dir, formatting."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from husarnet_ros import cli
from husarnet_ros.core.identity import Identity

PKG = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["whitelist"], ["whitelist", "add"], ["wait"], ["wait", "peer"], ["--timeout", "x", "status"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(argv, capsys)
    assert code == cli.EXIT_USAGE
    assert "usage" in err


def test_genid_prints_a_valid_identity(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["genid"], capsys)
    assert code == 0
    ident = Identity.parse(out)
    assert out.split()[0] == ident.address_str
    _, out2, _ = run(["genid"], capsys)
    assert Identity.parse(out2).address != ident.address


def test_genid_out_is_private_and_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "id"
    code, stdout, err = run(["genid", "--out", str(out)], capsys)
    assert code == 0 and stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    first = Identity.load(out)
    assert first.address_str in err
    code, _, err = run(["genid", "--out", str(out)], capsys)
    assert code == cli.EXIT_FAILED and "--force" in err
    assert Identity.load(out).address == first.address
    code, _, _ = run(["genid", "--out", str(out), "--force"], capsys)
    assert code == 0 and Identity.load(out).address != first.address


def test_ip_from_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ident = Identity.generate()
    ident.save(tmp_path / "id")
    code, out, _ = run(["ip", "--state-dir", str(tmp_path)], capsys)
    assert code == 0 and out.strip() == ident.address_str
    code, _, err = run(["ip", "--state-dir", str(tmp_path / "missing")], capsys)
    assert code == cli.EXIT_FAILED and "identity" in err
    (tmp_path / "id").chmod(0o644)  # readable by others: refused with the fix, not a traceback
    code, _, err = run(["ip", "--state-dir", str(tmp_path)], capsys)
    assert code == cli.EXIT_FAILED and "chmod 600" in err


def test_setup_tun_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["setup-tun"], capsys)
    assert code == cli.EXIT_USAGE and "--user" in err
    code, _, err = run(["setup-tun", "--user", "no-such-user-hnet"], capsys)
    assert code == cli.EXIT_USAGE and "no such user" in err


def test_setup_tun_refuses_a_directory_that_is_not_node_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run as root, setup-tun hands the state directory to USER: a mistyped --state-dir must give nothing away."""
    (tmp_path / "thesis.tex").write_text("someone else's work")
    (tmp_path / ".id.abc.tmp").write_text("")  # a leftover of an atomic write is state, not foreign
    (tmp_path / ".whitelist.json.k2j3.tmp").write_text("")
    (tmp_path / "endpoints.json").write_text("{}")  # the node's endpoint cache
    before = (tmp_path / "thesis.tex").stat().st_uid
    code, _, err = run(
        ["setup-tun", "--user", "nobody", "--state-dir", str(tmp_path), "--interface", "hnt-never"], capsys
    )
    assert code == cli.EXIT_USAGE and "thesis.tex" in err and "dedicated" in err
    assert "whitelist" not in err and "endpoints" not in err and ".id" not in err  # only the foreign file
    assert (tmp_path / "thesis.tex").stat().st_uid == before
    assert not (tmp_path / "id").exists()  # refused before anything was created


def test_setup_tun_with_an_unsafe_id_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Identity.generate().save(tmp_path / "id")
    (tmp_path / "id").chmod(0o644)
    code, _, err = run(
        ["setup-tun", "--user", "nobody", "--state-dir", str(tmp_path), "--interface", "hnt-never"], capsys
    )
    assert code == cli.EXIT_FAILED and "chmod 600" in err and "Traceback" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_setup_tun_gives_only_the_node_files_to_the_user(tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    Identity.generate().save(tmp_path / "id")
    (tmp_path / "dds").mkdir()
    (tmp_path / "dds" / "dds.env").write_text("")
    (tmp_path / ".profile").write_text("")  # hidden, not ours: left alone
    cli._give_state_dir(tmp_path, nobody.pw_uid, nobody.pw_gid)
    for p in (tmp_path, tmp_path / "id", tmp_path / "dds", tmp_path / "dds" / "dds.env"):
        assert p.stat().st_uid == nobody.pw_uid, p
    assert (tmp_path / ".profile").stat().st_uid == os.geteuid()


def test_websetup_without_secret_or_state(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("HUSARNET_WEBSETUP_SECRET", raising=False)
    code, _, err = run(["websetup", "send", "fc94::1", "ping"], capsys)
    assert code == cli.EXIT_USAGE and "secret" in err
    monkeypatch.setenv("HUSARNET_WEBSETUP_SECRET", "abcd")
    code, _, err = run(["websetup", "send", "fc94::1", "ping"], capsys)
    assert code == cli.EXIT_USAGE and "32 bytes" in err
    code, _, err = run(["websetup", "secret", "--state-dir", str(tmp_path)], capsys)
    assert code == cli.EXIT_FAILED and "start the node" in err


def test_websetup_secret_file_must_be_private(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "secret"
    f.write_text("00" * 32)
    f.chmod(0o644)
    code, _, err = run(["websetup", "send", "fc94::1", "ping", "--secret-file", str(f)], capsys)
    assert code == cli.EXIT_FAILED and "chmod 600" in err


def kv(d: dict) -> list:
    return [SimpleNamespace(key=k, value=str(v)) for k, v in d.items()]


def fake_status(**over: object) -> SimpleNamespace:
    base = {
        "address": "fc94::1",
        "hostname": "robot1",
        "interface_name": "hnet0",
        "base_connection": "udp",
        "base_address": "base.example.org:443",
        "whitelist_enabled": True,
        "dds_env_file": "/var/lib/husarnet_ros/dds/dds.env",
        "dds_restart_needed": False,
        "failure": "",
        "warning": "",
        "websetup_enabled": True,
        "websetup_port": 5580,
        "websetup": kv({"last_command": "ping"}),
        "counters": kv({"bad_mac": 3, "rx_bytes": 100, "replay": 0}),
    }
    base.update(over)
    return SimpleNamespace(**base)


def fake_peer(**over: object) -> SimpleNamespace:
    p = {
        "address": "fc94::2",
        "hostname": "laptop",
        "path": "direct",
        "endpoint": "198.18.0.2:5582",
        "rtt_ms": 12.5,
        "is_whitelisted": True,
        "is_secure": True,
        "last_seen": SimpleNamespace(sec=1000, nanosec=0),
        "rx_bytes": 2048,
        "tx_bytes": 10,
        "session_age": 5.0,
        "cipher": "chacha20-poly1305",
    }
    p.update(over)
    return SimpleNamespace(**p)


def test_status_formatting_and_json_shape() -> None:
    peers = SimpleNamespace(peers=[fake_peer(), fake_peer(address="fc94::3", hostname="", path="none", rtt_ms=-1.0)])
    d = cli.status_dict(fake_status(dds_restart_needed=True), peers)
    json.dumps(d)  # serialisable
    assert d["counters"] == {"bad_mac": 3, "rx_bytes": 100, "replay": 0}
    assert d["peers"][1]["rtt_ms"] is None
    text = cli.format_status(d, now=1010)
    assert "fc94::1" in text and "udp (base.example.org:443)" in text
    assert "RESTART NEEDED" in text
    assert "bad_mac=3" in text and "replay" not in text.split("drops")[1].splitlines()[0]
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("PEER"))
    assert "PATH" in header and "RTT" in header
    assert any("laptop" in line and "12.5 ms" in line and "10 s ago" in line for line in lines)
    assert any("fc94::3" in line and " none " in line for line in lines)
    assert "FAILED" not in text
    empty = cli.format_status(cli.status_dict(fake_status(), SimpleNamespace(peers=[])))
    assert "no peers" in empty
    gone = "TUN device 'hnet0' is gone: it was deleted while husarnet_ros was using it"
    failed = cli.format_status(cli.status_dict(fake_status(failure=gone), SimpleNamespace(peers=[])))
    assert failed.splitlines()[0] == f"FAILED     {gone}"


def test_entry_point_runs_without_ros_environment(tmp_path: Path) -> None:
    """genid works in a bare environment (as under sudo): the CLI imports rclpy only when needed."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PKG)}
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from husarnet_ros.cli import main; code = main(['genid']); "
            "sys.exit(code or 10 * ('rclpy' in sys.modules))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert Identity.parse(r.stdout)


def test_websetup_send_wiring(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """The CLI hands the secret, counter store, address, command and args to WebsetupClient.send
    (the protocol itself is tested with core/websetup) and maps the reply to output and exit code."""
    from husarnet_ros.core import websetup
    from husarnet_ros.core.websetup_proto import Reply

    calls = []

    def fake_send(self, address, command, args=(), timeout=2.0):
        calls.append((self.secret, str(self.counter_store_path), address, command, tuple(args), timeout))
        ok = command != "whitelist-rm"
        return Reply(counter=1, command=command, ok=ok, fields=("done",) if ok else ("not listed",))

    monkeypatch.setattr(websetup.WebsetupClient, "send", fake_send)
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32 + "\n")
    secret.chmod(0o600)
    store = tmp_path / "counter.json"
    argv = ["websetup", "send", "fc94::1", "whitelist-add", "fc94::2", "laptop"]
    code, out, _ = run(
        [*argv, "--secret-file", str(secret), "--counter-store", str(store), "--reply-timeout", "3"], capsys
    )
    assert code == 0 and out.strip() == "done"
    assert calls[-1] == (bytes.fromhex("ab" * 32), str(store), "fc94::1", "whitelist-add", ("fc94::2", "laptop"), 3.0)
    code, _, err = run(["websetup", "send", "fc94::1", "whitelist-rm", "fc94::2", "--secret-file", str(secret)], capsys)
    assert code == cli.EXIT_FAILED and "not listed" in err


def test_websetup_secret_prints_the_node_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from husarnet_ros.core import websetup

    secret = websetup.read_secret(tmp_path, create=True)
    code, out, _ = run(["websetup", "secret", "--state-dir", str(tmp_path)], capsys)
    assert code == 0 and out.strip() == secret.hex()


def test_status_shows_a_warning_and_keeps_cookie_totals_out_of_the_drops() -> None:
    st = fake_status(
        warning="hnet0 is down (it was set down outside husarnet_ros)",
        counters=kv({"cookie_replies_sent": 4, "tun_write_failed": 2}),
    )
    d = cli.status_dict(st, SimpleNamespace(peers=[]))
    assert d["warning"].startswith("hnet0 is down")
    text = cli.format_status(d, now=1010)
    assert text.splitlines()[0] == "WARNING    hnet0 is down (it was set down outside husarnet_ros)"
    drops = text.split("drops")[1].splitlines()[0]
    assert "tun_write_failed=2" in drops and "cookie" not in drops


class _LossyService:
    """A service whose first ``lost`` replies never arrive, as when Fast DDS drops them."""

    def __init__(self, lost: int, answer: object) -> None:
        self.lost, self.answer, self.requests = lost, answer, 0

    def call_async(self, request: object) -> SimpleNamespace:
        self.requests += 1
        done = self.requests > self.lost
        return SimpleNamespace(done=lambda: done, result=lambda: self.answer)

    def service_is_ready(self) -> bool:
        return True


def _client_for(service: _LossyService, clock: list[float]) -> cli.NodeClient:
    """A NodeClient without ROS: ``spin_until`` advances a fake clock by 0.1 s per spin."""
    c = object.__new__(cli.NodeClient)
    c.target, c.timeout = "/husarnet", 10.0
    c.node = SimpleNamespace(create_client=lambda *_: service, destroy_client=lambda _c: None)

    def spin_until(pred: Any, timeout: float) -> Any:
        end = clock[0] + timeout
        while clock[0] < end:
            value = pred()
            if value:
                return value
            clock[0] += 0.1
        return pred() or None

    c.spin_until = spin_until
    return c


_SRV = SimpleNamespace(Request=dict)


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    clock = [1000.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    return clock


def test_a_lost_reply_is_followed_by_a_resend(fake_clock: list[float]) -> None:
    answer = SimpleNamespace(success=True, message="added")
    service = _LossyService(lost=1, answer=answer)
    reply, resent = _client_for(service, fake_clock).call(_SRV, "whitelist/add")
    assert reply is answer and resent and service.requests == 2


def test_a_call_that_must_not_repeat_is_sent_once_and_times_out(fake_clock: list[float]) -> None:
    service = _LossyService(lost=1, answer=SimpleNamespace())
    with pytest.raises(cli.CliError, match="did not answer within 10 s"):
        _client_for(service, fake_clock).call(_SRV, "ping", resend=None)
    assert service.requests == 1


def test_a_service_that_never_answers_still_fails(fake_clock: list[float]) -> None:
    service = _LossyService(lost=10**6, answer=SimpleNamespace())
    with pytest.raises(cli.CliError, match="did not answer"):
        _client_for(service, fake_clock).call(_SRV, "whitelist/list")
    assert service.requests == 5  # 10 s at one request per RESEND_AFTER = 2 s


def test_rm_whose_first_reply_was_lost_reports_the_entry_gone(
    fake_clock: list[float], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lost first request may be the one that removed it: the resend's "not on the whitelist" is success."""
    gone = SimpleNamespace(success=False, message="fc94::1 is not on the whitelist")
    service = _LossyService(lost=1, answer=gone)
    monkeypatch.setattr(cli, "_with_node", lambda _args, fn: fn(_client_for(service, fake_clock)))
    args = SimpleNamespace(action="rm", address="fc94::1")
    assert cli.cmd_whitelist(args) == cli.EXIT_OK
    assert "any more: the reply to the first request was lost" in capsys.readouterr().out
    # Without a lost reply the same answer is a failure: the entry was never there.
    service.lost, service.requests = 0, 0
    assert cli.cmd_whitelist(args) == cli.EXIT_FAILED
