"""The ``husarnet`` lifecycle node: a thin adapter between the engine and ROS 2.

Everything about packets lives in :mod:`husarnet_ros.core`; this module only

* declares the parameters (with descriptors and ranges) and validates changes,
* builds an :class:`EngineConfig` in ``on_configure``, starts the engine in
  ``on_activate`` and undoes each step in reverse (``on_deactivate`` stops the
  engine and so removes ``hnet0``; ``on_cleanup``/``on_shutdown``/``on_error``
  release everything else),
* turns engine snapshots into ``~/peers``, ``~/status`` and ``/diagnostics``,
  and service requests into whitelist calls and pings,
* keeps the DDS profiles in ``<state_dir>/dds`` in step with the allowed peers.

Threads: the engine reports changes on its own control thread; the node only
triggers a guard condition there, and every ROS call happens in the executor.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

from husarnet_msgs.msg import Peer, PeerArray, Status
from husarnet_msgs.srv import AddToWhitelist, ListWhitelist, PingPeer, RemoveFromWhitelist, SetWhitelistEnabled

from . import dds
from .core.base_client import parse_base_spec
from .core.constants import DEFAULT_INTERFACE, DEFAULT_MTU, DEFAULT_UDP_PORT, WEBSETUP_PORT
from .core.engine import Engine, EngineConfig, EngineError, PeerInfo, StatusInfo, parse_peer_spec
from .core.fsutil import StateFileError, ensure_state_dir
from .core.hosts import validate_hostname
from .core.identity import Identity, format_address, parse_address
from .core.warmer import DEFAULT_INTERVAL as DEFAULT_WARM_INTERVAL
from .core.warmer import MAX_INTERVAL as MAX_WARM_INTERVAL
from .core.warmer import check_interval as check_warm_interval
from .core.whitelist import Whitelist, WhitelistError, parse_entry

NODE_NAME = "husarnet"
DEFAULT_STATE_DIR = "/var/lib/husarnet_ros"
DEFAULT_HOSTS_FILE = "/etc/hosts"
SETUP_TUN_HINT = "sudo husarnet-ros setup-tun --user $USER"
PING_DEFAULT_TIMEOUT = 2.0
PING_MAX_TIMEOUT = 30.0
DIAGNOSTICS_PERIOD = 1.0
# Drop reasons that mean someone sent us something they should not have; a rise is a warning.
SECURITY_DROPS = ("malformed", "bad_mac", "replay", "not_whitelisted", "bad_inner_src", "bad_id", "rate_limited")

#: ~/peers and ~/status: a late subscriber (CLI, dashboard) gets the last table at once.
LATCHED_QOS = QoSProfile(
    depth=1,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


# ============================================================================ parameters
@dataclass(frozen=True)
class ParamSpec:
    """One node parameter and when a new value of it takes effect.

    * ``read_only``: fixed for the life of the process (``ros2 run ... --ros-args -p``);
    * ``configure``: read in ``on_configure``; changes are refused while configured;
    * ``runtime``: applied at once.
    """

    name: str
    default: Any
    type: int
    description: str
    when: str = "configure"
    int_range: tuple[int, int] | None = None
    float_range: tuple[float, float] | None = None

    def descriptor(self) -> ParameterDescriptor:
        when = {
            "read_only": " Read-only: set it at startup.",
            "configure": " Applied at configure: cleanup the node to change it.",
            "runtime": " Applied at once.",
        }[self.when]
        d = ParameterDescriptor(
            name=self.name,
            type=self.type,
            description=self.description + when,
            read_only=self.when == "read_only",
        )
        if self.int_range is not None:
            d.integer_range = [IntegerRange(from_value=self.int_range[0], to_value=self.int_range[1], step=1)]
        if self.float_range is not None:
            d.floating_point_range = [
                FloatingPointRange(from_value=self.float_range[0], to_value=self.float_range[1], step=0.0)
            ]
        return d


S, B, INT, D, SA = (
    ParameterType.PARAMETER_STRING,
    ParameterType.PARAMETER_BOOL,
    ParameterType.PARAMETER_INTEGER,
    ParameterType.PARAMETER_DOUBLE,
    ParameterType.PARAMETER_STRING_ARRAY,
)

PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "state_dir", DEFAULT_STATE_DIR, S, "Directory of the identity (id), whitelist and DDS files.", "read_only"
    ),
    ParamSpec("interface_name", DEFAULT_INTERFACE, S, "Name of the overlay TUN device.", "read_only"),
    ParamSpec("hostname", "", S, "This node's hostname on the overlay; empty: the system hostname."),
    ParamSpec(
        "base_servers",
        [],
        SA,
        "Base servers for rendezvous and relay: 'host' (TCP 443, UDP 5582), 'host:tcp_port' or "
        "'host:tcp_port:udp_port', optionally '#<hex public key>' to pin the base's key.",
    ),
    ParamSpec(
        "udp_port", DEFAULT_UDP_PORT, INT, "UDP port for peers and the base (0: any free port).", int_range=(0, 65535)
    ),
    ParamSpec("lan_discovery", True, B, "Find peers on the LAN by multicast beacons."),
    ParamSpec(
        "handshake_cookies",
        False,
        B,
        "Under a handshake flood, answer initiations from unknown addresses with 64-byte cookie replies, so "
        "peers at new addresses still get in; off: such senders get no answer at all, even under load.",
    ),
    ParamSpec(
        "whitelist_enabled",
        True,
        B,
        "Only whitelisted peers may connect (default deny). The persisted state set by "
        "~/whitelist/set_enabled wins over this default at the next start.",
        "runtime",
    ),
    ParamSpec(
        "whitelist",
        [],
        SA,
        "Peers allowed to connect: 'fc94:...' or 'fc94:... hostname'; merged with the persisted list.",
    ),
    ParamSpec(
        "peers",
        [],
        SA,
        "Static peers: 'fc94:...', 'fc94:...@198.18.0.2:5582' or '[fc94:...]@[fd00::2]:5582'.",
    ),
    ParamSpec("websetup.enabled", True, B, "Accept websetup management messages (UDP 5580 on the overlay address)."),
    ParamSpec("websetup.whitelist", [], SA, "Overlay addresses allowed to send websetup messages."),
    ParamSpec(
        "hosts_file",
        DEFAULT_HOSTS_FILE,
        S,
        "Hosts file in which a marked block maps peer hostnames to fc94 addresses; empty: do not touch any.",
    ),
    ParamSpec("dds.enabled", True, B, "Write DDS profiles (Fast DDS, Cyclone DDS) and dds.env for the overlay."),
    ParamSpec("dds.dir", "", S, "Directory of the DDS files; empty: <state_dir>/dds."),
    ParamSpec("mtu", DEFAULT_MTU, INT, "MTU of the overlay device.", int_range=(1280, 9000)),
    ParamSpec(
        "autostart",
        False,
        B,
        "Configure and activate at startup (for 'ros2 run' without a lifecycle manager).",
        "read_only",
    ),
    ParamSpec(
        "publish_period",
        1.0,
        D,
        "Seconds between periodic ~/peers and ~/status messages (also published on change).",
        "runtime",
        float_range=(0.1, 60.0),
    ),
    ParamSpec(
        "warm_interval_ms",
        DEFAULT_WARM_INTERVAL * 1000,
        D,
        "Milliseconds between two runs of a packet through a shadow data path while light traffic flows: "
        "keeps the per-packet code in the CPU caches for lower latency, at about 5 % of one core while "
        "traffic flows; 0: off.",
        float_range=(0.0, MAX_WARM_INTERVAL * 1000),
    ),
)
PARAMETER_NAMES = tuple(p.name for p in PARAMETERS)
_SPEC = {p.name: p for p in PARAMETERS}


def validate_parameter(name: str, value: Any) -> str | None:
    """Return why ``value`` is not acceptable for ``name``, or None.

    Ranges are checked by rclpy from the descriptors; this checks content.
    """
    try:
        if name == "interface_name":
            if not _IFNAME.match(value):
                return "interface_name must be 1-15 letters, digits, '_', '.' or '-'"
        elif name == "state_dir":
            if not value or not os.path.isabs(value):
                return "state_dir must be an absolute path"
        elif name == "hostname":
            if value:
                validate_hostname(value)
        elif name in _ITEM_CHECKS:
            for item in value:
                _ITEM_CHECKS[name](item)
        elif name in ("hosts_file", "dds.dir"):
            if value and not os.path.isabs(value):
                return f"{name} must be an absolute path or empty"
        elif name == "udp_port":
            if not 0 <= value <= 65535:
                return "udp_port must be 0..65535"
        elif name == "mtu":
            if not 1280 <= value <= 9000:
                return "mtu must be 1280..9000"
        elif name == "publish_period" and not 0.1 <= value <= 60.0:
            return "publish_period must be 0.1..60 s"
        elif name == "warm_interval_ms":
            check_warm_interval(value / 1000)
    except ValueError as exc:
        return f"{name}: {exc}"
    return None


#: String-array parameters whose every item must parse; each checker raises ValueError with a reason.
_ITEM_CHECKS: dict[str, Callable[[str], Any]] = {
    "base_servers": parse_base_spec,  # a bare host means TCP 443 and UDP 5582 (DESIGN.md 4.5)
    "whitelist": parse_entry,
    "peers": parse_peer_spec,
    "websetup.whitelist": parse_address,
}


# ============================================================================ messages
def to_time(wall: float) -> Time:
    """Wall-clock seconds to builtin_interfaces/Time (zero stays zero: 'never')."""
    if wall <= 0:
        return Time()
    sec = int(wall)
    return Time(sec=sec, nanosec=min(int((wall - sec) * 1e9), 999_999_999))


def peer_to_msg(p: PeerInfo) -> Peer:
    return Peer(
        address=format_address(p.address),
        hostname=p.hostname,
        path=p.path,
        endpoint=p.endpoint,
        rtt_ms=float(p.rtt_ms) if p.is_secure and p.rtt_ms > 0 else -1.0,
        is_whitelisted=p.is_whitelisted,
        is_secure=p.is_secure,
        last_seen=to_time(p.last_seen),
        rx_bytes=int(p.rx_bytes),
        tx_bytes=int(p.tx_bytes),
        session_age=float(p.session_age),
        cipher=p.cipher,
    )


def key_values(d: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=str(k), value=str(v)) for k, v in sorted(d.items())]


# ============================================================================ the node
class HusarnetNode(LifecycleNode):
    """Lifecycle node ``husarnet``; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        for spec in PARAMETERS:
            self._declare(spec)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._lock = threading.RLock()
        self._reset()

    # --- state --------------------------------------------------------------------
    def _reset(self) -> None:
        """Forget everything built by configure/activate (after it has been released)."""
        self._config: EngineConfig | None = None
        self._identity: Identity | None = None
        self._whitelist: Whitelist | None = None  # used while inactive; the engine's own while active
        self._engine: Engine | None = None
        self._dds_files: dds.DdsFiles | None = None
        self._dds_restart_needed = False
        self._dds_error = ""
        self._activate_error = ""
        self._failure_logged = False  # the running engine's failure (if any) went to the ROS log
        self._peers_pub = None
        self._status_pub = None
        self._diag_pub = None
        # Not _services/_timers: rclpy's Node keeps its own lists under those names (Kilted), and the
        # executor serves only what they hold: replacing them silenced the lifecycle and parameter services.
        self._api_services: list[Any] = []
        self._api_timers: list[Any] = []
        self._publish_timer = None
        self._event = None
        self._last_peers: list[Peer] | None = None
        self._last_counters: dict[str, int] = {}
        self._ping_group = ReentrantCallbackGroup()

    def _declare(self, spec: ParamSpec) -> None:
        if spec.type == SA:
            # An empty list cannot carry its element type, so declare the type and set the default.
            self.declare_parameter(spec.name, Parameter.Type.STRING_ARRAY, spec.descriptor())
            if self.get_parameter_or(spec.name, None).type_ == Parameter.Type.NOT_SET:
                self.set_parameters([Parameter(spec.name, Parameter.Type.STRING_ARRAY, list(spec.default))])
        else:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())

    def param(self, name: str) -> Any:
        value = self.get_parameter(name).value
        if _SPEC[name].type == SA:
            return list(value or [])
        return value

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        configured = self._config is not None
        for p in params:
            spec = _SPEC.get(p.name)
            if spec is None:
                continue
            value = list(p.value or []) if spec.type == SA else p.value
            reason = validate_parameter(p.name, value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            if spec.when == "configure" and configured:
                return SetParametersResult(
                    successful=False,
                    reason=f"{p.name} is applied at configure; deactivate and cleanup the node, then set it",
                )
        # All valid: apply the runtime ones.
        for p in params:
            if p.name == "whitelist_enabled" and configured:
                wl = self._current_whitelist()
                if wl is not None:
                    try:
                        wl.set_enabled(bool(p.value))
                    except (WhitelistError, OSError) as exc:
                        return SetParametersResult(successful=False, reason=f"cannot persist the whitelist: {exc}")
            elif p.name == "publish_period" and self._publish_timer is not None:
                self._restart_publish_timer(float(p.value))
        return SetParametersResult(successful=True)

    # --- lifecycle ------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Validate parameters, load identity and whitelist, then create the ROS interfaces.

        Everything that can fail on bad input happens before any ROS entity is
        created, so a FAILURE leaves the node exactly as it was.
        """
        try:
            config, identity, whitelist = self._load()
        except ValueError as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        dds_files = None
        if self.param("dds.enabled"):
            dds_dir = self.param("dds.dir") or str(config.state_dir / "dds")
            dds_files = dds.DdsFiles(Path(dds_dir))
        with self._lock:
            self._config, self._identity, self._whitelist, self._dds_files = config, identity, whitelist, dds_files
        self._create_interfaces()
        self._show_whitelist_enabled(whitelist.enabled)
        whitelist.add_listener(self._on_core_change)
        self._update_dds()
        self.get_logger().info(
            f"configured: {identity.address_str} on {config.interface_name}, state in {config.state_dir}"
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Start the engine: TUN up with our address, sockets, base, LAN discovery."""
        assert self._config is not None and self._identity is not None
        engine = Engine(self._config, identity=self._identity)
        engine.add_listener(self._on_core_change)
        try:
            engine.start()
        except EngineError as exc:
            msg = str(exc)
            state_dir = str(self._config.state_dir)
            # TUN errors name setup-tun themselves.  Of the other permission errors setup-tun fixes only those
            # in the state directory (it hands that to the user), not e.g. a UDP port below 1024.
            if "setup-tun" not in msg and "permission denied" in msg.lower() and state_dir in msg:
                msg += f"; run as root or once: {SETUP_TUN_HINT} --state-dir {state_dir}"
            self._activate_error = msg
            self.get_logger().error(f"activate failed: {msg}")
            return TransitionCallbackReturn.FAILURE
        with self._lock:
            self._engine = engine
            self._whitelist = None  # the engine's whitelist is the live one now
            self._activate_error = ""
            self._failure_logged = False
        engine.whitelist.add_listener(self._on_core_change)
        result = super().on_activate(state)  # enables the lifecycle publishers
        self._restart_publish_timer(float(self.param("publish_period")))
        self._update_dds()
        self._publish(force=True)
        self.get_logger().info(f"active: {format_address(engine.address)} up on {self._config.interface_name}")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the engine: traffic stops and the TUN device disappears."""
        self._destroy_publish_timer()
        self._stop_engine()
        self._reload_whitelist()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release every ROS interface and forget the configuration."""
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in state {state.label}: releasing everything")
        self._release()
        return TransitionCallbackReturn.SUCCESS

    # --- configure helpers ---------------------------------------------------------
    def _load(self) -> tuple[EngineConfig, Identity, Whitelist]:
        """Read and validate everything; raises ValueError with one clear message."""
        for name in PARAMETER_NAMES:
            reason = validate_parameter(name, self.param(name))
            if reason:
                raise ValueError(reason)
        state_dir = Path(self.param("state_dir"))
        try:
            ensure_state_dir(state_dir)
        except OSError as exc:
            raise ValueError(f"cannot create state directory {state_dir}: {exc.strerror or exc}") from None
        id_path = state_dir / "id"
        try:
            identity = Identity.load_or_create(id_path)
        except (StateFileError, OSError, ValueError) as exc:
            raise ValueError(
                f"identity file {id_path} is unusable: {exc}. Fix it, or move it away to create a new identity "
                "(the node's address will change)"
            ) from None
        own = identity.address
        for text in self.param("whitelist"):
            if parse_entry(text)[0] == own:
                raise ValueError(f"whitelist entry {text!r} is this node's own address")
        hostname = self.param("hostname") or _system_hostname()
        config = EngineConfig(
            state_dir=state_dir,
            interface_name=self.param("interface_name"),
            hostname=hostname,
            udp_port=int(self.param("udp_port")),
            mtu=int(self.param("mtu")),
            base_servers=self.param("base_servers"),
            peers=self.param("peers"),
            lan_discovery=bool(self.param("lan_discovery")),
            handshake_cookies=bool(self.param("handshake_cookies")),
            whitelist_enabled=bool(self.param("whitelist_enabled")),
            whitelist=self.param("whitelist"),
            websetup_enabled=bool(self.param("websetup.enabled")),
            websetup_whitelist=self.param("websetup.whitelist"),
            hosts_file=self.param("hosts_file") or None,
            warm_interval=float(self.param("warm_interval_ms")) / 1000,
        )
        for spec in config.peers:
            if parse_peer_spec(spec)[0] == own:
                raise ValueError(f"peer {spec!r} is this node's own address")
        whitelist = self._open_whitelist(config)
        return config, identity, whitelist

    @staticmethod
    def _open_whitelist(config: EngineConfig) -> Whitelist:
        try:
            return Whitelist(
                config.state_dir / "whitelist.json", static=config.whitelist, enabled_default=config.whitelist_enabled
            )
        except (WhitelistError, OSError) as exc:
            raise ValueError(str(exc)) from None

    def _create_interfaces(self) -> None:
        self._peers_pub = self.create_lifecycle_publisher(PeerArray, "~/peers", LATCHED_QOS)
        self._status_pub = self.create_lifecycle_publisher(Status, "~/status", LATCHED_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._api_services = [
            self.create_service(AddToWhitelist, "~/whitelist/add", self._srv_add),
            self.create_service(RemoveFromWhitelist, "~/whitelist/remove", self._srv_remove),
            self.create_service(ListWhitelist, "~/whitelist/list", self._srv_list),
            self.create_service(SetWhitelistEnabled, "~/whitelist/set_enabled", self._srv_set_enabled),
            self.create_service(PingPeer, "~/ping", self._srv_ping, callback_group=self._ping_group),
        ]
        self._event = self.create_guard_condition(self._on_event)
        self._api_timers = [self.create_timer(DIAGNOSTICS_PERIOD, self._on_diagnostics)]

    def _release(self) -> None:
        """Undo configure and activate, in reverse order; safe to call in any state and twice."""
        self._destroy_publish_timer()
        self._stop_engine()
        for t in self._api_timers:
            self.destroy_timer(t)
        for s in self._api_services:
            self.destroy_service(s)
        if self._event is not None:
            self.destroy_guard_condition(self._event)
        for pub in (self._peers_pub, self._status_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        if self._diag_pub is not None:
            self.destroy_publisher(self._diag_pub)
        with self._lock:
            self._reset()

    def _stop_engine(self) -> None:
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.stop()
            self.get_logger().info("engine stopped; overlay device removed")

    def _reload_whitelist(self) -> None:
        """After the engine stopped, serve whitelist requests from the file again (it may have changed)."""
        if self._config is None:
            return
        try:
            wl = self._open_whitelist(self._config)
        except ValueError as exc:
            self.get_logger().error(f"whitelist unusable after deactivate: {exc}")
            return
        wl.add_listener(self._on_core_change)
        with self._lock:
            self._whitelist = wl

    def _current_whitelist(self) -> Whitelist | None:
        with self._lock:
            if self._engine is not None:
                return self._engine.whitelist
            return self._whitelist

    # --- engine events -------------------------------------------------------------
    def _on_core_change(self, *_args: Any) -> None:
        """Engine/whitelist listener, on their threads: wake the executor, nothing else."""
        ev = self._event
        if ev is not None:
            # Destroyed concurrently by cleanup: nothing left to tell.
            with contextlib.suppress(Exception):
                ev.trigger()

    def _on_event(self) -> None:
        self._update_dds()
        self._publish(force=False)
        engine = self._engine
        if engine is not None and engine.failure and not self._failure_logged:
            self._failure_logged = True
            self.get_logger().error(
                f"{engine.failure}; the overlay can no longer send or receive (status.failure, /diagnostics)"
            )

    def _restart_publish_timer(self, period: float) -> None:
        self._destroy_publish_timer()
        self._publish_timer = self.create_timer(period, lambda: self._publish(force=True))

    def _destroy_publish_timer(self) -> None:
        if self._publish_timer is not None:
            self.destroy_timer(self._publish_timer)
            self._publish_timer = None

    def _publish(self, *, force: bool) -> None:
        """Status always (it is small and events are rare); the peer table when it changed or on the period."""
        engine = self._engine
        if engine is None or self._peers_pub is None:
            return
        peers = [peer_to_msg(p) for p in engine.peers()]
        if force or peers != self._last_peers:
            msg = PeerArray(peers=peers)
            msg.header.stamp = self.get_clock().now().to_msg()
            self._peers_pub.publish(msg)
            self._last_peers = peers
        self._status_pub.publish(self._status_msg(engine.status()))

    def _status_msg(self, st: StatusInfo) -> Status:
        assert self._config is not None
        msg = Status(
            address=format_address(st.address),
            hostname=st.hostname,
            interface_name=self._config.interface_name,
            base_connection=st.base,
            base_address=st.base_address,
            whitelist_enabled=st.whitelist_enabled,
            dds_restart_needed=self._dds_restart_needed,
            dds_env_file=str(self._dds_files.env) if self._dds_files is not None else "",
            counters=key_values(st.counters),
            websetup_enabled=self._config.websetup_enabled,
            websetup_port=WEBSETUP_PORT,
            websetup=key_values({k: v for k, v in st.websetup.items() if "secret" not in str(k).lower()}),
            failure=st.failure,
            warning=st.warning,
        )
        msg.header.stamp = self.get_clock().now().to_msg()
        return msg

    # --- DDS -----------------------------------------------------------------------------
    def allowed_peers(self) -> list[bytes]:
        """Peers DDS should reach: the whitelist when enabled, else every known and static peer."""
        wl = self._current_whitelist()
        if wl is None or self._config is None:
            return []
        out = set(wl.entries())
        if not wl.enabled:
            out.update(parse_peer_spec(s)[0] for s in self._config.peers)
            if self._engine is not None:
                out.update(p.address for p in self._engine.peers())
        if self._identity is not None:
            out.discard(self._identity.address)
        return sorted(out)

    def _update_dds(self) -> None:
        files, ident, config = self._dds_files, self._identity, self._config
        if files is None or ident is None or config is None:
            return
        try:
            changed = dds.write_dds_config(
                files.directory,
                ident.address_str,
                [format_address(a) for a in self.allowed_peers()],
                interface=config.interface_name,
                mtu=config.mtu,
            )
            self._dds_error = ""
        except (OSError, ValueError) as exc:
            self._dds_error = f"cannot write DDS files in {files.directory}: {exc}"
            self.get_logger().error(self._dds_error)
            return
        if changed:
            self.get_logger().info(f"DDS profiles updated in {files.directory}")
            self._check_dds_restart()

    def _check_dds_restart(self) -> None:
        files = self._dds_files
        needed = bool(files is not None and dds.stale_processes(files.fastdds))
        self._dds_restart_needed = needed
        engine = self._engine
        if engine is not None:
            engine.dds_restart_needed = needed

    # --- diagnostics ----------------------------------------------------------------------
    def _on_diagnostics(self) -> None:
        if self._diag_pub is None or self._config is None:
            return
        self._check_dds_restart()
        arr = DiagnosticArray(status=self.diagnostics())
        arr.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(arr)

    def diagnostics(self) -> list[DiagnosticStatus]:
        """One status per concern, named 'husarnet: <task>'."""
        config, ident, engine = self._config, self._identity, self._engine
        assert config is not None and ident is not None
        hw = ident.address_str
        out = []

        def add(task: str, level: bytes, message: str, values: dict[str, Any]) -> None:
            out.append(
                DiagnosticStatus(
                    level=level, name=f"husarnet: {task}", message=message, hardware_id=hw, values=key_values(values)
                )
            )

        if engine is None:
            why = self._activate_error or "activate the node to bring the overlay up"
            add("node", DiagnosticStatus.WARN, f"inactive: {why}", {"interface": config.interface_name})
            st, peers = None, []
        else:
            st, peers = engine.status(), engine.peers()
            if st.failure:  # the TUN device failed under the running overlay: nothing gets through
                add("node", DiagnosticStatus.ERROR, st.failure, {"interface": config.interface_name, "address": hw})
            elif st.warning:  # e.g. the TUN device was set down: nothing gets through until someone sets it up
                add("node", DiagnosticStatus.WARN, st.warning, {"interface": config.interface_name, "address": hw})
            else:
                add("node", DiagnosticStatus.OK, "active", {"interface": config.interface_name, "address": hw})
        if st is None:
            add("base", DiagnosticStatus.OK, "inactive", {})
        elif not config.base_servers:
            add("base", DiagnosticStatus.OK, "no base server configured (LAN and static peers only)", {})
        elif st.base == "none":
            add("base", DiagnosticStatus.WARN, "not connected to any base server", {"servers": config.base_servers})
        else:
            add("base", DiagnosticStatus.OK, f"connected over {st.base}", {"server": st.base_address})
        secure = [p for p in peers if p.is_secure]
        paths = {k: sum(1 for p in secure if p.path == k) for k in ("lan", "direct", "relay")}
        add(
            "peers",
            DiagnosticStatus.OK,
            f"{len(secure)} of {len(peers)} peers connected",
            {"known": len(peers), **paths},
        )
        wl = self._current_whitelist()
        if wl is not None:
            n = len(wl.entries())
            if wl.enabled:
                add("whitelist", DiagnosticStatus.OK, f"enabled, {n} entries", {"enabled": True, "entries": n})
            else:
                add("whitelist", DiagnosticStatus.WARN, "disabled: every valid identity may connect", {"entries": n})
        if self._dds_files is None:
            add("dds", DiagnosticStatus.OK, "DDS profile generation disabled", {})
        elif self._dds_error:
            add("dds", DiagnosticStatus.ERROR, self._dds_error, {})
        elif self._dds_restart_needed:
            add(
                "dds",
                DiagnosticStatus.WARN,
                "allowed peers changed: restart ROS processes started with the old profile",
                {"env_file": self._dds_files.env},
            )
        else:
            add("dds", DiagnosticStatus.OK, "profiles up to date", {"env_file": self._dds_files.env})
        if st is not None:
            counters = st.counters
            rose = {k: counters.get(k, 0) - self._last_counters.get(k, 0) for k in SECURITY_DROPS}
            rose = {k: v for k, v in rose.items() if v > 0}
            self._last_counters = dict(counters)
            if rose:
                text = ", ".join(f"{k} {v}" for k, v in sorted(rose.items()))
                add("drops", DiagnosticStatus.WARN, f"dropped since last report: {text}", counters)
            else:
                add("drops", DiagnosticStatus.OK, "no security drops since last report", counters)
        return out

    # --- services ---------------------------------------------------------------------------
    def _srv_add(self, req: AddToWhitelist.Request, resp: AddToWhitelist.Response) -> AddToWhitelist.Response:
        resp.success, resp.message = self._whitelist_call(lambda wl: self._add(wl, req.address, req.hostname))
        return resp

    def _add(self, wl: Whitelist, address: str, hostname: str) -> str:
        addr = parse_address(address)
        if self._identity is not None and addr == self._identity.address:
            raise ValueError("that is this node's own address")
        if hostname:
            validate_hostname(hostname)
        changed = wl.add(addr, hostname)
        text = format_address(addr) + (f" ({hostname})" if hostname else "")
        return f"added {text}" if changed else f"{text} is already on the whitelist"

    def _srv_remove(
        self, req: RemoveFromWhitelist.Request, resp: RemoveFromWhitelist.Response
    ) -> RemoveFromWhitelist.Response:
        def remove(wl: Whitelist) -> str:
            addr = self._resolve(req.address, wl)
            if not wl.remove(addr):
                raise ValueError(f"{format_address(addr)} is not on the whitelist")
            return f"removed {format_address(addr)}"

        resp.success, resp.message = self._whitelist_call(remove)
        return resp

    def _srv_list(self, req: ListWhitelist.Request, resp: ListWhitelist.Response) -> ListWhitelist.Response:
        wl = self._current_whitelist()
        if wl is None:
            return resp
        entries = sorted(wl.entries().items())
        resp.enabled = wl.enabled
        resp.addresses = [format_address(a) for a, _ in entries]
        resp.hostnames = [n for _, n in entries]
        return resp

    def _srv_set_enabled(
        self, req: SetWhitelistEnabled.Request, resp: SetWhitelistEnabled.Response
    ) -> SetWhitelistEnabled.Response:
        def set_enabled(wl: Whitelist) -> str:
            word = "enabled" if req.enabled else "disabled (every valid identity may connect)"
            return f"whitelist {word}" if wl.set_enabled(req.enabled) else f"whitelist already {word}"

        resp.success, resp.message = self._whitelist_call(set_enabled)
        if resp.success:
            self._show_whitelist_enabled(req.enabled)
        return resp

    def _show_whitelist_enabled(self, enabled: bool) -> None:
        """Make the whitelist_enabled parameter say what the whitelist does.

        The persisted state (set by the service) wins over the parameter at configure, and the
        service changes the state directly: without this ``ros2 param get`` would contradict
        ``~/status`` and ``/diagnostics``.  Setting the parameter runs the parameter callback,
        which finds the whitelist already in that state.
        """
        if self.get_parameter("whitelist_enabled").value != enabled:
            self.set_parameters([Parameter("whitelist_enabled", value=enabled)])

    def _whitelist_call(self, fn: Callable[[Whitelist], str]) -> tuple[bool, str]:
        wl = self._current_whitelist()
        if wl is None:
            return False, "node is not configured"
        try:
            return True, fn(wl)
        except (ValueError, WhitelistError) as exc:
            return False, str(exc)
        except OSError as exc:
            return False, f"cannot persist the whitelist: {exc}"

    def _resolve(self, text: str, wl: Whitelist | None = None) -> bytes:
        """Address text or a hostname known to the whitelist or the peer table -> address."""
        text = text.strip()
        if not text:
            raise ValueError("no address or hostname given")
        if ":" in text:
            return parse_address(text)
        validate_hostname(text, allow_reserved=True)
        wl = wl or self._current_whitelist()
        names = {n.lower(): a for n, a in (wl.hostnames() if wl is not None else {}).items()}
        engine = self._engine
        if engine is not None:
            for p in engine.peers():
                if p.hostname:
                    names.setdefault(p.hostname.lower(), p.address)
        try:
            return names[text.lower()]
        except KeyError:
            raise ValueError(f"unknown hostname {text!r}") from None

    def _srv_ping(self, req: PingPeer.Request, resp: PingPeer.Response) -> PingPeer.Response:
        timeout = req.timeout or PING_DEFAULT_TIMEOUT
        engine = self._engine
        try:
            if not 0 < timeout <= PING_MAX_TIMEOUT:
                raise ValueError(f"timeout must be in (0, {PING_MAX_TIMEOUT:g}] seconds")
            addr = self._resolve(req.address)
            if engine is None:
                raise ValueError("node is not active")
            if addr not in {p.address for p in engine.peers()}:
                raise ValueError(f"unknown peer {format_address(addr)}")
            rtt = engine.ping(addr, timeout)
        except (ValueError, EngineError) as exc:
            resp.success, resp.message = False, str(exc)
            return resp
        resp.success, resp.rtt_ms = True, rtt * 1000.0
        resp.message = f"reply from {format_address(addr)} in {rtt * 1000.0:.2f} ms"
        return resp

    # --- for tests and the CLI ------------------------------------------------------------
    @property
    def engine(self) -> Engine | None:
        return self._engine

    @property
    def identity(self) -> Identity | None:
        return self._identity

    @property
    def dds_files(self) -> dds.DdsFiles | None:
        return self._dds_files


def _system_hostname() -> str:
    """The machine's hostname if it is a valid overlay hostname, else ''."""
    name = socket.gethostname().split(".")[0]
    try:
        return validate_hostname(name)
    except ValueError:
        return ""


def main(args: list[str] | None = None) -> int:
    """Entry point ``husarnet_node`` (``ros2 run husarnet_ros husarnet_node``).

    SIGINT and SIGTERM are handled here rather than by rclpy, so the engine is
    stopped (device removed, threads joined) while the ROS context is still
    valid, and the process exits 0 after a clean stop.
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    node = HusarnetNode()
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(node)
    code = 0
    try:
        if node.param("autostart"):
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal("autostart: configure failed (see above)")
                code = 1
            elif not stop.is_set() and node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal("autostart: activate failed (see above)")
                code = 1
        while code == 0 and not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.2)
    finally:
        # Never leave the device or threads behind, however we got here.
        node._release()
        node.get_logger().info("stopped")
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
