"""Websetup server and client: authentication, replay, rate limiting, argument checks, secrecy, the socket."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from husarnet_ros.core import websetup_proto as wp
from husarnet_ros.core.hosts import HostsFile, HostsSync
from husarnet_ros.core.identity import format_address, parse_address
from husarnet_ros.core.websetup import (
    WebsetupClient,
    WebsetupError,
    WebsetupServer,
    WebsetupStateError,
    default_overlay_source,
    read_secret,
)
from husarnet_ros.core.whitelist import Whitelist

OWN = parse_address("fc94::1")
OP = parse_address("fc94::10")  # the operator's dashboard
OP2 = parse_address("fc94::20")  # a second dashboard
MAL = parse_address("fc94::66")  # websetup-whitelisted, but does not know the secret
STRANGER = parse_address("fc94::77")  # not on the websetup whitelist
PEER_X = parse_address("fc94::a")
PEER_Y = parse_address("fc94::b")
PEER_Z = parse_address("fc94::c")
HOSTS_ORIGINAL = b"127.0.0.1 localhost\n::1 ip6-localhost\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def src_of(addr: bytes, port: int = 40000) -> tuple:
    return (format_address(addr), port, 0, 0)


class Lab:
    """A server on a temporary state dir with a hosts file, plus helpers to talk to it as a given sender."""

    def __init__(self, tmp: Path, **kw: object) -> None:
        self.tmp = tmp
        self.clock = FakeClock()
        self.hosts_path = tmp / "hosts"
        if not self.hosts_path.exists():
            self.hosts_path.write_bytes(HOSTS_ORIGINAL)
        self.whitelist = Whitelist(tmp / "whitelist.json", kw.pop("static", ()))  # type: ignore[arg-type]
        self.whitelist_events: list[tuple[str, bytes | None]] = []
        self.whitelist.add_listener(lambda k, a: self.whitelist_events.append((k, a)))
        self.sync = HostsSync(HostsFile(self.hosts_path), OWN, whitelist=self.whitelist)
        self.server = self._server(**kw)
        self.counter = 0

    def _server(self, **kw: object) -> WebsetupServer:
        args: dict = {
            "websetup_whitelist": [format_address(a) for a in (OP, OP2, MAL)],
            "hosts_hook": self.sync.source_hook("websetup"),
            "get_latency": lambda: {PEER_X: 12.5, PEER_Y: 3.25},
            "version": "husarnet_ros 0.1.0",
            "clock": self.clock,
        }
        args.update(kw)
        return WebsetupServer(self.tmp / "state", self.whitelist, **args)

    def restart(self) -> None:
        self.server = self._server()

    @property
    def secret(self) -> bytes:
        return self.server.secret

    def msg(self, command: str, args=(), *, sender: bytes = OP, counter: int | None = None, secret=None) -> bytes:
        if counter is None:
            self.counter += 1
            counter = self.counter
        return wp.build_command(secret or self.secret, sender, counter, command, list(args))

    def send(self, command: str, args=(), *, sender: bytes = OP, secret=None, counter=None) -> wp.Reply | None:
        secret = secret or self.secret
        data = self.msg(command, args, sender=sender, counter=counter, secret=secret)
        out = self.server.handle(data, src_of(sender))
        return None if out is None else wp.parse_reply(out, secret, sender)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


# --- state file and secret --------------------------------------------------------------------


def test_secret_created_private_and_stable(lab: Lab) -> None:
    path = lab.tmp / "state" / "websetup.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(lab.secret) == 32 and lab.secret != bytes(32)
    obj = json.loads(path.read_text())
    assert obj["secret"] == lab.secret.hex()
    assert obj["whitelist"] == [format_address(a) for a in (OP, OP2, MAL)]
    lab.restart()
    assert lab.server.secret == bytes.fromhex(obj["secret"])
    assert read_secret(lab.tmp / "state") == lab.secret
    assert lab.secret.hex() not in repr(lab.server._state)


def test_unsafe_or_corrupt_state_refused_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Lab(tmp_path)
    path = state / "websetup.json"
    os.chmod(path, 0o644)
    with pytest.raises(WebsetupStateError, match="chmod 600"):
        WebsetupServer(state, Whitelist(tmp_path / "wl.json"))
    os.chmod(path, 0o600)
    path.write_bytes(b'{"format": 1, "secret": "zz"')
    with pytest.raises(WebsetupStateError, match=r"websetup\.json"):
        WebsetupServer(state, Whitelist(tmp_path / "wl.json"))
    assert path.read_bytes() == b'{"format": 1, "secret": "zz"'
    with pytest.raises(WebsetupStateError, match="does not exist"):
        read_secret(tmp_path / "nowhere")


# --- the happy path ----------------------------------------------------------------------------


def test_ping_version_latency(lab: Lab) -> None:
    r = lab.send("ping")
    assert r is not None and r.ok and r.fields == ("pong",) and r.counter == lab.counter
    assert lab.send("get-version").fields == ("husarnet_ros 0.1.0",)
    assert lab.send("get-latency").fields == ("fc94::a 12.500", "fc94::b 3.250")
    st = lab.server.status()
    assert st["last_command"]["command"] == "get-latency" and st["last_command"]["from"] == "fc94::10"
    assert st["counters"]["accepted"] == 3
    assert st["websetup_whitelist"] == ["fc94::10", "fc94::20", "fc94::66"]


def test_whitelist_commands_and_states(lab: Lab) -> None:
    assert lab.send("whitelist-ls").fields == ("enabled", "0")  # enabled and empty: deny all
    assert not lab.whitelist.is_allowed(PEER_X)
    assert lab.send("whitelist-add", ["fc94::a", "robot1"]).fields == ("added",)
    assert lab.whitelist.entries() == {PEER_X: "robot1"}
    assert HostsFile(lab.hosts_path).read_block()["robot1"] == PEER_X
    assert lab.send("whitelist-ls").fields == ("enabled", "1", "fc94::a robot1")
    assert lab.send("whitelist-disable").fields == ("changed",)
    assert not lab.whitelist.enabled and lab.whitelist.is_allowed(PEER_Y)
    assert lab.send("whitelist-ls").fields[0] == "disabled"
    assert lab.send("whitelist-enable").fields == ("changed",)
    assert lab.send("whitelist-enable").fields == ("unchanged",)
    assert not lab.whitelist.is_allowed(PEER_Y)
    assert lab.send("whitelist-rm", ["fc94::a"]).fields == ("removed",)
    assert lab.send("whitelist-rm", ["fc94::a"]).fields == ("not listed",)
    assert lab.whitelist.entries() == {}
    assert Whitelist(lab.tmp / "whitelist.json").entries() == {}


def test_whitelist_ls_pages(tmp_path: Path) -> None:
    entries = {f"fc94::1:{i:x}": f"robot{i}" for i in range(300)}
    (tmp_path / "whitelist.json").write_text(json.dumps({"format": 1, "entries": entries}))
    lab = Lab(tmp_path)
    got: list[str] = []
    while True:
        r = lab.send("whitelist-ls", [str(len(got))])
        assert r.ok and r.fields[1] == "300"
        if len(r.fields) == 2:
            break
        got.extend(r.fields[2:])
    assert len(got) == 300 and len(set(got)) == 300


def test_host_add_rm_persist_across_restart(lab: Lab) -> None:
    assert lab.send("host-add", ["fc94::b", "Printer"]).fields == ("added",)
    assert HostsFile(lab.hosts_path).read_block()["Printer"] == PEER_Y
    assert lab.hosts_path.read_bytes().startswith(HOSTS_ORIGINAL)
    assert not lab.whitelist.is_allowed(PEER_Y)  # a name is not an access grant
    lab.hosts_path.write_bytes(HOSTS_ORIGINAL)  # e.g. the OS rewrote it
    lab.restart()
    assert HostsFile(lab.hosts_path).read_block()["Printer"] == PEER_Y
    assert lab.send("host-rm", ["printer"]).fields == ("removed",)
    assert "Printer" not in HostsFile(lab.hosts_path).read_block()


def test_cleanup_removes_exactly_what_websetup_added(tmp_path: Path) -> None:
    lab = Lab(tmp_path, static=[format_address(PEER_Z)])
    lab.whitelist.add(PEER_Y, "ros-added")  # e.g. through the ROS service
    lab.send("whitelist-add", ["fc94::a"])
    lab.send("whitelist-add", ["fc94::b", "renamed"])  # already listed: not websetup's
    lab.send("host-add", ["fc94::a", "viaweb"])
    lab.send("whitelist-disable")
    r = lab.send("cleanup")
    assert r.ok and r.fields == ("removed 1 whitelist entries and 1 host names",)
    assert lab.whitelist.entries() == {PEER_Y: "renamed", PEER_Z: ""}
    assert not lab.whitelist.enabled  # the enabled flag is not websetup's to reset
    assert "viaweb" not in HostsFile(lab.hosts_path).read_block()
    assert lab.send("ping").ok  # websetup whitelist, counters and secret untouched


def test_change_secret(lab: Lab) -> None:
    old = lab.secret
    new = bytes(range(100, 132))
    r = lab.send("change-secret", [new.hex()], secret=old)  # reply authenticated with the old secret
    assert r is not None and r.ok
    assert lab.server.secret == new
    assert lab.send("ping", secret=old) is None
    assert lab.server.counters.get("bad_mac") == 1
    assert lab.send("ping", secret=new).ok
    lab.restart()
    assert lab.server.secret == new
    assert lab.send("change-secret", ["zz" * 32], secret=new).ok is False
    assert lab.server.secret == new


# --- authentication and replay ------------------------------------------------------------------


def test_wrong_hmac_truncated_mac_unknown_version_silent(lab: Lab) -> None:
    before = lab.whitelist.entries()
    bad_secret = lab.msg("whitelist-add", ["fc94::a"], secret=bytes(32))
    assert lab.server.handle(bad_secret, src_of(OP)) is None
    good = lab.msg("whitelist-add", ["fc94::a"])
    assert lab.server.handle(good[:-1], src_of(OP)) is None
    assert lab.server.handle(good[:-32], src_of(OP)) is None
    assert lab.server.handle(b"\x09" + good[1:], src_of(OP)) is None
    c = lab.server.counters
    assert (c.get("bad_mac"), c.get("malformed"), c.get("bad_version")) == (1, 2, 1)
    assert lab.whitelist.entries() == before and lab.whitelist_events == []
    assert lab.server.status()["last_command"] is None


def test_compare_digest_is_used(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = wp.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(wp.hmac, "compare_digest", spy)
    msg = lab.msg("ping", secret=bytes(32))
    assert lab.server.handle(msg, src_of(OP)) is None
    assert len(calls) == 1 and calls[0][1] == msg[-32:] and calls[0][0] != msg[-32:]
    assert lab.send("ping").ok
    # The server's check of the good request (the test's parse_reply adds one more).
    assert len(calls) == 3 and calls[1][0] == calls[1][1]


def test_same_message_twice_and_older_counter(lab: Lab) -> None:
    msg = lab.msg("whitelist-add", ["fc94::a"], counter=50)
    assert lab.server.handle(msg, src_of(OP)) is not None
    assert lab.server.handle(msg, src_of(OP)) is None
    assert lab.send("whitelist-rm", ["fc94::a"], counter=49) is None
    assert lab.server.counters.get("replay") == 2
    assert lab.whitelist_events == [("add", PEER_X)]
    assert lab.send("ping", counter=51).ok


def test_replay_after_restart(lab: Lab) -> None:
    msg = lab.msg("whitelist-add", ["fc94::a"], counter=7)
    assert lab.server.handle(msg, src_of(OP)) is not None
    lab.whitelist.remove(PEER_X)
    lab.restart()
    assert lab.server.handle(msg, src_of(OP)) is None
    assert lab.server.counters.get("replay") == 1
    assert not lab.whitelist.is_allowed(PEER_X)


def test_counters_are_per_sender_and_bound_to_sender(lab: Lab) -> None:
    a = lab.msg("whitelist-add", ["fc94::a"], sender=OP, counter=100)
    assert lab.server.handle(a, src_of(OP)) is not None
    lab.whitelist.remove(PEER_X)
    # OP2 has its own counter (still 0), but OP's message does not authenticate as OP2's.
    assert lab.server.handle(a, src_of(OP2)) is None
    assert lab.server.counters.get("bad_mac") == 1
    assert not lab.whitelist.is_allowed(PEER_X)
    assert lab.send("ping", sender=OP2, counter=1).ok  # OP2's own low counter is fine


def test_fifty_concurrent_copies_applied_once(lab: Lab) -> None:
    msg = lab.msg("whitelist-add", ["fc94::a", "robot1"])
    barrier = threading.Barrier(50)
    replies: list[bytes | None] = []
    lock = threading.Lock()

    def fire() -> None:
        barrier.wait()
        out = lab.server.handle(msg, src_of(OP))
        with lock:
            replies.append(out)

    threads = [threading.Thread(target=fire) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 50
    assert sum(r is not None for r in replies) == 1
    assert lab.whitelist_events == [("add", PEER_X)]
    assert lab.server.counters.get("replay") == 49
    assert lab.server.counters.get("accepted") == 1


def test_counter_persisted_before_apply(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*a: object, **k: object) -> None:
        raise OSError("read-only file system")

    monkeypatch.setattr("husarnet_ros.core.websetup.atomic_write_json", broken)
    assert lab.send("whitelist-add", ["fc94::a"]) is None
    assert lab.server.counters.get("state_error") == 1
    assert lab.whitelist.entries() == {}
    monkeypatch.undo()
    assert lab.send("whitelist-add", ["fc94::a"], counter=lab.counter).ok  # the counter was not consumed


# --- who may talk ---------------------------------------------------------------------------------


def test_non_websetup_whitelisted_sender_ignored(lab: Lab) -> None:
    lab.whitelist.add(STRANGER)  # a whitelisted *peer* is not a websetup sender
    assert lab.send("whitelist-disable", sender=STRANGER) is None
    assert lab.server.counters.get("not_whitelisted") == 1
    assert lab.whitelist.enabled


@pytest.mark.parametrize("host", ["fd00::10", "198.18.0.10", "::ffff:198.18.0.10", "::1", "garbage", "fe80::1%eth0"])
def test_non_overlay_source_ignored(lab: Lab, host: str) -> None:
    msg = lab.msg("whitelist-disable")
    assert lab.server.handle(msg, (host, 5580)) is None
    assert lab.server.counters.get("not_overlay") == 1
    assert lab.whitelist.enabled


def test_default_overlay_source() -> None:
    assert default_overlay_source(("fc94::10", 1, 0, 0)) == OP
    assert default_overlay_source(("fc94::10%hnet0", 1, 0, 0)) == OP
    assert default_overlay_source(("fd00::1", 1)) is None
    assert default_overlay_source(()) is None


def test_empty_websetup_whitelist_denies_all(tmp_path: Path) -> None:
    lab = Lab(tmp_path, websetup_whitelist=[])
    assert lab.send("ping") is None
    assert lab.server.counters.get("not_whitelisted") == 1


# --- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("host-add", ["fc94::a", "robot\n198.18.0.66 evil"]),
        ("host-add", ["fc94::a", "x" * 300]),
        ("host-add", ["fc94::a", "husarnet-local"]),
        ("host-add", ["198.18.0.1", "robot1"]),
        ("host-add", ["fc94::a"]),
        ("whitelist-add", ["fd00::1"]),
        ("whitelist-add", ["fc94::a", "bad name"]),
        ("whitelist-add", ["fc94::a", "b", "c"]),
        ("whitelist-ls", ["-1"]),
        ("ping", ["extra"]),
        ("change-secret", ["00" * 31]),
    ],
)
def test_bad_arguments_error_reply_and_no_change(lab: Lab, command: str, args: list[str]) -> None:
    hosts_before = lab.hosts_path.read_bytes()
    state_before = json.loads((lab.tmp / "state" / "websetup.json").read_text())
    r = lab.send(command, args)
    assert r is not None and not r.ok and r.fields and r.fields[0]
    assert lab.hosts_path.read_bytes() == hosts_before
    assert lab.whitelist.entries() == {} and lab.whitelist_events == []
    state_after = json.loads((lab.tmp / "state" / "websetup.json").read_text())
    state_before["counters"] = state_after["counters"]  # only the consumed counter moved
    assert state_after == state_before
    assert lab.server.counters.get("bad_args") == 1


def test_ten_kilobyte_name_rejected_hosts_identical(lab: Lab) -> None:
    hosts_before = lab.hosts_path.read_bytes()
    name = ("x" * 10_000).encode()
    payload = b"\x00\x07fc94::a" + len(name).to_bytes(2, "big") + name
    body = wp.HEADER.pack(wp.VERSION, 1, wp.COMMANDS["host-add"], len(payload)) + payload
    msg = body + wp.compute_mac(lab.secret, OP, body)
    assert lab.server.handle(msg, src_of(OP)) is None
    assert lab.server.counters.get("malformed") == 1
    assert lab.hosts_path.read_bytes() == hosts_before
    with pytest.raises(ValueError):
        lab.msg("host-add", ["fc94::a", "x" * 10_000])


def test_hosts_hook_failure_is_an_error_reply(tmp_path: Path) -> None:
    def broken(mapping: dict) -> None:
        raise PermissionError("/etc/hosts")

    lab = Lab(tmp_path, hosts_hook=broken)
    r = lab.send("host-add", ["fc94::a", "robot1"])
    assert r is not None and not r.ok and "hosts file" in r.fields[0]


# --- secrecy ------------------------------------------------------------------------------------------


def test_secret_and_macs_never_logged(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    old = lab.secret
    new = bytes(range(200, 232))
    macs: list[bytes] = []
    for args in (("ping", ()), ("whitelist-add", ("fc94::a", "robot1")), ("host-add", ("fc94::a", "bad\nname"))):
        m = lab.msg(*args)
        macs.append(m[-32:])
        lab.server.handle(m, src_of(OP))
    bad = lab.msg("ping", secret=bytes(32))
    macs.append(bad[-32:])
    lab.server.handle(bad, src_of(OP))
    lab.server.handle(bad, src_of(MAL))
    lab.server.handle(lab.msg("ping")[:-3], src_of(OP))
    lab.send("change-secret", [new.hex()], secret=old)
    lab.send("change-secret", ["zz" * 32], secret=new)
    lab.restart()
    lab.send("ping", secret=new)
    assert caplog.records, "expected some log output to check"
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    for secret in (old, new):
        for needle in (secret.hex(), secret.hex().upper(), repr(secret)[2:-1], secret.hex()[:16]):
            assert needle not in text
    for mac in macs:
        assert mac.hex()[:16] not in text and repr(mac)[2:-1] not in text
    assert new.hex() not in str(lab.server.status())


# --- rate limiting ---------------------------------------------------------------------------------------


def test_flood_does_not_lock_out_the_operator(lab: Lab) -> None:
    bad = [lab.msg("whitelist-disable", sender=MAL, secret=bytes(32), counter=i + 1) for i in range(5000)]
    for m in bad:
        assert lab.server.handle(m, src_of(MAL)) is None
    c = lab.server.counters
    assert c.get("bad_mac") == 10  # the burst, then only cheap drops
    assert c.get("rate_limited") == 4990
    # The operator, who never failed, is not affected at all (no time passes).
    r = lab.send("whitelist-add", ["fc94::a"])
    assert r is not None and r.ok
    assert lab.whitelist.enabled
    # Mallory with the right secret is still limited until her bucket refills...
    good_mal = lab.msg("ping", sender=MAL, counter=10_000)
    assert lab.server.handle(good_mal, src_of(MAL)) is None
    lab.clock.now += 1.5
    assert lab.server.handle(good_mal, src_of(MAL)) is not None


def test_global_bucket_only_limits_senders_that_failed(tmp_path: Path) -> None:
    floods = [parse_address(f"fc94::f:{i:x}") for i in range(30)]
    lab = Lab(tmp_path, websetup_whitelist=[format_address(a) for a in [OP, *floods]])
    for addr in floods:
        for i in range(10):
            lab.server.handle(lab.msg("ping", sender=addr, secret=bytes(32), counter=i + 1), src_of(addr))
    c = lab.server.counters
    # Ten senders spend the global burst (100); each later sender, having no failure history, gets
    # exactly one try and is then held by the empty global bucket.
    assert c.get("bad_mac") == 100 + 20
    assert c.get("rate_limited") == 300 - 120
    assert lab.send("ping").ok  # the operator still gets through


def test_transient_failures_recover(lab: Lab) -> None:
    for _ in range(10):
        lab.send("ping", secret=bytes(32))
    assert lab.send("ping") is None  # the operator's own burst is spent
    assert lab.server.counters.get("rate_limited") == 1
    lab.clock.now += 1.0
    assert lab.send("ping").ok


# --- the real socket and the client ------------------------------------------------------------------


def test_client_counter_persisted_and_increasing(tmp_path: Path) -> None:
    store = tmp_path / "client.json"
    clock = FakeClock()
    client = WebsetupClient(bytes(32), store, wallclock=clock)
    first = client.next_counter()
    assert first == 1_000_000_000
    clock.now -= 500  # the clock steps backwards
    again = WebsetupClient(bytes(32), store, wallclock=clock)
    assert again.next_counter() == first + 1
    assert json.loads(store.read_text())["counter"] == first + 1
    assert "0000" not in repr(again)


def test_socket_round_trip_on_loopback(lab: Lab, tmp_path: Path) -> None:
    # Loopback stands in for the overlay: the injected predicate maps ::1 to the operator's address.
    server = lab._server(overlay_source=lambda src: OP if src[0] == "::1" else None)
    threads_before = threading.active_count()
    client = WebsetupClient(server.secret, tmp_path / "client.json", source_address=OP)

    async def main() -> tuple:
        await server.start("::1", 0)
        port = server.status()["port"]
        client.port = port
        loop = asyncio.get_running_loop()
        ping = await loop.run_in_executor(None, client.send, "::1", "ping", (), 5.0)
        add = await loop.run_in_executor(None, client.send, "::1", "whitelist-add", ("fc94::a", "robot1"), 5.0)
        new = bytes(range(50, 82))
        changed = await loop.run_in_executor(None, client.send, "::1", "change-secret", (new.hex(),), 5.0)
        after = await loop.run_in_executor(None, client.send, "::1", "ping", (), 5.0)
        wrong = WebsetupClient(bytes(32), tmp_path / "wrong.json", source_address=OP, port=port)
        with pytest.raises(WebsetupError, match="timeout"):
            await loop.run_in_executor(None, wrong.send, "::1", "ping", (), 0.5)
        listening = server.status()["listening"]
        server.close()
        return ping, add, changed, after, listening

    ping, add, changed, after, listening = asyncio.run(main())
    assert listening
    assert ping.ok and ping.fields == ("pong",)
    assert add.ok and lab.whitelist.entries() == {PEER_X: "robot1"}
    assert changed.ok and client.secret == server.secret == bytes(range(50, 82))
    assert after.ok
    assert server.counters.get("bad_mac") >= 1
    server.close()  # idempotent
    assert not server.status()["listening"]
    assert threading.active_count() <= threads_before


def test_socket_ignores_non_overlay_sources(lab: Lab, tmp_path: Path) -> None:
    server = lab._server()  # default predicate: ::1 is not fc94, so it is ignored
    client = WebsetupClient(server.secret, tmp_path / "client.json", source_address=OP)

    async def main() -> None:
        await server.start("::1", 0)
        client.port = server.status()["port"]
        loop = asyncio.get_running_loop()
        try:
            with pytest.raises(WebsetupError, match="timeout"):
                await loop.run_in_executor(None, client.send, "::1", "ping", (), 0.5)
        finally:
            server.close()

    asyncio.run(main())
    assert server.counters.get("not_overlay") == 1
    assert server.counters.get("accepted") == 0


# --- underlay packets addressed to our overlay address (root) -------------------------------------

_NETNS_SERVER = """
import asyncio, fcntl, json, os, struct, sys
from pathlib import Path
from husarnet_ros.core import websetup_proto as wp
from husarnet_ros.core.identity import parse_address
from husarnet_ros.core.websetup import WebsetupServer
from husarnet_ros.core.whitelist import Whitelist

