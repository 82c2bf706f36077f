"""ROS-free runner for the engine, with a unix control socket (tests, ``make demo``, ``make bench``).

    python -m husarnet_ros.daemon --state-dir DIR [--interface hnet0] [--udp-port 5582] [--hostname NAME]
        [--peer SPEC]... [--whitelist ADDR[=HOSTNAME]]... [--no-whitelist] [--base HOST:PORT[#PUBKEY]]...
        [--no-lan-discovery] [--mtu N] [--control PATH] [--timers-scale F] [--hosts-file PATH] [--log-level L]
        [--no-offload] [--no-tun] [--handshake-cookies]
    python -m husarnet_ros.daemon --state-dir DIR --print-address

The control socket speaks one JSON object per line each way:
``{"cmd": "status"}`` -> ``{"ok": true, "status": {...}}``; see :func:`handle_command`
for every command.  :func:`control` is the client.  SIGTERM and SIGINT stop
the engine cleanly (TUN removed) and exit 0; a start failure prints one line
to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
from pathlib import Path
from typing import Any

from .core.constants import DEFAULT_INTERFACE, DEFAULT_MTU, DEFAULT_UDP_PORT, Timers
from .core.engine import Engine, EngineConfig, EngineError, PeerInfo
from .core.fsutil import StateFileError
from .core.identity import Identity, format_address, parse_address
from .core.threads import NamedThread
from .core.warmer import DEFAULT_INTERVAL as DEFAULT_WARM_INTERVAL
from .core.whitelist import WhitelistError

log = logging.getLogger("husarnet_ros.daemon")

#: Longest control request line accepted (bytes).
MAX_REQUEST = 16384
#: Longest reply :func:`control` reads (a full peer table fits many times over).
MAX_REPLY = 16 << 20


def scaled_timers(scale: float) -> Timers:
    """Every protocol interval multiplied by ``scale`` (tests and demos shrink them); message limits unchanged."""
    try:
        return Timers().scaled(scale)
    except ValueError:
        raise ValueError("--timers-scale must be in (0, 100]") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m husarnet_ros.daemon", description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", required=True, type=Path, help="identity, whitelist and other state")
    p.add_argument("--print-address", action="store_true", help="create/load the identity, print the address, exit")
    p.add_argument("--interface", default=DEFAULT_INTERFACE, help="TUN device name (default %(default)s)")
    p.add_argument("--udp-port", type=int, default=DEFAULT_UDP_PORT, help="UDP port (0 = any; default %(default)s)")
    p.add_argument("--hostname", default="")
    p.add_argument("--peer", action="append", default=[], metavar="SPEC", help="fc94:...[@host:port], repeatable")
    p.add_argument("--whitelist", action="append", default=[], metavar="ADDR[=HOSTNAME]", help="repeatable")
    p.add_argument("--no-whitelist", action="store_true", help="allow every valid fc94 identity")
    p.add_argument("--base", action="append", default=[], metavar="HOST:PORT[#PUBKEY]", help="repeatable")
    p.add_argument("--no-lan-discovery", action="store_true")
    p.add_argument(
        "--handshake-cookies",
        action="store_true",
        help="under a handshake flood, answer unknown addresses with cookie replies (see docs/SECURITY.md)",
    )
    p.add_argument("--mtu", type=int, default=DEFAULT_MTU)
    p.add_argument("--control", type=Path, default=None, help="unix control socket path")
    p.add_argument("--timers-scale", type=float, default=1.0, help="multiply every protocol interval")
    p.add_argument("--hosts-file", default=None, help="hosts file to keep peer names in (default: none)")
    p.add_argument(
        "--websetup-whitelist",
        action="append",
        default=[],
        metavar="ADDR",
        help="overlay address allowed to send websetup commands, repeatable (default: nobody)",
    )
    p.add_argument("--no-websetup", action="store_true", help="do not listen for websetup commands")
    p.add_argument("--no-tun", action="store_true", help="no TUN device (control-plane experiments only)")
    p.add_argument("--no-offload", action="store_true", help="plain TUN packets (no TSO/GRO super-packets)")
    p.add_argument(
        "--no-super-packets",
        action="store_true",
        help="seal every TCP segment on its own even on a clean path (default: whole super-packets when clean)",
    )
    p.add_argument(
        "--warm-interval",
        type=float,
        default=DEFAULT_WARM_INTERVAL * 1000,
        metavar="MS",
        help="run a packet through a shadow data path every MS milliseconds while light traffic flows, so the "
        "per-packet code stays in the CPU caches (lower latency, about 5 %% of a core while traffic flows); "
        "0 turns it off (default %(default)g)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


# --------------------------------------------------------------------------- JSON views
def peer_to_json(p: PeerInfo) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["address"] = format_address(p.address)
    return d


def status_to_json(engine: Engine) -> dict[str, Any]:
    s = engine.status()
    d = dataclasses.asdict(s)
    d["address"] = format_address(s.address)
    d["udp_port"] = engine.local_port
    d["offload"] = engine.offload_active
    d["warm_rounds"] = engine.warm_rounds
    d["warm_paced_rounds"] = engine.warm_paced_rounds
    d["warm_deferred"] = engine.warm_deferred
    d["warm_streaming"] = engine.warm_streaming
    return d


def handle_command(engine: Engine, req: dict[str, Any]) -> dict[str, Any]:
    """Run one control request.

    Commands and replies (besides ``ok``):
    ``status`` -> ``status`` (StatusInfo fields, address as text, plus ``udp_port``, ``offload`` and
    ``warm_rounds``: the path warmer's runs so far, ``warm_paced_rounds``: those timed to periodic traffic,
    ``warm_deferred``: warm-ups put off or cut short for a real packet, ``warm_streaming``: looks that
    found traffic faster than the warmer, which keeps the path warm by itself);
    ``peers`` -> ``peers`` (list of PeerInfo fields, address as text);
    ``counters`` -> ``counters``;
    ``whitelist_add`` {address, hostname?} -> ``changed``;
    ``whitelist_remove`` {address} -> ``changed``;
    ``whitelist_set_enabled`` {enabled} -> ``changed``;
    ``whitelist`` -> ``enabled``, ``entries`` {address: hostname};
    ``ping`` {address, timeout?} -> ``rtt_ms``.
    """
    cmd = req.get("cmd")
    wl = engine.whitelist
    try:
        if cmd == "status":
            return {"ok": True, "status": status_to_json(engine)}
        if cmd == "peers":
            return {"ok": True, "peers": [peer_to_json(p) for p in engine.peers()]}
        if cmd == "counters":
            return {"ok": True, "counters": engine.counters.snapshot()}
        if str(cmd).startswith("whitelist") and wl is None:
            return {"ok": False, "error": "the engine has no whitelist (not started)"}
        if cmd == "whitelist":
            entries = {format_address(a): h for a, h in wl.entries().items()}
            return {"ok": True, "enabled": wl.enabled, "entries": entries}
        if cmd == "whitelist_add":
            return {"ok": True, "changed": wl.add(parse_address(str(req["address"])), str(req.get("hostname", "")))}
        if cmd == "whitelist_remove":
            return {"ok": True, "changed": wl.remove(parse_address(str(req["address"])))}
        if cmd == "whitelist_set_enabled":
            enabled = req["enabled"]
            if not isinstance(enabled, bool):
                raise ValueError("'enabled' must be true or false")
            return {"ok": True, "changed": wl.set_enabled(enabled)}
        if cmd == "ping":
            timeout = float(req.get("timeout", 2.0))
            if not 0 < timeout <= 60:
                raise ValueError("'timeout' must be in (0, 60]")
            rtt = engine.ping(parse_address(str(req["address"])), timeout)
            return {"ok": True, "rtt_ms": rtt * 1000.0}
        return {"ok": False, "error": f"unknown command {cmd!r}"}
    except KeyError as exc:
        return {"ok": False, "error": f"missing argument {exc}"}
    except (ValueError, EngineError, WhitelistError, OSError) as exc:
        return {"ok": False, "error": str(exc)}


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        engine: Engine = self.server.engine  # type: ignore[attr-defined]
        while True:
            try:
                line = self.rfile.readline(MAX_REQUEST + 1)
            except OSError:
                return
            if not line:
                return
            if len(line) > MAX_REQUEST:
                reply: dict[str, Any] = {"ok": False, "error": "request too long"}
            else:
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("request must be a JSON object")
                    reply = handle_command(engine, req)
                except ValueError as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
            try:
                self.wfile.write(json.dumps(reply).encode() + b"\n")
            except OSError:
                return


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The unix control socket (mode 0600: only the daemon's user may steer it)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, engine: Engine) -> None:
        self.engine = engine
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        old = os.umask(0o177)
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)
        self._thread = NamedThread(target=self.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def control(
    path: str | os.PathLike[str], cmd: str, *, socket_timeout: float | None = None, **args: Any
) -> dict[str, Any]:
    """Send one command to a daemon's control socket and return its JSON reply.

    ``socket_timeout`` bounds the whole exchange; by default it outlasts the command's own ``timeout``
    (a ping's) by 5 s.  Raises ConnectionError when the daemon does not answer.
    """
    req = {"cmd": cmd, **args}
    timeout = socket_timeout if socket_timeout is not None else float(args.get("timeout", 2.0)) + 5.0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REPLY:
                raise ConnectionError(f"reply from {path} is larger than {MAX_REPLY} bytes")
    if not buf:
        raise ConnectionError(f"no reply from {path}")
    return json.loads(buf)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        state_dir=args.state_dir,
        interface_name=args.interface,
        hostname=args.hostname,
        udp_port=args.udp_port,
        mtu=args.mtu,
        base_servers=list(args.base),
        peers=list(args.peer),
        lan_discovery=not args.no_lan_discovery,
        handshake_cookies=args.handshake_cookies,
        whitelist_enabled=not args.no_whitelist,
        whitelist=list(args.whitelist),
        hosts_file=args.hosts_file,
        websetup_enabled=not args.no_websetup,
        websetup_whitelist=list(args.websetup_whitelist),
        use_tun=not args.no_tun,
        offload=not args.no_offload,
        super_packets=False if args.no_super_packets else None,
        warm_interval=args.warm_interval / 1000,
        timers=scaled_timers(args.timers_scale),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.print_address:
        try:
            args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            ident = Identity.load_or_create(args.state_dir / "id")
        except (StateFileError, OSError) as exc:  # IdentityError is one; so is an id file others can read
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(ident.address_str)
        return 0
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine = Engine(config)
    try:
        engine.start()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    server = None
    try:
        if args.control is not None:
            server = ControlServer(args.control, engine)
            server.start()
        print(
            f"husarnet_ros daemon ready address={format_address(engine.address)} udp_port={engine.local_port}",
            flush=True,
        )
        while not stop.wait(0.5):
            if engine.failure:  # the overlay cannot work any more: exit, so a supervisor starts it afresh
                print(f"error: {engine.failure}", file=sys.stderr)
                return 1
    except OSError as exc:
        print(f"error: control socket {args.control}: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
