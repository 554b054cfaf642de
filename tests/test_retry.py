"""The retry policy: Retry-After parsing and exponential backoff."""

from __future__ import annotations

import pytest

from gen_ai_frames.retry import RetryPolicy, parse_retry_after

NOW = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "0"}, 0.0),
        ({"retry-after-ms": "abc", "retry-after": "3"}, 3.0),   # unreadable ms falls back to seconds
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # ms wins: it is more precise
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"}, 5.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, None),  # a date in the past: no hint (issue 13)
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),  # exactly now: no hint either
        ({"retry-after": "tomorrow-ish"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=NOW) == expected


def test_backoff_doubles_to_the_cap_without_jitter() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=4.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_stays_within_its_fraction() -> None:
    policy = RetryPolicy(initial_delay=1.0, max_delay=1.0, jitter=0.25)
    delays = {policy.delay(1) for _ in range(200)}
    assert all(0.75 <= d <= 1.0 for d in delays)
    assert len(delays) > 1  # jitter actually varies the delay


def test_server_retry_after_wins_unless_absurd() -> None:
    policy = RetryPolicy(jitter=0.0, max_retry_after=60)
    assert policy.delay(1, retry_after=7.0) == 7.0
    assert policy.delay(1, retry_after=3600.0) == 0.5  # an hour would hang the run: back off normally
