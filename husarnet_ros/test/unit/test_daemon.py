"""The daemon's control socket: every failure is a JSON error reply, and the client's read is bounded."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from husarnet_ros import daemon
from husarnet_ros.core import whitelist as wl_mod
from husarnet_ros.core.identity import Identity
from husarnet_ros.core.whitelist import Whitelist


def test_whitelist_commands_without_a_whitelist_are_an_error_reply() -> None:
    engine = SimpleNamespace(whitelist=None)
    for cmd in ("whitelist", "whitelist_add", "whitelist_remove", "whitelist_set_enabled"):
        reply = daemon.handle_command(engine, {"cmd": cmd, "address": "fc94::1", "enabled": True})  # type: ignore[arg-type]
        assert reply["ok"] is False and "no whitelist" in reply["error"]


def test_full_whitelist_is_an_error_reply_not_a_dead_connection(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(wl_mod, "MAX_ENTRIES", 1)
    engine = SimpleNamespace(whitelist=Whitelist(tmp_path / "whitelist.json"))
    first, second = Identity.generate().address_str, Identity.generate().address_str
    assert daemon.handle_command(engine, {"cmd": "whitelist_add", "address": first}) == {"ok": True, "changed": True}  # type: ignore[arg-type]
    reply = daemon.handle_command(engine, {"cmd": "whitelist_add", "address": second})  # type: ignore[arg-type]
    assert reply["ok"] is False and "full" in reply["error"]


def test_control_client_refuses_an_endless_reply(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(daemon, "MAX_REPLY", 1000)
    path = tmp_path / "ctl"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            try:
                for _ in range(100):
                    conn.sendall(b"x" * 100)  # never a newline
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(ConnectionError, match="larger than 1000"):
            daemon.control(path, "status")
    finally:
        t.join(timeout=5)
        srv.close()


def test_print_address_with_an_unsafe_id_file_is_a_one_line_error(tmp_path, capsys) -> None:
    Identity.generate().save(tmp_path / "id")
    (tmp_path / "id").chmod(0o644)
    assert daemon.main(["--state-dir", str(tmp_path), "--print-address"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "chmod 600" in err
