"""``husarnet-ros``: the command line of husarnet_ros.

Commands that talk to a running node use its ROS interfaces (``~/status``,
``~/peers``, ``~/whitelist/*``, ``~/ping``) and so need the ROS environment and
the same ROS_DOMAIN_ID; the others (``genid``, ``setup-tun``, ``websetup``) are
plain Python and work under ``sudo`` with a bare environment, which is why
rclpy is imported only when needed.

Exit codes: 0 success; 1 the operation failed or a wait timed out; 2 usage
error; 3 no husarnet node answered (not running, other domain, or inactive).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .service_call import call_resending

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_NODE = 0, 1, 2, 3
DEFAULT_NODE = "/husarnet"
DEFAULT_STATE_DIR = "/var/lib/husarnet_ros"
#: Seconds without a reply before an idempotent request is sent again (see ``service_call``).
RESEND_AFTER = 2.0


class CliError(Exception):
    """A failure to report on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ============================================================================ ROS side
class NodeClient:
    """The CLI's own short-lived ROS node, talking to the husarnet node named ``target``."""

    def __init__(self, target: str, timeout: float) -> None:
        import rclpy

        from husarnet_msgs.msg import PeerArray, Status

        from .node import LATCHED_QOS

        self.target = target.rstrip("/") or DEFAULT_NODE
        self.timeout = timeout
        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, args=[])
        self.node = rclpy.create_node(f"husarnet_cli_{os.getpid()}", context=self.context)
        self.status: Any = None
        self.peers: Any = None

        def keep(attr: str) -> Callable[[Any], None]:
            return lambda msg: setattr(self, attr, msg)

        self.node.create_subscription(Status, f"{self.target}/status", keep("status"), LATCHED_QOS)
        self.node.create_subscription(PeerArray, f"{self.target}/peers", keep("peers"), LATCHED_QOS)

    def close(self) -> None:
        self.node.destroy_node()
        self.context.try_shutdown()

    def spin_until(self, pred: Callable[[], Any], timeout: float) -> Any:
        """Spin until ``pred()`` is truthy (returned) or ``timeout`` passes (None)."""
        from rclpy.executors import SingleThreadedExecutor

        executor = SingleThreadedExecutor(context=self.context)
        executor.add_node(self.node)
        deadline = time.monotonic() + timeout
        try:
            while True:
                value = pred()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                executor.spin_once(timeout_sec=min(left, 0.1))
        finally:
            executor.remove_node(self.node)

    def no_node(self) -> CliError:
        return CliError(
            f"no husarnet node answered at {self.target} within {self.timeout:g} s: is it running and active "
            "(ros2 lifecycle get /husarnet), with the same ROS_DOMAIN_ID and RMW?",
            EXIT_NO_NODE,
        )

    def get_status(self) -> Any:
        if self.spin_until(lambda: self.status, self.timeout) is None:
            raise self.no_node()
        return self.status

    def get_peers(self) -> Any:
        if self.spin_until(lambda: self.peers, self.timeout) is None:
            raise self.no_node()
        return self.peers

    def call(
        self, srv_type: Any, name: str, wait: float | None = None, resend: float | None = RESEND_AFTER, **fields: Any
    ) -> tuple[Any, bool]:
        """Call ``name``; the reply and whether it answers a resent request (:func:`call_resending`)."""
        wait = self.timeout if wait is None else wait
        client = self.node.create_client(srv_type, f"{self.target}/{name}")
        try:
            if self.spin_until(client.service_is_ready, self.timeout) is None:
                raise self.no_node()
            answer = call_resending(client, srv_type.Request(**fields), self.spin_until, wait, resend)
            if answer is None:
                raise CliError(f"{self.target}/{name} did not answer within {wait:g} s")
            return answer
        finally:
            self.node.destroy_client(client)


def _with_node(args: argparse.Namespace, fn: Callable[[NodeClient], int]) -> int:
    try:
        client = NodeClient(args.node, args.timeout)
    except ImportError as exc:
        raise CliError(
            f"the ROS environment is not set up ({exc}): source your ROS 2 setup and this workspace's install"
        ) from None
    try:
        return fn(client)
    finally:
        client.close()


# ============================================================================ formatting
def _kv(items: Any) -> dict[str, str]:
    return {kv.key: kv.value for kv in items}


