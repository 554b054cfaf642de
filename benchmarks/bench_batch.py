"""Batch throughput and client CPU: our client vs raw aiohttp, the openai SDK and plain httpx.

One run starts the fake server once (fixed latency), then sends the same N prompts through each
variant, every variant in its own fresh subprocess:

* ``ours``    ``create_client(provider="openai", endpoint=url, model_name="m")
               .generate_batch_response(prompts, max_concurrent=C, max_tokens=16)``
* ``aiohttp`` one ``aiohttp.ClientSession`` (``TCPConnector(limit=C)``), an ``asyncio.Semaphore(C)``,
              one task per prompt via ``asyncio.gather``, ``json=`` body, ``await resp.json()``
* ``openai``  ``AsyncOpenAI(base_url=url, api_key="x", max_retries=0, http_client=
              DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=None,
              max_keepalive_connections=None)))`` with a semaphore
* ``httpx``   a plain ``httpx.AsyncClient`` (unlimited pool) with a semaphore

All variants send the same body (model, max_tokens, temperature=0, top_p=1, one user message).
The measured "send phase" is the one call that sends everything (for the baselines: the
``asyncio.run`` that opens the session, sends, and closes it; for ours:
``generate_batch_response``, which does the same). Imports (including aiohttp, which our transport
imports lazily on its first send) and client construction are outside it.
Client CPU is ``time.process_time()`` of the worker over the send phase; server CPU is the fake
server process's CPU over the whole worker run (it idles outside the send phase).

Every answer is checked: ``answers[i] == "echo: " + prompts[i]`` for all i (right answer, right
order).

    python benchmarks/bench_batch.py                       # N=5000, C=256, 50 ms
    python benchmarks/bench_batch.py --repeat 3 --variants ours,aiohttp
    python benchmarks/bench_batch.py --profile py-spy --variants ours   # hot spots of our client
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

VARIANTS = ("ours", "aiohttp", "openai", "httpx")
TARGET_THROUGHPUT = 0.85  # ours / raw aiohttp, at least
TARGET_CPU = 1.5  # ours / raw aiohttp CPU per request, at most


def make_prompts(n: int) -> list[str]:
    """Distinct, short prompts: the fake server's answer ("echo: " + prompt) stays under 16 words."""
    return [f"Item {i}: describe it briefly." for i in range(n)]


def expected(prompt: str) -> str:
    return "echo: " + prompt


def request_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    # What our OpenAI provider sends, so every variant moves the same bytes.
    return {"model": "m", "max_tokens": max_tokens, "temperature": 0, "top_p": 1.0,
            "messages": [{"role": "user", "content": prompt}]}


# ------------------------------------------------------------------------------------ variants
# Each setup function does the imports and builds the client, then returns the "send" callable
# whose run is measured. A failed request gives None (counted as an error), never an exception.
Setup = Callable[[list[str], str, int, int], Callable[[], list[Any]]]


def setup_ours(prompts: list[str], url: str, max_concurrent: int, max_tokens: int) -> Callable[[], list[Any]]:
    import aiohttp  # noqa: F401  (our transport imports it lazily on first send: keep imports out of the timing)

    from gen_ai_frames import create_client

    client = create_client(provider="openai", endpoint=url, model_name="m")

    def send() -> list[Any]:
        return client.generate_batch_response(prompts, max_concurrent=max_concurrent, max_tokens=max_tokens)

    return send


def setup_aiohttp(prompts: list[str], url: str, max_concurrent: int, max_tokens: int) -> Callable[[], list[Any]]:
    import aiohttp

    endpoint = url + "/chat/completions"

    async def main() -> list[Any]:
        semaphore = asyncio.Semaphore(max_concurrent)
        connector = aiohttp.TCPConnector(limit=max_concurrent)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(prompt: str) -> str:
                async with semaphore:
                    async with session.post(endpoint, json=request_body(prompt, max_tokens)) as resp:
                        resp.raise_for_status()
                        data = await resp.json()
                        return data["choices"][0]["message"]["content"]

            results = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
        return [None if isinstance(r, BaseException) else r for r in results]

    return lambda: asyncio.run(main())


def setup_openai(prompts: list[str], url: str, max_concurrent: int, max_tokens: int) -> Callable[[], list[Any]]:
    import httpx
    import openai

    async def main() -> list[Any]:
        semaphore = asyncio.Semaphore(max_concurrent)
        http_client = openai.DefaultAsyncHttpxClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, http_client=http_client) as client:

            async def one(prompt: str) -> str | None:
                async with semaphore:
                    completion = await client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": prompt}],
                        max_tokens=max_tokens, temperature=0, top_p=1.0)
                    return completion.choices[0].message.content

            results = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
        return [None if isinstance(r, BaseException) else r for r in results]

    return lambda: asyncio.run(main())


