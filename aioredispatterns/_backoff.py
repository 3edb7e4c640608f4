"""The one backoff of the library: exponential, full jitter, capped.

Every retry loop (stream reads and acks, lease renewal, pub/sub reconnects, the
command layer's connect retries) waits through this, so many workers that lost the
same server do not come back in lockstep (AWS Architecture Blog, "Exponential Backoff
And Jitter": full jitter spreads retries best for the least total work).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import anyio

__all__ = ("Backoff", "full_jitter")

# 2 ** 64 times any sane base is far past any cap: keep the power finite.
_MAX_EXPONENT = 64


def full_jitter(attempt: int, *, base: float, cap: float, multiplier: float = 2.0) -> float:
    """The wait before retry number ``attempt`` (from 0): uniform in ``[0, ceiling]``.

    ``ceiling = min(cap, base * multiplier ** attempt)``.
    """
    exponent = min(max(attempt, 0), _MAX_EXPONENT)
    ceiling = min(cap, base * multiplier**exponent)
    return random.uniform(0.0, ceiling)


@dataclass(slots=True)
class Backoff:
    """A retry loop's state: call :meth:`sleep` after a failure, :meth:`reset` after a
    success.

    Cancellation: :meth:`sleep` is a plain sleep; cancelling it changes nothing.
    """

    base: float = 0.05
    cap: float = 1.0
    multiplier: float = 2.0
    attempt: int = 0

    def next_delay(self) -> float:
        """The next wait, and count the attempt."""
        delay = full_jitter(self.attempt, base=self.base, cap=self.cap, multiplier=self.multiplier)
        self.attempt = min(self.attempt + 1, _MAX_EXPONENT)
        return delay

    async def sleep(self) -> None:
        """Wait the next delay."""
        await anyio.sleep(self.next_delay())

    def reset(self) -> None:
        """Start again from the shortest delay."""
        self.attempt = 0
