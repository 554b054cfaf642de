"""Retry policy: which failures to retry and how long to wait, as pure functions."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

__all__ = ["RetryPolicy", "parse_retry_after"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter, honouring the server's Retry-After.

    >>> policy = RetryPolicy(initial_delay=0.5, max_delay=8.0, jitter=0.0)
    >>> [policy.delay(attempt) for attempt in (1, 2, 3, 6)]
    [0.5, 1.0, 2.0, 8.0]
    >>> policy.delay(1, retry_after=3.0)
    3.0
    """

    max_retries: int = 3
    initial_delay: float = 0.5
    max_delay: float = 8.0
    #: Fraction of the delay randomised away, so that many clients do not retry in lockstep.
    jitter: float = 0.25
    #: The cap on every wait the server asks for (``Retry-After``, ``retry-after-ms``, the rate-limit
    #: reset headers). A longer wait fails the affected rows and stops the run with a message saying
    #: so, instead of silently pausing for hours.
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = first retry)."""
        if retry_after is not None and 0 <= retry_after <= self.max_retry_after:
            return retry_after
        delay = min(self.initial_delay * 2 ** (attempt - 1), self.max_delay)
        return delay * (1 - self.jitter * random.random())


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, then ``retry-after`` (seconds or an
    HTTP date). Header names must be lower-case. None when absent or unreadable, and for a date
    already past: a stale date is no hint, so the normal backoff applies (not a retry at once).

    >>> parse_retry_after({"retry-after-ms": "1500"})
    1.5
    >>> parse_retry_after({"retry-after": "2"})
    2.0
    >>> parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"}, now=1445412480.0)
    5.0
    >>> parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, now=1445412480.0) is None
    True
    >>> parse_retry_after({"retry-after": "soon"}) is None
    True
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            seconds = float(value) / 1000
        except ValueError:
            seconds = None
        if seconds is not None and seconds >= 0:
            return seconds
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            date = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = date.timestamp() - (time.time() if now is None else now)
        return seconds if seconds > 0 else None
    return seconds if seconds >= 0 else None