def setup_httpx(prompts: list[str], url: str, max_concurrent: int, max_tokens: int) -> Callable[[], list[Any]]:
    import httpx

    endpoint = url + "/chat/completions"

    async def main() -> list[Any]:
        semaphore = asyncio.Semaphore(max_concurrent)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:

            async def one(prompt: str) -> str:
                async with semaphore:
                    resp = await client.post(endpoint, json=request_body(prompt, max_tokens))
                    resp.raise_for_status()
                    return resp.json()["choices"][0]["message"]["content"]

            results = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
        return [None if isinstance(r, BaseException) else r for r in results]

    return lambda: asyncio.run(main())


SETUPS: dict[str, Setup] = {"ours": setup_ours, "aiohttp": setup_aiohttp, "openai": setup_openai,
                            "httpx": setup_httpx}


def worker(args: argparse.Namespace) -> None:
    """Child process: set up one variant, measure its send phase, check the answers, emit JSON."""
    prompts = make_prompts(args.n)
    send = SETUPS[args._worker](prompts, args.url, args.max_concurrent, args.max_tokens)
    gc.collect()
    with _common.maybe_cprofile(args._cprofile), _common.measure() as m:
        answers = timed_send(send)
    correct = sum(1 for a, p in zip(answers, prompts) if a == expected(p)) if len(answers) == len(prompts) else 0
    errors = sum(1 for a in answers if a is None)
    first_wrong = next(((i, a) for i, (a, p) in enumerate(zip(answers, prompts)) if a != expected(p)), None)
    _common.emit_result({
        "variant": args._worker, "n": args.n, **m.as_dict(),
        "correct": correct, "errors": errors, "answers": len(answers),
        "first_wrong": None if first_wrong is None else [first_wrong[0], repr(first_wrong[1])[:200]],
    })


def timed_send(send: Callable[[], list[Any]]) -> list[Any]:
    """The measured call; its name marks the send phase in py-spy stacks."""
    return send()


# --------------------------------------------------------------------------------------- parent
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="prompts per variant (default 5000)")
    p.add_argument("--max-concurrent", type=int, default=256, help="requests in flight (default 256)")
    p.add_argument("--latency", type=float, default=0.05, help="fake server latency in s (default 0.05)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1, help="rounds over all variants; medians are reported")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--json", metavar="PATH", help="also write all measurements to this JSON file")
    p.add_argument("--profile", choices=("cprofile", "py-spy"),
                   help="profile each variant's send phase (distorts the timings!)")
    p.add_argument("--profile-dir", default=None, help="where profiles go (default: a new temp dir)")
    p.add_argument("--timeout", type=float, default=600, help="per-worker timeout (s)")
    # internal: worker mode
    p.add_argument("--_worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--_cprofile", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    return args


def worker_cmd(args: argparse.Namespace, variant: str, url: str, profile_dir: Path | None,
               run_no: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", variant, "--url", url,
           "--n", str(args.n), "--max-concurrent", str(args.max_concurrent), "--max-tokens", str(args.max_tokens)]
    return _common.with_profiler(cmd, args.profile, profile_dir, f"{variant}-{run_no}", rate=500)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return 0

    profile_dir = None
    if args.profile:
        profile_dir = Path(args.profile_dir or tempfile.mkdtemp(prefix="bench_batch_prof_"))
        profile_dir.mkdir(parents=True, exist_ok=True)

    _common.print_environment()
    print(f"# bench_batch: N={args.n}, max_concurrent={args.max_concurrent}, latency={args.latency * 1000:g} ms, "
          f"max_tokens={args.max_tokens}, repeat={args.repeat}, variants={','.join(args.variant_list)}")
    runs: list[dict[str, Any]] = []
    with _common.FakeServerProcess(["--latency", str(args.latency)]) as server:
        print(f"# fake server pid {server.pid} at {server.url}")
        for run_no in range(1, args.repeat + 1):
            for variant in args.variant_list:
                result = _common.run_measured_worker(
                    server, worker_cmd(args, variant, server.url, profile_dir, run_no), timeout=args.timeout)
                row = finish_row(result, run_no)
                runs.append(row)
                print(f"  run {run_no} {variant:8s} {row['rps']:8.0f} req/s  {row['cpu_ms']:.3f} ms CPU/req  "
                      f"correct {row['correct']}/{row['n']}  max_in_flight {row['max_in_flight']}  "
                      f"background load {row['background_cores']:.2f} cores", flush=True)

    columns = [("variant", "variant", ""), ("wall_s", "wall s", ".2f"), ("rps", "req/s", ".0f"),
               ("cpu_ms", "client CPU ms/req", ".3f"), ("user_ms", "user ms/req", ".3f"),
               ("sys_ms", "sys ms/req", ".3f"), ("server_cpu_ms", "server CPU ms/req", ".3f"),
               ("max_in_flight", "max in flight", "d"), ("background_cores", "bg load (cores)", ".2f"),
               ("check", "correct", "")]
    if args.repeat > 1:
        print("\nAll runs:")
        print(_common.format_table(runs, [("run", "run", "d"), *columns]))
    summary = summarize(runs, args.variant_list)
    print(f"\nMedian of {args.repeat} run(s) per variant:" if args.repeat > 1 else "\nResults:")
    print(_common.format_table(summary, columns))
    ratios = ratio_rows(summary)
    if ratios:
        print("\nOurs vs each baseline (throughput: higher is better; CPU/request: lower is better):")
        print(_common.format_table(ratios, [("baseline", "baseline", ""), ("throughput", "ours/baseline req/s", ".2f"),
                                            ("cpu", "ours/baseline CPU per req", ".2f"), ("verdict", "targets", "")]))
    failed = [r for r in runs if r["correct"] != r["n"]]
    for r in failed:
        print(f"!! {r['variant']} run {r['run']}: only {r['correct']}/{r['n']} answers correct "
              f"({r['errors']} errors); first wrong: {r['first_wrong']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": _common.environment(), "args": {
            k: v for k, v in vars(args).items() if not k.startswith("_")}, "runs": runs, "summary": summary,
            "ratios": ratios}, indent=2))
    if profile_dir is not None:
        report_profiles(args.profile, profile_dir)
    return 1 if failed else 0


