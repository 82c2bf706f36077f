"""DDS profile writers: structure, schema, atomic rewrite on change, env round trip, stale processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from husarnet_ros import dds
from husarnet_ros.core.constants import DEFAULT_MTU
from husarnet_ros.testing.ci import require

OWN = "fc94:b01d:1803:c477:1ac5:4cbc:e5b4:7f12"
PEER_A = "fc94:0:0:0:0:0:0:a"
PEER_B = "fc94::b"
F = {"f": dds.FASTDDS_NAMESPACE}
C = {"c": dds.CYCLONEDDS_NAMESPACE}
FASTDDS_XSD = Path(sys.prefix) / "share" / "fastdds" / "fastdds_profiles.xsd"


def texts(root: ET.Element, path: str, ns: dict[str, str]) -> list[str]:
    return [e.text or "" for e in root.iterfind(path, ns)]


def test_fastdds_profile_structure() -> None:
    data = dds.build_fastdds_xml(OWN, [PEER_B, PEER_A, OWN, PEER_B])
    root = ET.fromstring(data)
    assert root.tag == f"{{{dds.FASTDDS_NAMESPACE}}}dds"
    td = root.find("f:profiles/f:transport_descriptors/f:transport_descriptor", F)
    assert td is not None
    assert td.findtext("f:type", namespaces=F) == "UDPv6"
    assert int(td.findtext("f:maxInitialPeersRange", namespaces=F)) >= 32
    assert texts(td, "f:interfaceWhiteList/f:address", F) == [OWN]
    # One RTPS datagram fits one overlay packet (IPv6 + UDP headers).
    assert int(td.findtext("f:maxMessageSize", namespaces=F)) + 48 <= DEFAULT_MTU
    part = root.find("f:profiles/f:participant", F)
    assert part.get("is_default_profile") == "true"
    rtps = part.find("f:rtps", F)
    assert rtps.findtext("f:useBuiltinTransports", namespaces=F) == "false"
    assert texts(rtps, "f:userTransports/f:transport_id", F) == [td.findtext("f:transport_id", namespaces=F)]
    assert texts(rtps, "f:defaultUnicastLocatorList/f:locator/f:udpv6/f:address", F) == [OWN]
    assert texts(rtps, "f:builtin/f:metatrafficUnicastLocatorList/f:locator/f:udpv6/f:address", F) == [OWN]
    # Self first, then each allowed peer once, canonical text, own address not repeated.
    assert dds.peers_in_fastdds_xml(data) == [OWN, "fc94::a", "fc94::b"]


def test_fastdds_profile_follows_the_shipped_schema() -> None:
    xmlschema = require("xmlschema", "xmlschema (pinned in scripts/requirements-dev.txt) not installed")
    if not FASTDDS_XSD.exists():
        pytest.skip(f"{FASTDDS_XSD} not shipped by the fastdds wheel")
    schema = xmlschema.XMLSchema(str(FASTDDS_XSD))
    schema.validate(dds.build_fastdds_xml(OWN, [PEER_A, PEER_B]).decode())
    # The check can fail: an element the schema does not know is reported.
    bad = dds.build_fastdds_xml(OWN, []).decode().replace("<maxMessageSize>", "<maxMesageSize>")
    bad = bad.replace("</maxMessageSize>", "</maxMesageSize>")
    assert not schema.is_valid(bad)


def test_cyclonedds_config_structure() -> None:
    data = dds.build_cyclonedds_xml(OWN, [PEER_A], interface="hnet7", mtu=1280)
    root = ET.fromstring(data)
    general = root.find("c:Domain/c:General", C)
    assert general.findtext("c:Transport", namespaces=C) == "udp6"
    assert general.findtext("c:AllowMulticast", namespaces=C) == "false"
    assert [e.get("name") for e in general.iterfind("c:Interfaces/c:NetworkInterface", C)] == ["hnet7"]
    max_msg = int(general.findtext("c:MaxMessageSize", namespaces=C).rstrip("B"))
    frag = int(general.findtext("c:FragmentSize", namespaces=C).rstrip("B"))
    assert max_msg + 48 <= 1280
    assert 1025 <= frag < max_msg  # DDSI minimum fragment size, and it fits a message
    disc = root.find("c:Domain/c:Discovery", C)
    assert int(disc.findtext("c:MaxAutoParticipantIndex", namespaces=C)) >= 32
    assert disc.findtext("c:ParticipantIndex", namespaces=C) == "auto"
    assert [p.get("Address") for p in disc.iterfind("c:Peers/c:Peer", C)] == [OWN, "fc94::a"]


@pytest.mark.parametrize(
    ("own", "peers", "kwargs"),
    [
        ("not-an-address", [], {}),
        (OWN, ["198.18.0.1"], {}),
        (OWN, ["fc94::1\n<evil/>"], {}),
        (OWN, [], {"mtu": 1279}),
        (OWN, [], {"mtu": 70000}),
        (OWN, [], {"max_participants": 31}),
        (OWN, [], {"interface": "hnet0/../x"}),
        (OWN, [], {"interface": "a" * 16}),
    ],
)
def test_bad_input_is_rejected(own: str, peers: list[str], kwargs: dict) -> None:
    with pytest.raises(ValueError):
        dds.build_cyclonedds_xml(own, peers, **kwargs)


def test_env_file_round_trip(tmp_path: Path) -> None:
    files = dds.DdsFiles(tmp_path / "state dir" / "dds")
    env = dds.parse_dds_env(dds.build_dds_env(files))
    assert set(env) == set(dds.ENV_VARIABLES)
    assert env["FASTDDS_DEFAULT_PROFILES_FILE"] == str(files.fastdds)
    assert env["FASTRTPS_DEFAULT_PROFILES_FILE"] == str(files.fastdds)
    assert env["CYCLONEDDS_URI"] == files.cyclonedds.resolve().as_uri()
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SYSTEM_DEFAULT"


def test_env_file_sources_in_a_shell(tmp_path: Path) -> None:
    files = dds.DdsFiles(tmp_path / "it's here" / "dds")
    files.directory.mkdir(parents=True)
    files.env.write_bytes(dds.build_dds_env(files))
    out = subprocess.run(
        ["sh", "-c", '. "$1" && printf %s "$FASTDDS_DEFAULT_PROFILES_FILE"', "sh", str(files.env)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out == str(files.fastdds)


@pytest.mark.parametrize("line", ["FOO", "export =x", "A=b c", "rm -rf /", "A=$(x) y"])
def test_env_parser_is_strict(line: str) -> None:
    with pytest.raises(ValueError):
        dds.parse_dds_env(line + "\n")


def test_write_is_atomic_and_only_on_change(tmp_path: Path) -> None:
    d = tmp_path / "dds"
    files = dds.DdsFiles(d)
    assert dds.write_dds_config(d, OWN, [PEER_A]) is True
    for p in files.all():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    before = {p: p.stat().st_mtime_ns for p in files.all()}
    # Same allowed set (order and spelling do not matter): nothing rewritten.
    assert dds.write_dds_config(d, OWN, ["fc94::a", OWN]) is False
    assert {p: p.stat().st_mtime_ns for p in files.all()} == before
    assert dds.write_dds_config(d, OWN, [PEER_A, PEER_B]) is True
    assert dds.peers_in_fastdds_xml(files.fastdds.read_bytes()) == [OWN, "fc94::a", "fc94::b"]
    # Bad input raises before anything is written: the previous files stay.
    good = files.fastdds.read_bytes()
    with pytest.raises(ValueError):
        dds.write_dds_config(d, OWN, [PEER_A, "nonsense"])
    assert files.fastdds.read_bytes() == good
    assert sorted(os.listdir(d)) == sorted(p.name for p in files.all())  # no temp files left


def test_stale_processes_are_those_started_before_the_change(tmp_path: Path) -> None:
    d = tmp_path / "dds"
    dds.write_dds_config(d, OWN, [PEER_A])
    files = dds.DdsFiles(d)
    env = dict(os.environ, **dds.parse_dds_env(files.env.read_bytes()))
    other = dict(os.environ, FASTDDS_DEFAULT_PROFILES_FILE=str(tmp_path / "other.xml"))
    user = subprocess.Popen(["sleep", "30"], env=env)
    unrelated = subprocess.Popen(["sleep", "30"], env=other)
    try:
        now = time.time()
        os.utime(files.fastdds, (now - 3600, now - 3600))  # profile older than the process
        assert dds.stale_processes(files.fastdds) == []
        os.utime(files.fastdds, (now + 5, now + 5))  # profile changed after the process started
        stale = dds.stale_processes(files.fastdds)
        assert user.pid in stale
        assert unrelated.pid not in stale
    finally:
        for p in (user, unrelated):
            p.kill()
            p.wait()
    assert dds.stale_processes(tmp_path / "missing.xml") == []


def test_cyclonedds_accepts_the_config(tmp_path: Path) -> None:
    """Cyclone DDS itself parses the generated file (on loopback so no overlay is needed)."""
    domain_mod = require("cyclonedds.domain", "cyclonedds (pinned in scripts/requirements-dev.txt) not installed")
    from cyclonedds.core import DDSException

    domain_id = 100 + os.getpid() % 100  # the port formula allows domains up to 232
    good = dds.build_cyclonedds_xml("::1", [], interface="lo").decode()
    domain = domain_mod.Domain(domain_id, config=good)
    del domain
    # The check can fail: Cyclone rejects an unknown element and an interface that does not exist.
    unknown = good.replace("<AllowMulticast>", "<AllowMulticastX>").replace("</AllowMulticast>", "</AllowMulticastX>")
    with pytest.raises(DDSException):
        domain_mod.Domain(domain_id + 1, config=unknown)
    bad = dds.build_cyclonedds_xml("::1", [], interface="nosuchif0").decode()
    with pytest.raises(DDSException):
        domain_mod.Domain(domain_id + 1, config=bad)


def test_directory_is_readable_by_others_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)  # common for root: would make a plain mkdir 0700
    try:
        dds.write_dds_config(tmp_path / "new" / "dds", OWN, [PEER_A])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new" / "dds").stat().st_mode) == 0o755
    older = tmp_path / "older"  # a directory an older version (or that umask) left 0700
    older.mkdir(mode=0o700)
    older.chmod(0o700)
    dds.write_dds_config(older, OWN, [PEER_A])
    assert stat.S_IMODE(older.stat().st_mode) == 0o755


def test_another_user_reads_the_dds_files_of_a_root_node_but_not_its_key() -> None:
    """README: a normal user sources <state_dir>/dds/dds.env of a node run as root (what on_configure writes)."""
    import shutil
    import tempfile

    from husarnet_ros.core.fsutil import ensure_state_dir
    from husarnet_ros.core.identity import Identity
    from husarnet_ros.core.whitelist import Whitelist

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to read as another user")
    with tempfile.TemporaryDirectory() as base:  # not under pytest's tmp_path: that is 0700 to others
        os.chmod(base, 0o755)
        state = Path(base) / "state"
        old_umask = os.umask(0o077)
        try:
            ensure_state_dir(state)
            Identity.load_or_create(state / "id")
            Whitelist(state / "whitelist.json").add(bytes.fromhex("fc94" + "00" * 13 + "0a"), "robot2")
            files = dds.DdsFiles(state / "dds")
            dds.write_dds_config(files.directory, OWN, [PEER_A])
        finally:
            os.umask(old_umask)

        def as_nobody(script: str, *args: str) -> subprocess.CompletedProcess[str]:
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script, "sh", *args]
            return subprocess.run(argv, capture_output=True, text=True, timeout=30)

        r = as_nobody(
            '. "$1" && cat "$FASTDDS_DEFAULT_PROFILES_FILE" "${CYCLONEDDS_URI#file://}" >/dev/null && echo ok',
            str(files.env),
        )
        assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
        for secret in ("id", "whitelist.json"):
            r = as_nobody('cat "$1"', str(state / secret))
            assert r.returncode != 0 and "Permission denied" in r.stderr, (secret, r.stdout)
        r = as_nobody('ls "$1"', str(state))
        assert r.returncode != 0 and "Permission denied" in r.stderr