def status_dict(st: Any, peers: Any) -> dict[str, Any]:
    """Status and peers as plain data (for --json and the table)."""
    return {
        "address": st.address,
        "hostname": st.hostname,
        "interface": st.interface_name,
        "base": {"connection": st.base_connection, "address": st.base_address},
        "whitelist_enabled": st.whitelist_enabled,
        "dds": {"env_file": st.dds_env_file, "restart_needed": st.dds_restart_needed},
        "failure": st.failure,
        "warning": st.warning,
        "websetup": {"enabled": st.websetup_enabled, "port": st.websetup_port, **_kv(st.websetup)},
        "counters": {k: int(v) for k, v in _kv(st.counters).items()},
        "peers": [peer_dict(p) for p in (peers.peers if peers is not None else [])],
    }


def peer_dict(p: Any) -> dict[str, Any]:
    return {
        "address": p.address,
        "hostname": p.hostname,
        "path": p.path,
        "endpoint": p.endpoint,
        "rtt_ms": p.rtt_ms if p.rtt_ms >= 0 else None,
        "is_whitelisted": p.is_whitelisted,
        "is_secure": p.is_secure,
        "last_seen": p.last_seen.sec + p.last_seen.nanosec / 1e9 if p.last_seen.sec else None,
        "rx_bytes": p.rx_bytes,
        "tx_bytes": p.tx_bytes,
        "session_age": p.session_age,
        "cipher": p.cipher,
    }


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    s = max(0.0, now - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def format_status(d: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    base = d["base"]["connection"]
    if base != "none":
        base += f" ({d['base']['address']})"
    dds = d["dds"]["env_file"] or "disabled"
    if d["dds"]["restart_needed"]:
        dds += "  (RESTART NEEDED: ROS processes started before the last peer change use old profiles)"
    totals = ("rx_", "tx_", "handshakes_", "cookie_replies_")
    drops = {k: v for k, v in d["counters"].items() if v and not k.startswith(totals)}
    out = [f"FAILED     {d['failure']}"] if d["failure"] else []
    out += [f"WARNING    {d['warning']}"] if d["warning"] else []
    out += [
        f"address    {d['address']}",
        f"hostname   {d['hostname'] or '-'}",
        f"interface  {d['interface']}",
        f"base       {base}",
        f"whitelist  {'enabled' if d['whitelist_enabled'] else 'DISABLED (any valid identity may connect)'}",
        f"dds        {dds}",
        f"drops      {', '.join(f'{k}={v}' for k, v in sorted(drops.items())) or 'none'}",
        "",
    ]
    if not d["peers"]:
        out.append("no peers (add one: husarnet-ros whitelist add <fc94 address> [hostname])")
        return "\n".join(out)
    rows = []
    for p in d["peers"]:
        rtt = f"{p['rtt_ms']:.1f} ms" if p["rtt_ms"] is not None else "-"
        flags = ("secure" if p["is_secure"] else "-") + ("" if p["is_whitelisted"] else " !wl")
        rows.append(
            [
                p["address"],
                p["hostname"] or "-",
                p["path"],
                p["endpoint"] or "-",
                rtt,
                flags,
                _bytes(p["rx_bytes"]),
                _bytes(p["tx_bytes"]),
                _ago(p["last_seen"], now),
            ]
        )
    out.append(format_table(rows, ["PEER", "HOSTNAME", "PATH", "ENDPOINT", "RTT", "STATE", "RX", "TX", "LAST SEEN"]))
    return "\n".join(out)


# ============================================================================ commands
def cmd_status(args: argparse.Namespace) -> int:
    def run(c: NodeClient) -> int:
        st = c.get_status()
        peers = c.get_peers()
        d = status_dict(st, peers)
        print(json.dumps(d, indent=2, sort_keys=True) if args.json else format_status(d))
        return EXIT_OK

    return _with_node(args, run)


def cmd_whitelist(args: argparse.Namespace) -> int:
    from husarnet_msgs.srv import AddToWhitelist, ListWhitelist, RemoveFromWhitelist, SetWhitelistEnabled

    def run(c: NodeClient) -> int:
        if args.action == "ls":
            r, _ = c.call(ListWhitelist, "whitelist/list")
            entries = [{"address": a, "hostname": h} for a, h in zip(r.addresses, r.hostnames, strict=True)]
            if args.json:
                print(json.dumps({"enabled": r.enabled, "entries": entries}, indent=2))
            else:
                print(f"whitelist {'enabled' if r.enabled else 'DISABLED'}; {len(entries)} entries")
                for e in entries:
                    print(f"{e['address']}  {e['hostname']}".rstrip())
            return EXIT_OK
        if args.action == "add":
            r, _ = c.call(AddToWhitelist, "whitelist/add", address=args.address, hostname=args.hostname or "")
        elif args.action == "rm":
            r, resent = c.call(RemoveFromWhitelist, "whitelist/remove", address=args.address)
            if resent and not r.success and "is not on the whitelist" in r.message:
                # The first request's reply was lost, so it may be the one that removed the entry:
                # the state the user asked for holds either way.
                return _report(True, f"{r.message} (any more: the reply to the first request was lost)")
        else:
            r, _ = c.call(SetWhitelistEnabled, "whitelist/set_enabled", enabled=args.action == "enable")
        return _report(r.success, r.message)

    return _with_node(args, run)


def _report(success: bool, message: str) -> int:
    print(message, file=sys.stdout if success else sys.stderr)
    return EXIT_OK if success else EXIT_FAILED


def cmd_ip(args: argparse.Namespace) -> int:
    if args.hostname is None and args.state_dir:
        # Without a running node: the address is a function of the identity file.
        from .core.fsutil import StateFileError
        from .core.identity import Identity

        try:
            print(Identity.load(Path(args.state_dir) / "id").address_str)
            return EXIT_OK
        except (OSError, ValueError, StateFileError) as exc:  # missing, unsafe (mode) or corrupt
            raise CliError(f"cannot read the identity in {args.state_dir}: {exc}") from None

    def run(c: NodeClient) -> int:
        st = c.get_status()
        if args.hostname is None:
            print(st.address)
            return EXIT_OK
        name = args.hostname.lower()
        if name in (st.hostname.lower(), "husarnet-local"):
            print(st.address)
            return EXIT_OK
        for p in c.get_peers().peers:
            if p.hostname.lower() == name:
                print(p.address)
                return EXIT_OK
        raise CliError(f"no peer named {args.hostname!r} (see: husarnet-ros whitelist ls)")

    return _with_node(args, run)


def _match_peer(peers: Any, target: str) -> Any:
    t = target.lower()
    addr = None
    if ":" in target:
        from .core.identity import format_address, parse_address

        try:
            addr = format_address(parse_address(target))
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    for p in peers.peers:
        if p.address == addr or (p.hostname and p.hostname.lower() == t):
            return p
    return None


def cmd_wait(args: argparse.Namespace) -> int:
    def run(c: NodeClient) -> int:
        c.get_status()  # fails fast (exit 3) when there is no node at all
        if args.what == "base":
            st = c.spin_until(lambda: c.status if c.status.base_connection != "none" else None, args.wait_timeout)
            if st is None:
                raise CliError(f"not connected to a base server after {args.wait_timeout:g} s")
            print(f"base connected over {st.base_connection} ({st.base_address})")
            return EXIT_OK

        def connected() -> Any:
            p = _match_peer(c.peers, args.target) if c.peers is not None else None
            return p if p is not None and p.is_secure and p.path != "none" else None

        p = c.spin_until(connected, args.wait_timeout)
        if p is None:
            raise CliError(f"peer {args.target} not connected after {args.wait_timeout:g} s")
        rtt = f", {p.rtt_ms:.1f} ms" if p.rtt_ms >= 0 else ""
        print(f"{p.address} ({p.hostname or '-'}) connected: {p.path} {p.endpoint}{rtt}")
        return EXIT_OK

    return _with_node(args, run)


def cmd_ping(args: argparse.Namespace) -> int:
    from husarnet_msgs.srv import PingPeer

    def run(c: NodeClient) -> int:
        code = EXIT_OK
        for _ in range(args.count):
            # A resend is a second ping, so only once the first one's reply is overdue.
            r, _ = c.call(
                PingPeer,
                "ping",
                wait=args.ping_timeout + c.timeout,
                resend=args.ping_timeout + RESEND_AFTER,
                address=args.target,
                timeout=args.ping_timeout,
            )
            code = max(code, _report(r.success, r.message))
        return code

    return _with_node(args, run)


def cmd_genid(args: argparse.Namespace) -> int:
    from .core.fsutil import atomic_write
    from .core.identity import Identity

    ident = Identity.generate()
    data = ident.serialize()
    if not args.out:
        sys.stdout.write(data.decode())
        return EXIT_OK
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; it may be a node's identity: use --force to replace it")
    atomic_write(out, data, mode=0o600)
    print(f"{ident.address_str} written to {out} (mode 0600)", file=sys.stderr)
    return EXIT_OK


#: What a node keeps in its state directory (the dds/ subdirectory included).
STATE_ENTRIES = frozenset({"id", "whitelist.json", "websetup.json", "base_keys.json", "endpoints.json", "dds"})


def _temp_of_state(name: str) -> bool:
    """``.<entry>.<random>.tmp``: what fsutil.atomic_write leaves behind if interrupted (``.whitelist.json.x.tmp``)."""
    return any(name.startswith(f".{entry}.") for entry in STATE_ENTRIES)


def _check_state_dir(state_dir: Path) -> None:
    """Refuse a directory that holds anything but node state: setup-tun runs as root and hands it to USER.

    A mistyped ``--state-dir /home`` must not give other people's files away.
    Leftover temporary files of atomic writes (``.<name>.*.tmp``) are state too.
    """
    foreign = sorted(
        e.name
        for e in os.scandir(state_dir)
        if e.name not in STATE_ENTRIES
        and not (e.name.startswith(".") and e.name.endswith(".tmp") and _temp_of_state(e.name))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CliError(
            f"{state_dir} holds {shown}: not a husarnet_ros state directory; "
            "give --state-dir a dedicated (new or empty) directory",
            EXIT_USAGE,
        )


def _give_state_dir(state_dir: Path, uid: int, gid: int) -> None:
    """Make USER own the state directory and the node's files in it (the id file is refused if others can read it)."""
    os.chown(state_dir, uid, gid)
    for name in sorted(STATE_ENTRIES):
        path = state_dir / name
        if not path.exists() and not path.is_symlink():
            continue
        os.chown(path, uid, gid, follow_symlinks=False)
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                for entry in dirs + files:
                    os.chown(os.path.join(root, entry), uid, gid, follow_symlinks=False)


def cmd_setup_tun(args: argparse.Namespace) -> int:
    import pwd

    from .core.constants import DEFAULT_MTU
    from .core.fsutil import StateFileError, ensure_state_dir
    from .core.identity import Identity
    from .core.superpacket import tso_limit
    from .core.tun import TUN_MODE_HINT, TunError, remove_tun, setup_persistent_tun, tun_node_access

    try:
        if args.remove:
            remove_tun(args.interface)
            print(f"removed {args.interface}")
            return EXIT_OK
        if not args.user:
            raise CliError("setup-tun needs --user USER (the account that will run the node)", EXIT_USAGE)
        try:
            pw = pwd.getpwnam(args.user)
        except KeyError:
            raise CliError(f"no such user: {args.user}", EXIT_USAGE) from None
        state_dir = Path(args.state_dir)
        ensure_state_dir(state_dir)
        _check_state_dir(state_dir)
        ident = Identity.load_or_create(state_dir / "id")
        _give_state_dir(state_dir, pw.pw_uid, pw.pw_gid)
        mtu = args.mtu or DEFAULT_MTU
        setup_persistent_tun(args.interface, pw.pw_uid, ident.address, mtu, gso_max_size=tso_limit(mtu))
    except (TunError, StateFileError) as exc:  # StateFileError: an existing id file is unsafe or corrupt
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None
    print(f"{args.interface} is ready for user {args.user}: {ident.address_str}/16, state in {state_dir}")
    print(f"run the node as {args.user} with: -p state_dir:={state_dir} -p interface_name:={args.interface}")
    problem = tun_node_access(pw.pw_uid, set(os.getgrouplist(args.user, pw.pw_gid)))
    if problem is not None:
        print(
            f"warning: {args.user} cannot attach to {args.interface} yet: {problem}; {TUN_MODE_HINT}", file=sys.stderr
        )
    return EXIT_OK


def _secret(args: argparse.Namespace) -> bytes:
    text = os.environ.get("HUSARNET_WEBSETUP_SECRET", "")
    if args.secret_file:
        from .core.fsutil import StateFileError, read_private_file

        try:
            text = read_private_file(args.secret_file, limit=1024).decode().strip()
        except (OSError, ValueError, StateFileError) as exc:
            raise CliError(f"cannot read {args.secret_file}: {exc}") from None
    if not text:
        raise CliError("no secret: use --secret-file FILE or set HUSARNET_WEBSETUP_SECRET", EXIT_USAGE)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise CliError("the websetup secret must be hex", EXIT_USAGE) from None
    if len(secret) != 32:
        raise CliError("the websetup secret must be 32 bytes (64 hex digits)", EXIT_USAGE)
    return secret


def cmd_websetup(args: argparse.Namespace) -> int:
    from .core import websetup
    from .core.fsutil import StateFileError

    if args.action == "secret":
        try:
            secret = websetup.read_secret(args.state_dir, create=False)
        except (OSError, ValueError, StateFileError) as exc:
            raise CliError(
                f"no websetup secret in {args.state_dir} ({exc}); start the node once to create it"
            ) from None
        print(secret.hex())
        return EXIT_OK
    store = args.counter_store or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
        "husarnet_ros",
        "websetup_counter.json",
    )
    client = websetup.WebsetupClient(_secret(args), store)
    try:
        reply = client.send(args.address, args.command, args.args, timeout=args.reply_timeout)
    except websetup.WebsetupError as exc:
        raise CliError(f"websetup {args.command}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise CliError(f"websetup {args.command}: {exc}") from None
    for field in reply.fields:
        print(field, file=sys.stdout if reply.ok else sys.stderr)
    return EXIT_OK if reply.ok else EXIT_FAILED


# ============================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="husarnet-ros",
        description="Control a husarnet_ros node. Exit codes: 0 ok, 1 failed, 2 usage, 3 no node answered.",
    )
    p.add_argument("--node", default=DEFAULT_NODE, help="the node's full name (default /husarnet)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the node (default 5)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("status", help="own address, base connection and the peer table")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    w = sub.add_parser("whitelist", help="list or change the whitelist")
    wsub = w.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = wsub.add_parser("ls", help="list entries")
    ls.add_argument("--json", action="store_true")
    add = wsub.add_parser("add", help="allow a peer")
    add.add_argument("address")
    add.add_argument("hostname", nargs="?")
    rm = wsub.add_parser("rm", help="forbid a peer (address or hostname)")
    rm.add_argument("address")
    wsub.add_parser("enable", help="only whitelisted peers may connect")
    wsub.add_parser("disable", help="every valid identity may connect")
    w.set_defaults(func=cmd_whitelist)

    ip = sub.add_parser("ip", help="own address, or the address of a peer's hostname")
    ip.add_argument("hostname", nargs="?")
    ip.add_argument("--state-dir", help="read the own address from this state directory (no node needed)")
    ip.set_defaults(func=cmd_ip)

    wt = sub.add_parser("wait", help="wait until a peer is connected or the base is reachable")
    wsub2 = wt.add_subparsers(dest="what", required=True, metavar="WHAT")
    wp = wsub2.add_parser("peer", help="a peer (address or hostname) has a session and a path")
    wp.add_argument("target")
    wp.add_argument("--wait-timeout", type=float, default=60.0, help="seconds (default 60)")
    wb = wsub2.add_parser("base", help="a base server connection is up")
    wb.add_argument("--wait-timeout", type=float, default=60.0, help="seconds (default 60)")
    wt.set_defaults(func=cmd_wait)

    pg = sub.add_parser("ping", help="round trip to a peer over the overlay (through the node)")
    pg.add_argument("target")
    pg.add_argument("-c", "--count", type=int, default=1)
    pg.add_argument("--ping-timeout", type=float, default=2.0)
    pg.set_defaults(func=cmd_ping)

    g = sub.add_parser("genid", help="generate a new identity file (stdout, or --out with mode 0600)")
    g.add_argument("--out")
    g.add_argument("--force", action="store_true", help="replace an existing file")
    g.set_defaults(func=cmd_genid)

    t = sub.add_parser("setup-tun", help="(root) create a persistent overlay device a normal user's node can use")
    t.add_argument("--user", help="account that will run the node")
    t.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="that node's state_dir, given to USER")
    t.add_argument("--interface", default="hnet0")
    t.add_argument("--mtu", type=int, default=0)
    t.add_argument("--remove", action="store_true", help="delete the device instead")
    t.set_defaults(func=cmd_setup_tun)

    ws = sub.add_parser("websetup", help="websetup: print a node's secret, or send a command as a dashboard")
    wssub = ws.add_subparsers(dest="action", required=True, metavar="ACTION")
    sec = wssub.add_parser("secret", help="print this node's websetup secret (hex)")
    sec.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    snd = wssub.add_parser("send", help="send one authenticated command to a node's overlay address")
    snd.add_argument("address", help="the node's fc94 address")
    snd.add_argument("command", help="ping, whitelist-add, whitelist-rm, whitelist-ls, ..., cleanup")
    snd.add_argument("args", nargs="*")
    snd.add_argument("--secret-file", help="file holding the node's secret in hex (or HUSARNET_WEBSETUP_SECRET)")
    snd.add_argument("--counter-store", help="where this client's message counter is kept")
    snd.add_argument("--reply-timeout", type=float, default=2.0, help="seconds to wait for the reply")
    ws.set_defaults(func=cmd_websetup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point ``husarnet-ros``."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"husarnet-ros: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
