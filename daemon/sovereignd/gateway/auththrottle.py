"""Failed authentications per client address: a budget, then 429 (fail2ban's idea, inside the
gateway, without ever refusing a valid key).

Client keys hold 256 bits: guessing is hopeless, so the budget is not against guessing but
against floods of unauthenticated requests, whose cost is the log volume and the work. Each
address gets `per_minute` failures (a token bucket with a burst of a tenth of that, at least
5); beyond it, its failed requests are answered 429 with Retry-After. The table of addresses
is bounded: the oldest entries are dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_ADDRESSES = 65_536


class AuthFailures:
    """Per-address token buckets of allowed authentication failures."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(5.0, per_minute / 10)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def fail(self, address: str) -> float | None:
        """Note one failure; None if within the budget, else seconds until the next is."""
        now = self.clock()
        tokens, last = self._buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[address] = (tokens - 1, now)
            retry = None
        else:
            self._buckets[address] = (tokens, now)
            retry = (1 - tokens) / self.rate
        while len(self._buckets) > MAX_ADDRESSES:
            self._buckets.popitem(last=False)
        return retry
