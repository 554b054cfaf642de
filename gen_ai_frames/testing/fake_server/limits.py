"""Token buckets for the fake server's rate limits, and the reset formats of its headers."""

from __future__ import annotations

import math
import time


# ------------------------------------------------------------------ rate limits
class _Bucket:
    """A token bucket: ``per_minute`` units a minute, holding ``burst`` seconds of them, full at start."""

    def __init__(self, per_minute: float, burst: float, now: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst)
        self.level = self.capacity
        self.at = now

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` units are there (0: now). A request larger than the whole bucket
        passes when the bucket is full, as it would otherwise wait forever."""
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        return max(0.0, (min(cost, self.capacity) - self.level) / self.rate)

    def reset_in(self) -> float:
        """Seconds until the bucket is full again (what providers' ``reset`` headers say)."""
        return (self.capacity - self.level) / self.rate


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``"120ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


def _rfc3339_in(seconds: float) -> str:
    """An RFC 3339 UTC time ``seconds`` from now (Anthropic's reset format)."""
    when = time.time() + seconds
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"
