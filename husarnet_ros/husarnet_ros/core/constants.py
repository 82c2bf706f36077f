"""Protocol constants, under the protocol's own names, in one place.

A reader who knows WireGuard's paper or Husarnet's docs should find every
number of the protocol here and nowhere else.  Intervals that tests need to
shorten live in :class:`Timers`, which every time-driven component takes as a
parameter instead of reading the module constants directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# --- Addressing (Husarnet-compatible) -------------------------------------
OVERLAY_PREFIX = bytes.fromhex("fc94")
OVERLAY_NETWORK = "fc94::/16"
ADDRESS_LEN = 16

# --- Ports and multicast groups (Husarnet's numbers) ----------------------
DEFAULT_UDP_PORT = 5582
DEFAULT_BASE_TCP_PORT = 443
DEFAULT_BASE_UDP_PORT = 5582
WEBSETUP_PORT = 5580
BEACON_PORT = 5581
BEACON_GROUP_V4 = "224.3.252.148"
BEACON_GROUP_V6 = "ff02:88bb:31e4:95f7:2b87:6b52:e112:19ac"

# --- Device ----------------------------------------------------------------
DEFAULT_INTERFACE = "hnet0"
UNDERLAY_MTU = 1500
# Outer IPv6 (40) + UDP (8) + data header (16) + AEAD tag (16): a direct path's
# worst-case underlay overhead (WireGuard stops here, at MTU 1420).
OVERHEAD_IPV6 = 40 + 8 + 16 + 16
# A relayed datagram is wrapped again inside the base session: data header (16)
# + tag (16) + RELAY type (1) + peer address (16).  The default MTU leaves room
# for it, so a relayed full-size packet is never IP-fragmented on the underlay:
# fragments are what NATs and mobile networks drop first, and a robot that
# falls back to the relay must keep working.
OVERHEAD_RELAY = 16 + 16 + 1 + ADDRESS_LEN
DEFAULT_MTU = UNDERLAY_MTU - OVERHEAD_IPV6 - OVERHEAD_RELAY  # 1371

# --- Noise handshake ------------------------------------------------------
NOISE_PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
NOISE_PROLOGUE = b"husarnet_ros v1"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# --- Session limits (WireGuard's values) ----------------------------------
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0
REPLAY_WINDOW_SIZE = 8192  # RFC 6479 window, in packets

# --- Paths ------------------------------------------------------------------
PROBE_INTERVAL = 25.0
PATH_TIMEOUT = 3 * PROBE_INTERVAL

# --- Base server ------------------------------------------------------------
BASE_RECONNECT_MIN = 1.0
BASE_RECONNECT_MAX = 60.0

# --- Bounds on untrusted input --------------------------------------------
MAX_DATAGRAM = 65535
MAX_HOSTNAME_LEN = 63


@dataclass(frozen=True)
class Timers:
    """Every protocol interval, injectable so tests can shrink them."""

    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_attempt_time: float = REKEY_ATTEMPT_TIME
    rekey_timeout: float = REKEY_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    probe_interval: float = PROBE_INTERVAL
    path_timeout: float = PATH_TIMEOUT
    base_reconnect_min: float = BASE_RECONNECT_MIN
    base_reconnect_max: float = BASE_RECONNECT_MAX
    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES

    def scaled(self, scale: float) -> Timers:
        """Every interval multiplied by ``scale`` (tests and demos shrink them); message limits unchanged."""
        if not 0 < scale <= 100:
            raise ValueError(f"timers scale must be in (0, 100], not {scale}")
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name) * scale
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), float)
            },
        )
