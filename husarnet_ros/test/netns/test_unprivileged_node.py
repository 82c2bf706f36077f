"""A normal user after ``setup-tun`` runs the overlay (DESIGN.md 3), also where it may not write the hosts file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# The namespace fixture and the "import as root, then run as nobody" runner of the TUN tests.
from test_tun import _links, _run_in_ns, netns  # noqa: F401  (netns is a fixture)

from husarnet_ros import cli
from husarnet_ros.core import tun
from husarnet_ros.core.identity import Identity

pytestmark = pytest.mark.netns

IFACE = "hnu0"
HOSTS = "127.0.0.1\tlocalhost\n::1\tip6-localhost\n"

ENGINE_AS_NOBODY = """
import encodings.ascii, encodings.idna, json, os, sys
from pyroute2 import IPRoute
import husarnet_ros
from husarnet_ros.core import hosts, tun, websetup
from husarnet_ros.core.engine import Engine, EngineConfig
os.setgroups([]); os.setgid(65534); os.setuid(65534)
cfg = EngineConfig(state_dir={state!r}, interface_name={iface!r}, hosts_file={hosts!r}, hostname="robot1",
                   udp_port=0, lan_discovery=False)
engine = Engine(cfg)
engine.start()
try:
    up = {{"address": engine.address.hex(), "warning": engine.status().warning, "hosts": open({hosts!r}).read()}}
    print("UP", json.dumps(up), flush=True)
finally:
    engine.stop()
"""


def test_normal_user_activates_with_a_hosts_file_it_cannot_write(netns: str) -> None:  # noqa: F811
    """setup-tun for nobody, then nobody starts the engine on its device with the hosts file in a root-owned
    directory (as /etc/hosts is): the overlay comes up with its address and the warning names the file.
    Given write access to the file (one of the fixes the warning names), the same user writes the block
    in place, although it still cannot create a file next to it.
    """
    with tempfile.TemporaryDirectory() as base:  # not tmp_path: nobody cannot enter pytest's 0700 tree
        os.chmod(base, 0o755)
        state, etc = Path(base) / "state", Path(base) / "etc"
        etc.mkdir(mode=0o755)
        hosts = etc / "hosts"
        hosts.write_text(HOSTS)
        hosts.chmod(0o644)
        code = ENGINE_AS_NOBODY.format(state=str(state), iface=IFACE, hosts=str(hosts))
        assert cli.main(["setup-tun", "--user", "nobody", "--state-dir", str(state), "--interface", IFACE]) == 0
        try:
            r = _run_in_ns(netns, code)
            assert "UP" in r.stdout, r.stderr
            up = json.loads(r.stdout.split("UP", 1)[1])
            assert up["address"] == Identity.load(state / "id").address.hex()
            assert f"hosts file {hosts} not updated" in up["warning"] and "Permission denied" in up["warning"]
            assert "setup-tun" not in up["warning"]
            assert up["hosts"] == HOSTS and hosts.read_text() == HOSTS

            os.chown(hosts, 65534, 65534)
            r = _run_in_ns(netns, code)
            assert "UP" in r.stdout, r.stderr
            up = json.loads(r.stdout.split("UP", 1)[1])
            assert up["warning"] == ""
            assert up["hosts"].startswith(HOSTS + "# BEGIN husarnet_ros\n") and "\trobot1\n" in up["hosts"]
            assert hosts.read_text() == HOSTS  # the block is removed again at stop
            assert sorted(p.name for p in etc.iterdir()) == ["hosts"]
        finally:
            tun.remove_tun(IFACE)
        assert IFACE not in _links()