def finish_row(result: dict[str, Any], run_no: int) -> dict[str, Any]:
    n = result["n"]
    row = dict(result)
    row.pop("stderr", None)
    row.update(run=run_no, rps=n / result["wall_s"], cpu_ms=result["cpu_s"] * 1000 / n,
               user_ms=result["user_s"] * 1000 / n, sys_ms=result["sys_s"] * 1000 / n,
               server_cpu_ms=result["server_cpu_s"] * 1000 / n, check=f"{result['correct']}/{n}")
    return row


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    out = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        row: dict[str, Any] = {"variant": variant}
        for key in ("wall_s", "rps", "cpu_ms", "user_ms", "sys_ms", "server_cpu_ms", "background_cores"):
            row[key] = _common.median([r[key] for r in mine])
        row["max_in_flight"] = max(r["max_in_flight"] for r in mine)
        row["check"] = f"{sum(r['correct'] for r in mine)}/{sum(r['n'] for r in mine)}"
        out.append(row)
    return out


def ratio_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["variant"]: r for r in summary}
    ours = by.get("ours")
    if ours is None:
        return []
    rows = []
    for name, base in by.items():
        if name == "ours":
            continue
        throughput = ours["rps"] / base["rps"]
        cpu = ours["cpu_ms"] / base["cpu_ms"]
        verdict = ""
        if name == "aiohttp":
            verdict = (f"throughput >= {TARGET_THROUGHPUT}: {'PASS' if throughput >= TARGET_THROUGHPUT else 'MISS'}; "
                       f"CPU <= {TARGET_CPU}: {'PASS' if cpu <= TARGET_CPU else 'MISS'}")
        rows.append({"baseline": name, "throughput": throughput, "cpu": cpu, "verdict": verdict})
    return rows


def report_profiles(kind: str, profile_dir: Path) -> None:
    print(f"\nProfiles in {profile_dir}")
    if kind == "cprofile":
        for txt in sorted(profile_dir.glob("*.prof.txt")):
            print(f"  {txt}  (top functions by own time, then cumulative)")
        return
    for path in sorted(profile_dir.glob("*.collapsed")):
        print(f"\n== {path.name}: send phase only (stacks through timed_send), % of samples ==")
        print(_common.summarize_collapsed(path, must_contain="timed_send"))


if __name__ == "__main__":
    sys.exit(main())