state, bind_device = Path(sys.argv[1]), sys.argv[2] == "1"
# Attach to the persistent TUN standing in for hnet0 (carrier up while we hold it).
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH", b"hnetf", 0x0001 | 0x1000))  # TUNSETIFF, IFF_TUN|IFF_NO_PI
server = WebsetupServer(state, Whitelist(state / "whitelist.json"), websetup_whitelist=["fc94::66"])
src, dst = parse_address("fc94::66"), parse_address("fc94::1")

def udp6(payload, counter_port):
    udp_len = 8 + len(payload)
    pseudo = src + dst + struct.pack(">I3xB", udp_len, 17)
    data = pseudo + struct.pack(">HHHH", counter_port, 5580, udp_len, 0) + payload
    if len(data) % 2:
        data += b"\\0"
    total = sum(struct.unpack(">%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    csum = (~total & 0xFFFF) or 0xFFFF
    udp = struct.pack(">HHHH", counter_port, 5580, udp_len, csum) + payload
    return struct.pack(">IHBB", 6 << 28, udp_len, 17, 64) + src + dst + udp

async def main():
    await server.start("fc94::1", 5580, interface="hnetf" if bind_device else None)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # the underlay sender is done
    await asyncio.sleep(0.5)
    print(json.dumps(server.status()["counters"]), flush=True)
    secret = server.secret
    for i in range(3):  # now the same kind of request arriving through the overlay device
        os.write(tun, udp6(wp.build_command(secret, src, 100 + i, "ping"), 40000 + i))
    await asyncio.sleep(0.5)
    server.close()

asyncio.run(main())
print(json.dumps(server.status()["counters"]), flush=True)
"""

_NETNS_SENDER = """
import socket, sys
from husarnet_ros.core.identity import parse_address
from husarnet_ros.core.websetup import read_secret
from husarnet_ros.core import websetup_proto as wp
secret = read_secret(sys.argv[1])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("fc94::66", 0))
for i in range(3):
    s.sendto(wp.build_command(secret, parse_address("fc94::66"), i + 1, "ping"), ("fc94::1", 5580))
"""


def _run(*cmd: str) -> None:
    import subprocess

    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


@pytest.mark.netns
@pytest.mark.parametrize("bind_device", [False, True])
def test_underlay_packets_to_overlay_address_ignored(tmp_path: Path, bind_device: bool) -> None:
    """A LAN host that routes fc94::/16 at us with a forged overlay source reaches a socket that is only bound
    to our fc94 address (weak host model: the control case); bound to the overlay device it does not, while
    requests arriving through the device (the TUN) still work."""
    import subprocess
    import sys

    ns_a, ns_b = f"wsF{os.getpid()}a", f"wsF{os.getpid()}b"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    state = tmp_path / "state"
    try:
        _run("ip", "netns", "add", ns_a)
        _run("ip", "netns", "add", ns_b)
        _run("ip", "link", "add", "wsfa0", "netns", ns_a, "type", "veth", "peer", "name", "wsfb0", "netns", ns_b)
        for ns, dev, addr in ((ns_a, "wsfa0", "fd00:f5::1/64"), (ns_b, "wsfb0", "fd00:f5::2/64")):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", addr, "dev", dev, "nodad")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        _run("ip", "-n", ns_a, "tuntap", "add", "dev", "hnetf", "mode", "tun")
        _run("ip", "-n", ns_a, "addr", "add", "fc94::1/16", "dev", "hnetf", "nodad")
        _run("ip", "-n", ns_a, "link", "set", "hnetf", "up")
        _run("ip", "-n", ns_b, "addr", "add", "fc94::66/128", "dev", "lo", "nodad")
        _run("ip", "-n", ns_b, "route", "add", "fc94::/16", "via", "fd00:f5::1")
        # Let the veth link and neighbour discovery settle before the one-shot datagrams.
        _run("ip", "netns", "exec", ns_b, "ping", "-c", "1", "-w", "5", "fd00:f5::1")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns_a, sys.executable, "-c", _NETNS_SERVER, str(state), "1" if bind_device else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None and server.stdin is not None
            assert server.stdout.readline().strip() == "ready"
            subprocess.run(
                ["ip", "netns", "exec", ns_b, sys.executable, "-c", _NETNS_SENDER, str(state)],
                check=True, env=env, timeout=20, capture_output=True,
            )  # fmt: skip
            server.stdin.write("go\n")
            server.stdin.flush()
            after_underlay = json.loads(server.stdout.readline())
            after_tun = json.loads(server.stdout.readline())
        finally:
            server.wait(timeout=20)
            for f in (server.stdin, server.stdout):
                if f:
                    f.close()
        if bind_device:
            assert after_underlay["accepted"] == 0, after_underlay
        else:  # the control: without the device binding the forged underlay requests are applied
            assert after_underlay["accepted"] == 3, after_underlay
        assert after_tun["accepted"] - after_underlay["accepted"] == 3, after_tun
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def test_status_never_waits_for_a_running_request(tmp_path: Path) -> None:
    """A hook may wait for the engine's loop; that loop asking for status meanwhile must not deadlock."""
    finished: list[bool] = []
    box: dict[str, WebsetupServer] = {}

    def latency_waiting_for_the_loop() -> dict[bytes, float]:
        loop_thread = threading.Thread(target=lambda: (box["s"].status(), box["s"].hosts(), lab.whitelist.entries()))
        loop_thread.start()
        loop_thread.join(5)
        finished.append(not loop_thread.is_alive())
        return {}

    lab = Lab(tmp_path, get_latency=latency_waiting_for_the_loop)
    box["s"] = lab.server
    assert lab.send("get-latency").ok
    assert finished == [True]
