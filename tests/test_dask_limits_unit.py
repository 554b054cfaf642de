"""The run coordinator and a partition's side of it, without a cluster: injected clocks, no sleeps.

The same objects run in a Dask Actor and in partition tasks (tests/test_dask_limits.py); here two
``SharedRun``\\ s standing for two worker processes talk to one ``RunCoordinator`` directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gen_ai_frames.coordinator import LEASE_S, RunCoordinator, SharedRun
from gen_ai_frames.engine import Engine
from gen_ai_frames.errors import NotSentError
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.providers import get_provider
from gen_ai_frames.ratelimit import Pace, current_shared_limits, sharing_limits
from gen_ai_frames.transport import HttpResponse

REQUEST = {"requests": 1.0, "tokens": 10.0, "input-tokens": 5.0, "output-tokens": 5.0}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def coordinator(clock: Clock, **options: Any) -> RunCoordinator:
    return RunCoordinator(clock=clock, **{"npartitions": 2, "max_concurrent": 8, **options})


def report(**fields: Any) -> dict[str, Any]:
    from gen_ai_frames.coordinator import _empty_report

    return {**_empty_report(), **fields}


def test_one_rate_limit_for_every_partition() -> None:
    clock = Clock()
    run = coordinator(clock, requests_per_minute=600)
    a = run.lease("a", 8, REQUEST, {})["waits"]
    b = run.lease("b", 8, REQUEST, {})["waits"]
    # 10/s for the run: a lease covers LEASE_S of it, and b's slots come after a's, not beside them.
    assert len(a) == len(b) == round(10 * LEASE_S)
    assert a == pytest.approx([0.0, 0.1]) and b == pytest.approx([0.2, 0.3])


def test_slots_given_back_free_their_time_and_expired_ones_do_not() -> None:
    clock = Clock()
    run = coordinator(clock, requests_per_minute=600)
    assert run.lease("a", 8, REQUEST, {})["waits"] == pytest.approx([0.0, 0.1])
    # a ended before using them: the next partition may take their time at once.
    assert run.lease("b", 8, REQUEST, report(returned=0))["waits"] == pytest.approx([0.2, 0.3])
    run.lease("a", 0, REQUEST, report(returned=2, finished=True))  # a's slots: b's come sooner
    assert run.lease("b", 8, REQUEST, {})["waits"] == pytest.approx([0.2, 0.3])
    run.lease("b", 0, REQUEST, report(expired=2))  # slots let pass: their time is gone
    assert run.lease("b", 8, REQUEST, {})["waits"] == pytest.approx([0.4, 0.5])
    assert run.members["a"].outstanding == 0


def test_limits_learned_by_one_partition_pace_the_others() -> None:
    clock = Clock()
    run = coordinator(clock)
    assert run.lease("b", 8, REQUEST, {})["paced"] is False  # nothing known: no pace yet
    headers = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": "2s"}
    run.lease("a", 0, REQUEST, report(headers=headers, answers=1, settled=1))
    grant = run.lease("b", 8, REQUEST, {})
    assert grant["paced"] is True and grant["pause"] == pytest.approx(2.0)
    assert grant["waits"][0] == pytest.approx(2.0)  # booked after the reset the headers stated
    assert len(grant["waits"]) == 2  # 600/min: two slots per lease


def test_a_pause_asked_of_one_partition_holds_the_others() -> None:
    clock = Clock()
    run = coordinator(clock)
    run.lease("b", 8, REQUEST, {})
    grant_a = run.lease("a", 0, REQUEST, report(pause=(3.0, "rate limited"),
                                                rate_limited=[(0.0, 1), (0.0, 2), (0.0, 3)]))
    grant_b = run.lease("b", 8, REQUEST, {})
    assert grant_a["pause"] == pytest.approx(3.0) and grant_b["pause"] == pytest.approx(3.0)
    assert grant_b["pause_reason"] == "rate limited"
    assert run.rate_limited == 3
    clock.now += 3.5
    assert run.lease("b", 8, REQUEST, {})["pause"] == 0.0


def test_429s_reported_by_partitions_cut_the_run_pace() -> None:
    clock = Clock()
    run = coordinator(clock)
    for _ in range(40):  # 20 answers/s served for 2 s
        clock.now += 0.05
        run.lease("a", 0, REQUEST, report(answers=1, settled=1))
    grant = run.lease("b", 0, REQUEST, report(rate_limited=[(0.0, 7)]))
    assert run.pace.request_rate is not None and run.pace.request_rate < 20
    assert grant["generation"] == 1  # slots booked before the cut are void
    assert run.lease("a", 8, REQUEST, {})["paced"] is True


def test_budget_is_one_for_the_run_and_stops_every_partition() -> None:
    clock = Clock()
    run = coordinator(clock, max_cost=10.0, price=(1e6, 1e6))  # $1 a token
    paid = {"settled": 1, "answers": 1, "paid": 1, "prompt_tokens": 3, "completion_tokens": 3}
    assert len(run.lease("a", 8, REQUEST, {})["waits"]) == 1  # worst case $10 a request: one
    assert run.lease("b", 8, REQUEST, {})["waits"] == []  # the whole budget is in flight
    # a's answer cost $6: $4 left, less than a request, but someone may try: the first to ask.
    assert len(run.lease("a", 8, REQUEST, report(**paid))["waits"]) == 1
    grant = run.lease("b", 8, REQUEST, {})
    assert grant["stop"] is None and grant["waits"] == []  # a's request holds the rest
    grant = run.lease("a", 8, REQUEST, report(**paid))
    assert grant["stop"] is not None and "max_cost=$10" in grant["stop"][0] and grant["waits"] == []
    assert run.lease("b", 8, REQUEST, {})["stop"] == grant["stop"]
    assert run.spend.usd == 12.0  # the budget plus the one request in flight when it ran out


def test_concurrency_is_shared_out_among_running_partitions() -> None:
    clock = Clock()
    run = coordinator(clock, npartitions=4, in_flight=2, max_concurrent=8)
    assert run.lease("a", 0, REQUEST, {})["concurrency"] == 4  # two expected at once
    assert run.lease("b", 0, REQUEST, {})["concurrency"] == 4
    run.lease("c", 0, REQUEST, {})
    assert run.lease("a", 0, REQUEST, {})["concurrency"] == 2  # three running now
    run.lease("b", 0, REQUEST, report(finished=True))
    run.lease("c", 0, REQUEST, report(finished=True))
    assert run.lease("d", 0, REQUEST, {})["concurrency"] == 4  # the tail gets the whole total
    assert run.lease("a", 0, REQUEST, {})["concurrency"] == 4


def test_progress_counts_rows_of_every_partition() -> None:
    clock = Clock()
    events: list[dict[str, Any]] = []
    run = coordinator(clock, publish=events.append)
    run.lease("a", 0, REQUEST, report(total=10, done=4, failed_before=1, rows=3, errors=1))
    snapshot = run.snapshot()
    assert (snapshot["done"], snapshot["errors"], snapshot["total"]) == (7, 2, 20)  # b assumed alike
    run.lease("b", 0, REQUEST, report(total=30, rows=30, finished=True))
    run.lease("a", 0, REQUEST, report(rows=3, finished=True))
    assert events[-1]["finished"] and (events[-1]["done"], events[-1]["total"]) == (40, 40)
    # A new compute of the same frame starts a new round, from zero.
    run.lease("a2", 0, REQUEST, report(total=10))
    assert run.snapshot()["round"] == 2 and run.snapshot()["done"] == 0


def test_shared_run_leases_in_batches_and_reports_with_the_next_lease() -> None:
    clock = Clock()
    run = coordinator(clock, requests_per_minute=6000)  # 100/s: 20 slots a lease
    calls: list[dict[str, Any]] = []

    def call(member: str, want: int, costs: dict, news: dict) -> dict:
        calls.append(news)
        return run.lease(member, want, costs, news)

    shared = SharedRun(call, "a", want=64, clock=clock)
    pace = Pace(16, clock=clock)
    shared.attach(pace)
    assert pace.cap == 1  # until the first lease tells the share

    async def go() -> list[float]:
        waits = [await shared.reserve(REQUEST) for _ in range(20)]
        for _ in range(20):
            shared.settle("answered", prompt_tokens=2, completion_tokens=3)
        shared.advance(20, failed=False)
        await shared.close()
        return waits

    waits = asyncio.run(go())
    assert waits == pytest.approx([i * 0.01 for i in range(20)])
    assert len(calls) <= 3  # one lease for 20 requests (and the report at the end)
    assert pace.cap == 4  # 8 for the run, 2 partitions expected
    assert run.requests == 20 and run.spend.tokens == 100
    assert run.members["a"].done == 20 and run.members["a"].outstanding == 0


def test_shared_run_hears_a_pause_and_a_stop_from_another_partition() -> None:
    clock = Clock()
    run = coordinator(clock, max_cost=1000.0, price=(1e6, 1e6))
    a = SharedRun(lambda *args: run.lease(*args), "a", clock=clock)
    b = SharedRun(lambda *args: run.lease(*args), "b", clock=clock)

    async def go() -> None:
        await b.reserve(REQUEST)
        a.pause(5.0, "rate limited")
        await a.reserve(REQUEST)  # a's next lease takes the pause to the coordinator
        clock.now += 1.0
        b._wake.set()  # b's next lease (its pump would take it within LEASE_S)
        await asyncio.sleep(0.05)
        assert b.paused_until == pytest.approx(clock.now + 4.0)
        a.settle("answered", prompt_tokens=600, completion_tokens=400)
        a._wake.set()
        await asyncio.sleep(0.05)
        b._wake.set()
        await asyncio.sleep(0.05)
        assert isinstance(b.stopped, NotSentError) and "max_cost=$1000" in b.stopped.message
        await a.close()
        await b.close()

    asyncio.run(go())


def test_sharing_limits_reaches_the_engine() -> None:
    clock = Clock()
    run = coordinator(clock, npartitions=1)
    shared = SharedRun(lambda *args: run.lease(*args), "a", want=2, clock=clock)
    sent: list[float] = []

    class Transport:
        async def send(self, request: Any) -> HttpResponse:
            sent.append(clock.now)
            return HttpResponse(200, {"x-ratelimit-limit-requests": "60"},
                                b'{"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],'
                                b' "usage": {"prompt_tokens": 1, "completion_tokens": 1}}')

        async def aclose(self) -> None:
            pass

    async def sleep(seconds: float) -> None:
        clock.now += seconds

    provider = get_provider("openai")(endpoint="http://127.0.0.1:9/v1", model_name="m", api_key="k")
    engine = Engine(provider, Transport(), max_concurrent=1, sleep=sleep, clock=clock)
    messages = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]

    async def go() -> list[Any]:
        with sharing_limits(shared):
            assert current_shared_limits() is shared
            return await engine.run(messages, GenerationParams())

    results = asyncio.run(go())
    assert all(r.ok for r in results)
    assert current_shared_limits() is None
    # The first answers stated 60/min: once the coordinator heard it (with the next lease, after
    # the two slots leased before), it paced the rest one second apart.
    assert run.pace.request_rate == pytest.approx(1.0)
    assert sent[:2] == [1000.0, 1000.0]
    assert [round(b - a, 6) for a, b in zip(sent[2:], sent[3:])] == [1.0, 1.0, 1.0]
    assert run.requests == 6 and run.spend.tokens == 12


class RecordingBar:
    """Stands in for tqdm: records every bar made and what it showed."""

    made: list[RecordingBar] = []

    def __init__(self, total: int | None = None, initial: int = 0, **options: Any) -> None:
        self.total, self.n, self.closed, self.postfix = total, initial, False, {}
        RecordingBar.made.append(self)

    def update(self, rows: int) -> None:
        self.n += rows

    def set_postfix(self, fields: dict[str, Any], refresh: bool = True) -> None:
        self.postfix = dict(fields)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_cli_shows_one_bar_per_file_not_per_batch(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd
    import tqdm.auto

    from gen_ai_frames.cli import main
    from gen_ai_frames.testing import FakeServer

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    RecordingBar.made = []
    source, target = tmp_path / "in.parquet", tmp_path / "out.parquet"
    prompts = [f"question {i}" for i in range(48)] + ["bad [[status=400]]"] * 2
    pd.DataFrame({"prompt": prompts}).to_parquet(source, index=False)
    with FakeServer() as fake:
        code = main(["generate", str(source), "-o", str(target), "--column", "prompt", "--endpoint", fake.url,
                     "--model", "m", "--batch-rows", "7"])
    err = capsys.readouterr().err
    assert code != 0 or "failed" in err  # two rows failed
    assert "batch 8/8" in err  # the file came in 8 batches
    (bar,) = RecordingBar.made
    assert (bar.total, bar.n, bar.closed) == (50, 50, True)
    assert bar.postfix["errors"] == 2


def test_a_lost_coordinator_leaves_each_partition_on_its_own(caplog: pytest.LogCaptureFixture) -> None:
    from gen_ai_frames.ratelimit import RateLimiter

    clock = Clock()

    def gone(*args: Any) -> dict:
        raise OSError("Timed out trying to connect to tcp://127.0.0.1:9")

    alone = SharedRun(gone, "a", clock=clock, fallback=RateLimiter(600, clock=clock))
    budgeted = SharedRun(gone, "b", clock=clock, budgeted=True)

    async def go() -> tuple[list[float], float]:
        waits = [await alone.reserve(REQUEST) for _ in range(3)]
        await budgeted.reserve(REQUEST)
        await alone.close()
        await budgeted.close()
        return waits, 0.0

    waits, _ = asyncio.run(go())
    assert waits == pytest.approx([0.0, 0.1, 0.2])  # its static share of the limit paces it
    assert alone.lost is not None and alone.stopped is None
    assert isinstance(budgeted.stopped, NotSentError) and "coordinator was lost" in budgeted.stopped.message
    assert "cannot be reached" in caplog.text
    budgeted.finish()  # nothing to report to: no error
