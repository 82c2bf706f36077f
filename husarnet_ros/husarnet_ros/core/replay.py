"""RFC 6479 anti-replay sliding window, as WireGuard uses it.

The receiver keeps the highest counter it accepted (``last``) and a bitmap of
which of the preceding ``size`` counters it has seen.  The bitmap is a ring
of 64-bit blocks; sliding the window forward only zeroes the blocks that come
into view, so the cost of a jump does not depend on its size (it is capped
at one full ring).  One spare block beyond ``size // 64`` keeps the block
holding ``last - size`` intact while ``last``'s own block is being reused,
so every counter in ``[last - size, last]`` is judged exactly.

The window is split in two steps so the session can follow DESIGN.md 4.3:
:meth:`ReplayFilter.check` (no state change) runs *before* decryption, so
too-old and replayed packets cost no AEAD work; :meth:`ReplayFilter.commit`
runs only *after* the tag verified, so a forged packet can never move the
window.  ``commit`` re-checks under a lock because two datapath threads may
race with copies of the same datagram: exactly one of them wins.
"""

from __future__ import annotations

import threading

from .constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE

_BLOCK_BITS_LOG = 6
_BLOCK_BITS = 1 << _BLOCK_BITS_LOG
_BIT_MASK = _BLOCK_BITS - 1

TOO_OLD = "too_old"
REPLAY = "replay"


class ReplayFilter:
    """Sliding window over 64-bit message counters.

    ``size`` counters behind the highest accepted one are still accepted once
    each (WireGuard semantics: ``last - counter <= size``).  Counters at or above
    ``limit`` (REJECT_AFTER_MESSAGES) are always refused and reported as
    ``'too_old'``: a genuine sender never uses them.
    """

    __slots__ = ("_blocks", "_last", "_limit", "_lock", "_nblocks", "size")

    def __init__(self, size: int = REPLAY_WINDOW_SIZE, limit: int = REJECT_AFTER_MESSAGES) -> None:
        if size <= 0 or size % _BLOCK_BITS:
            raise ValueError(f"replay window size must be a positive multiple of {_BLOCK_BITS}")
        self.size = size
        self._limit = limit
        self._nblocks = size // _BLOCK_BITS + 1
        self._lock = threading.Lock()
        self._blocks = [0] * self._nblocks
        self._last = 0

    def reset(self) -> None:
        """Forget everything (a fresh key starts a fresh window)."""
        with self._lock:
            self._blocks = [0] * self._nblocks
            self._last = 0

    @property
    def last(self) -> int:
        """Highest counter committed so far (0 initially)."""
        return self._last

    def check(self, counter: int) -> str | None:
        """Would ``counter`` be accepted now?  ``None`` if yes, else ``'too_old'`` or ``'replay'``.

        Changes nothing; cheap enough to run on every packet before decryption.
        """
        if counter < 0 or counter >= self._limit:
            return TOO_OLD
        last = self._last
        if counter > last:
            return None
        if last - counter > self.size:
            return TOO_OLD
        block = self._blocks[(counter >> _BLOCK_BITS_LOG) % self._nblocks]
        if block >> (counter & _BIT_MASK) & 1:
            return REPLAY
        return None

    def commit(self, counter: int) -> bool:
        """Record ``counter`` as received; False if by now it is a replay or too old (lost a race)."""
        if counter < 0 or counter >= self._limit:
            return False
        index = counter >> _BLOCK_BITS_LOG
        bit = 1 << (counter & _BIT_MASK)
        with self._lock:
            blocks = self._blocks
            last = self._last
            if counter > last:
                current = last >> _BLOCK_BITS_LOG
                if index != current:  # entering new blocks: zero them (at most the whole ring)
                    nblocks = self._nblocks
                    if index - current >= nblocks:
                        blocks[:] = [0] * nblocks
                    else:
                        for i in range(current + 1, index + 1):
                            blocks[i % nblocks] = 0
                self._last = counter
            elif last - counter > self.size:
                return False
            slot = index % self._nblocks
            old = blocks[slot]
            if old & bit:
                return False
            blocks[slot] = old | bit
            return True
