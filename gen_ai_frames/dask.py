"""``ddf.genai.generate``: the pandas accessor, run partition by partition on a Dask cluster.

``import gen_ai_frames.dask`` registers the ``genai`` accessor on Dask DataFrames (install with
``pip install gen-ai-frames[dask]``). Each partition is answered by the pandas accessor
(:meth:`gen_ai_frames.accessor.GenAIAccessor.generate`), so rows, errors, dedupe and checkpoints
behave exactly as with pandas; the result is a lazy Dask DataFrame with the new columns.

>>> import dask.dataframe as dd, pandas as pd
>>> import gen_ai_frames.dask
>>> ddf = dd.from_pandas(pd.DataFrame({"text": ["a cat", "a dog"]}), npartitions=2)
>>> out = ddf.genai.generate(template="Describe {text}.", provider="openai",
...                          endpoint="http://127.0.0.1:8000/v1", model_name="m")
>>> list(out.columns), out.npartitions      # lazy: nothing was sent yet
(['text', 'response', 'error'], 2)
>>> out.compute()  # doctest: +SKIP

What travels to the workers is a client *configuration*, not a connection: either the
``create_client`` options (each task builds its own client, with a fresh connection pool, on the
worker) or a :class:`~gen_ai_frames.client.Client` object, which must pickle (cloudpickle). Either
way the API key travels inside the pickled task to the scheduler and the workers (it never appears
in a repr, a task name or a log line); when ``api_key`` is not given it is read from the provider's
environment variable *on the calling machine*, exactly as the pandas accessor does, and shipped.

Checkpoints: ``checkpoint="runs/enrich"`` is a sharded checkpoint (:mod:`gen_ai_frames.shards`):
every partition has its own checkpoint directory, ``runs/enrich/partition-00007/``, so a task
that fails or whose worker dies resumes where it stopped when Dask runs it again, and a later
``compute()`` of the same run resumes the whole run.
The directory must be a filesystem path every worker sees at the same place (see docs/distributed.md).

Limits are per run. On a distributed cluster (a ``distributed.Client`` is the scheduler when
``generate()`` is called) the run has one coordinator (a Dask Actor holding a
:class:`~gen_ai_frames.coordinator.RunCoordinator`) that every partition leases request slots
from: one rate limit, one pause after a 429, one budget, one concurrency total shared out among
the partitions running now, and one progress bar on the caller's side. Without a distributed
cluster (the threaded or synchronous scheduler) ``max_concurrent`` and the rate limits are split
over the partitions that run at once (see :func:`plan_concurrency`), and ``max_cost`` over all.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import dask.local
import pandas as pd
from dask.dataframe.extensions import register_dataframe_accessor

from .checkpoint import run_fingerprint, storage_for
from .client import Client
from .coordinator import LOST_AFTER_S, NEWS_WAIT_S, RunCoordinator, SharedRun
from .errors import ConfigurationError
from .factory import create_client
from .options import RunOptions, split_run_and_client, takes_options
from .params import validate_positive_int
from .pricing import price_for
from .providers import get_provider
from .providers.base import redact_url
from .ratelimit import RateLimiter, sharing_limits
from .shards import ShardedCheckpoint, kind_of

__all__ = ["DaskGenAIAccessor", "partition_checkpoint", "plan_concurrency"]

logger = logging.getLogger("gen_ai_frames")

# --------------------------------------------------------------------------------------------------
# Concurrency planning


def plan_concurrency(
    total: int,
    npartitions: int,
    partitions_in_flight: int | None = None,
    *,
    scheduler: Any = None,
) -> tuple[int, int]:
    """``(partitions_in_flight, per_partition)``: how a run's ``total`` limit is split.

    ``partitions_in_flight`` defaults to ``min(npartitions, slots)`` where ``slots`` is the number
    of worker threads of the distributed cluster ``compute()`` would use now, else Dask's
    ``num_workers`` setting, else ``os.cpu_count()`` (1 for the synchronous scheduler). Each
    partition then gets ``max(1, total // partitions_in_flight)``, so the partitions running at
    once never exceed ``total`` together, unless ``total < partitions_in_flight`` (each still gets 1).
    Rate limits are divided by ``partitions_in_flight`` too, exactly (they may be fractional).

    The cluster is looked at when ``generate()`` is called: pass ``partitions_in_flight`` when
    it will have more threads at ``compute()`` time (an adaptive cluster still scaling up).

    >>> plan_concurrency(64, npartitions=10, partitions_in_flight=4)
    (4, 16)
    >>> plan_concurrency(4, npartitions=1, partitions_in_flight=8)   # never more than the partitions
    (1, 4)
    >>> plan_concurrency(3, npartitions=8, partitions_in_flight=8)   # at least 1 each
    (8, 1)
    """
    validate_positive_int("max_concurrent", total)
    validate_positive_int("npartitions", npartitions)
    if partitions_in_flight is None:
        slots = _scheduler_slots(scheduler)
        # No workers yet (an adaptive cluster scaling up): assume every partition may run at
        # once, the split that can never exceed the total.
        in_flight = npartitions if slots is None else min(npartitions, slots)
    else:
        validate_positive_int("partitions_in_flight", partitions_in_flight)
        in_flight = min(npartitions, partitions_in_flight)
    return in_flight, max(1, total // in_flight)


def _scheduler_slots(scheduler: Any) -> int | None:
    """How many tasks the scheduler ``compute()`` would use runs at once; None if unknown (no workers)."""
    if scheduler is None:
        scheduler = dask.base.get_scheduler()
    owner = getattr(scheduler, "__self__", None)  # a distributed Client's bound ``get``
    if owner is not None and hasattr(owner, "nthreads"):
        threads = sum(owner.nthreads().values())
        return threads or None
    if scheduler is dask.local.get_sync:
        return 1
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def _split_rate(total: float, parts: int) -> float:
    """A run's rate limit per partition: an exact share (rates may be fractional), never rounded up.

    >>> _split_rate(100, 3)
    33.333333333333336
    """
    if isinstance(total, bool) or not isinstance(total, (int, float)) or total <= 0:
        return total  # the pandas accessor rejects it with its own message
    return total if parts == 1 else total / parts


# --------------------------------------------------------------------------------------------------
# What a task carries


class _ClientConfig:
    """What a worker needs to get a client: a picklable :class:`Client`, or ``create_client`` options.

    The repr hides everything but provider, model and (redacted) endpoint: the options may hold the
    API key, and Dask prints task arguments in some error messages.
    """

    __slots__ = ("client", "options")

    def __init__(self, client: Client | None, options: Mapping[str, Any]) -> None:
        self.client = client
        self.options = dict(options)

    def build(self) -> Client:
        return self.client if self.client is not None else create_client(**self.options)

    def __repr__(self) -> str:
        if self.client is not None:
            return f"_ClientConfig({self.client!r})"
        endpoint = self.options.get("endpoint")
        return (
            f"_ClientConfig(provider={self.options.get('provider', 'openai')!r}, "
            f"model_name={self.options.get('model_name')!r}, "
            f"endpoint={None if endpoint is None else redact_url(str(endpoint))!r})"
        )

    def __getstate__(self) -> tuple[Client | None, dict[str, Any]]:
        return self.client, self.options

    def __setstate__(self, state: tuple[Client | None, dict[str, Any]]) -> None:
        self.client, self.options = state


@dataclass(frozen=True)
class _PartitionJob:
    """Everything one partition task needs, in one picklable object (the same for every partition)."""

    column: Hashable | None
    template: str | None
    client: _ClientConfig
    options: RunOptions
    checkpoint: str | None
    resume: bool
    run_id: str
    npartitions: int | None = None
    #: The run's coordinator (a distributed Actor), None when the limits were split statically.
    coordinator: Any = None
    #: Request slots a partition leases at a time when nothing paces the run.
    lease: int = 64
    #: The static split of the run's rate limits: a partition's pace if the coordinator is lost.
    fallback_rates: tuple[float | None, float | None] = (None, None)
    budgeted: bool = False


def partition_checkpoint(root: str | os.PathLike[str], number: int) -> Path | str:
    """The checkpoint directory of partition ``number`` of a run checkpointed under ``root``.

    Read one partition's answers with :func:`gen_ai_frames.checkpoint.read_checkpoint` on it, or
    every partition's at once with ``read_checkpoint(root)``.

    >>> partition_checkpoint("/data/run.ckpt", 7).as_posix()
    '/data/run.ckpt/partition-00007'
    """
    return ShardedCheckpoint(root, "partitions", {}).shard_path(number)  # an s3:// root gives a URL


def _partition_number(number: int) -> pd.DataFrame:
    """One row holding a partition's number: see :func:`_numbered`."""
    return pd.DataFrame({"partition": pd.Series([number], dtype="int64")})


def _numbered(ddf: dd.DataFrame) -> dd.DataFrame:
    """A one-row-per-partition collection of partition numbers, aligned with ``ddf``'s partitions.

    Why not ``partition_info``: Dask numbers tasks within the expression it finally runs, and it
    moves a selection of partitions (``out.partitions[7]``, ``out.head()``) below
    ``map_partitions``, so partition 7 would be told it is number 0 and use partition 0's
    checkpoint. A collection passed alongside is sliced the same way as the data, so each
    partition always gets its own number.
    """
    return dd.from_map(
        _partition_number,
        range(ddf.npartitions),
        label="genai-partition-number",
        meta=_partition_number(0).iloc[:0],
        enforce_metadata=False,
    )


def _generate_partition(
    part: pd.DataFrame, job: _PartitionJob, numbers: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One task: the pandas accessor on one partition, with that partition's own checkpoint."""
    client = job.client.build()
    checkpoint: Path | str | None = None
    resume = job.resume
    if job.checkpoint is not None:
        if numbers is None or len(numbers) != 1:
            # Without its number a partition could share (and fight over) another's directory.
            raise RuntimeError("gen_ai_frames.dask: a checkpointed partition task got no partition number")
        number = int(numbers["partition"].iloc[0])
        # The fingerprint must be the one the runner stores, or its own (resume=True) open refuses it.
        fingerprint = run_fingerprint(client, job.options.params)
        run = ShardedCheckpoint.attach(
            job.checkpoint,
            "partitions",
            fingerprint,
            run_id=job.run_id,
            shards=job.npartitions,
            storage_options=job.options.storage_options,
        )
        checkpoint = run.shard_path(number)
        if not resume:
            run.start_shard_over_once(number, fingerprint)
            resume = True
        run.start_shard(number, len(part))
    options = job.options.replace(checkpoint=checkpoint, resume=resume)
    if job.coordinator is None:
        return part.genai.generate(job.column, client=client, template=job.template, **options.as_kwargs())
    coordinator = job.coordinator
    rates = job.fallback_rates
    shared = SharedRun(
        lambda *args: coordinator.lease(*args).result(timeout=LOST_AFTER_S),
        uuid.uuid4().hex,
        want=job.lease,
        fallback=RateLimiter(*rates) if any(rates) else None,
        budgeted=job.budgeted,
        watch=_news_watch(coordinator),
    )
    try:
        with sharing_limits(shared):
            return part.genai.generate(
                job.column, client=client, template=job.template, **options.as_kwargs()
            )
    finally:
        try:
            shared.finish()  # its rows count as done, its concurrency goes to the others
        except Exception as exc:  # the coordinator is gone (its worker died): the rows are answered
            logger.warning("gen_ai_frames.dask: could not report a finished partition: %s", exc)


class _RunActor:
    """The run's :class:`~gen_ai_frames.coordinator.RunCoordinator` as a Dask Actor. Its methods
    are async so that Dask runs them on the worker's event loop, one thread: a partition's news
    watch (a long poll) waits there without holding a thread, and is told by the leases."""

    def __init__(self, **options: Any) -> None:
        self._run = RunCoordinator(**options)

    async def lease(self, member: str, want: int, costs: dict, report: dict) -> dict:
        return self._run.lease(member, want, costs, report)

    async def news(self, version: int, timeout: float = NEWS_WAIT_S) -> int:
        return await self._run.wait_news(version, timeout)

    async def settings(self) -> dict[str, Any]:
        return self._run.settings()


def _news_watch(coordinator: Any) -> Any:
    """``watch(news, notify)`` for a partition's :class:`SharedRun`: a long poll of the
    coordinator's news, awaited on this worker's event loop (no thread waits for it)."""
    import distributed

    try:
        loop = distributed.get_worker().loop
    except ValueError:  # not in a worker: the partition polls every lease period instead
        return None

    def watch(news: int, notify: Any) -> None:
        async def relay() -> None:
            try:
                notify(await coordinator.news(news))
            except Exception:  # the coordinator is gone: the next lease notices and says so
                pass

        loop.add_callback(relay)

    return watch


def _log_event(topic: str, snapshot: dict[str, Any]) -> None:
    """Publish a run's progress (from the coordinator's worker) to the caller's bar."""
    import distributed

    distributed.get_worker().log_event(topic, snapshot)


class _RunBar:
    """The run's one progress bar, on the caller's side, fed by the coordinator's events: rows
    done of total (estimated until every partition started), errors, tokens, spend and the
    rate-limit state. A new bar for each compute of the frame."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.round = 0
        self.bars = 0

    def __call__(self, event: tuple[float, dict[str, Any]]) -> None:
        snapshot = event[1]
        if self.bar is not None and snapshot["round"] != self.round:
            self.bar.close()
            self.bar = None
        if self.bar is None:
            if snapshot["round"] == self.round:
                return  # a late event of a round already shown whole
            from tqdm.auto import tqdm

            self.round = snapshot["round"]
            self.bars += 1
            self.bar = tqdm(total=snapshot["total"], unit="row", desc="gen-ai-frames", dynamic_ncols=True)
        bar = self.bar
        bar.total = snapshot["total"]
        bar.n = snapshot["done"]
        fields: dict[str, Any] = {"errors": snapshot["errors"], "tokens": snapshot["tokens"]}
        if snapshot["spend"] is not None:
            fields["spend"] = f"${snapshot['spend']:.4f}"
        if snapshot["status"]:
            fields["status"] = snapshot["status"]
        bar.set_postfix(fields, refresh=False)
        bar.refresh()
        if snapshot["finished"]:
            bar.close()
            self.bar = None


def _distributed_client(scheduler: Any) -> Any:
    """The distributed Client whose ``get`` is ``scheduler``, or None (a local scheduler)."""
    owner = getattr(scheduler, "__self__", None)
    if owner is None:
        return None
    try:
        import distributed
    except ImportError:  # pragma: no cover - a bound get is only a distributed Client's
        return None
    return owner if isinstance(owner, distributed.Client) else None


# --------------------------------------------------------------------------------------------------
# The accessor


@register_dataframe_accessor("genai")
class DaskGenAIAccessor:
    """LLM generation over a Dask DataFrame's rows, one pandas accessor call per partition."""

    def __init__(self, ddf: dd.DataFrame) -> None:
        self._ddf = ddf

    @takes_options()
    def generate(
        self,
        column: Hashable | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        partitions_in_flight: int | None = None,
        **options: Any,
    ) -> dd.DataFrame:
        """A lazy copy of the frame with ``response`` and ``error`` columns (more with ``details=True``).

        Options are those of the pandas accessor, with these differences:

        * ``max_concurrent``, ``requests_per_minute``, ``tokens_per_minute`` and ``max_cost`` are
          run totals. On a distributed cluster one coordinator (a Dask Actor) holds them for the
          whole run: one pace (learned from any partition's headers and 429s), one pause, one
          budget spent first come, and the concurrency shared out among the partitions running
          now (see docs/distributed.md). Without one they are split over the partitions that run
          at once (:func:`plan_concurrency`); ``partitions_in_flight=`` overrides how many that is.
        * ``checkpoint`` is a directory holding one checkpoint per partition
          (``partition-00007/``). Resuming needs the same partitioning (same ``npartitions`` and
          rows per partition); rows that moved to another partition are sent again.
          ``resume=False`` discards what was stored before this call; recomputing the returned
          frame, or a task Dask runs again after a worker died, resumes.
        * ``progress``: on a distributed cluster, one bar for the run on the caller's side, fed by
          every partition; bars are always off inside workers.
        * Without a distributed cluster: the rate limits (or, when not given, those of ``client``)
          are divided exactly by the partitions in flight and a 429 pauses only the partition that
          received it; ``max_cost`` is divided equally over all partitions, and a partition that
          reaches its share leaves its remaining rows unsent (``NotSentError``).

        Settings are checked now, on the caller's side (an unknown option, column or provider fails
        here, not on a worker); nothing is sent before ``compute()``.

        >>> out = ddf.genai.generate(column="prompt", provider="openai", model_name="gpt-4o-mini",
        ...                          checkpoint="/shared/runs/enrich", max_concurrent=64)  # doctest: +SKIP
        >>> out.to_parquet("/shared/out/")  # doctest: +SKIP
        """
        ddf = self._ddf
        run, client_options = split_run_and_client(
            options, client, where="ddf.genai.generate", also=("partitions_in_flight",)
        )
        scheduler = dask.base.get_scheduler(collections=[ddf])
        in_flight, per_partition = plan_concurrency(
            run.max_concurrent, ddf.npartitions, partitions_in_flight, scheduler=scheduler
        )
        # Rate limits given for the call, else the client's own defaults: both are run totals here.
        totals, limits = {}, {}
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(run, name)
            if value is None and client is not None:
                value = getattr(client, name, None)
            if value is not None:
                totals[name] = value
                limits[name] = _split_rate(value, in_flight)
        # progress: a bar per worker task would only fill the worker logs.
        partition_options = run.replace(
            max_concurrent=per_partition,
            progress=False,
            checkpoint=None,
            resume=True,
            **limits,
            max_cost=None if run.max_cost is None else run.max_cost / ddf.npartitions,
        )
        config = _client_config(client, client_options)
        # The pandas accessor on the empty meta frame checks the columns, template fields and names
        # and gives the exact output columns and dtypes, sending nothing.
        built = config.build()
        meta = ddf._meta.genai.generate(
            column, client=built, template=template, **partition_options.as_kwargs()
        )
        checkpoint_root = _checkpoint_root(
            run.checkpoint, run.storage_options
        )  # checked before the coordinator starts
        cluster = _distributed_client(scheduler)
        coordinator = None
        if cluster is not None:
            # One coordinator for the run: the limits, the budget and the progress are its, whole.
            run_id = uuid.uuid4().hex
            topic = f"gen-ai-frames-{run_id}"
            if run.progress:
                cluster.subscribe_topic(topic, _RunBar())
            coordinator = cluster.submit(
                _RunActor,
                max_concurrent=run.max_concurrent,
                requests_per_minute=totals.get("requests_per_minute"),
                tokens_per_minute=totals.get("tokens_per_minute"),
                max_cost=run.max_cost,
                price=None
                if run.max_cost is None
                else price_for(built.model_name, run.prices, built.provider.name),
                npartitions=ddf.npartitions,
                in_flight=in_flight,
                publish=functools.partial(_log_event, topic),
                actor=True,
                key=f"genai-coordinator-{run_id}",
            ).result()
            # Each partition may use the whole total: the coordinator paces and shares it out.
            partition_options = partition_options.replace(
                max_concurrent=run.max_concurrent,
                requests_per_minute=None,
                tokens_per_minute=None,
                max_cost=None,
            )
        job = _PartitionJob(
            column=column,
            template=template,
            client=config,
            options=partition_options,
            checkpoint=checkpoint_root,
            resume=run.resume,
            run_id=uuid.uuid4().hex,
            npartitions=ddf.npartitions,
            coordinator=coordinator,
            # Unpaced slots cost nothing to hold: big leases make the coordinator's round trips rare.
            lease=min(1024, max(64, 4 * run.max_concurrent)),
            fallback_rates=(limits.get("requests_per_minute"), limits.get("tokens_per_minute")),
            budgeted=run.max_cost is not None,
        )
        if job.checkpoint is None:
            return ddf.map_partitions(_generate_partition, job, meta=meta)
        # align_dataframes=False: pair partition i with number i, whatever the divisions.
        return ddf.map_partitions(_generate_partition, job, _numbered(ddf), meta=meta, align_dataframes=False)


def _client_config(client: Client | None, options: dict[str, Any]) -> _ClientConfig:
    if client is not None:
        config = _ClientConfig(client, {})
    else:
        options = dict(options)
        if options.get("api_key") is None:
            # Read the key where the pandas accessor would (the caller's environment), so workers
            # on other machines need no copy of it. None leaves the lookup to the worker.
            provider = get_provider(options.get("provider", "openai"))
            if provider.api_key_env and os.environ.get(provider.api_key_env):
                options["api_key"] = os.environ[provider.api_key_env]
        config = _ClientConfig(None, options)
    _check_picklable(config)
    return config


def _check_picklable(config: _ClientConfig) -> None:
    import cloudpickle  # a dependency of dask

    try:
        cloudpickle.dumps(config)
    except Exception as exc:  # pickling failures come as TypeError, PicklingError, AttributeError...
        what = "client=" if config.client is not None else "the client options"
        raise ConfigurationError(
            f"{what} cannot be sent to Dask workers ({type(exc).__name__}: {exc}). Pass provider=, "
            "model_name=, endpoint= and api_key= instead (each worker builds its own client), and "
            "give verify= a CA bundle path rather than an SSLContext."
        ) from None


def _checkpoint_root(
    checkpoint: str | os.PathLike[str] | None, storage_options: Mapping[str, Any] | None = None
) -> str | None:
    if checkpoint is None:
        return None
    path = os.fspath(checkpoint)
    if not isinstance(path, str):
        raise ConfigurationError(
            f"checkpoint must be a filesystem path that every worker sees (a local disk for a "
            f"LocalCluster, a shared mount such as NFS for a cluster) or an s3:// URL, got {checkpoint!r}"
        )
    # Absolute on the caller's side: a worker's working directory may be anywhere.
    root = path if "://" in path else os.path.abspath(path)
    store = storage_for(root, storage_options)  # checks the URL and options before any task runs
    if store.has("manifest.json"):
        raise ConfigurationError(
            f"{root} is a checkpoint of a pandas run; a Dask run keeps one checkpoint per partition "
            "under its directory: choose another path"
        )
    if kind_of(store) == "batches":
        raise ConfigurationError(
            f"{root} is a checkpoint of the command line (one per batch of a file); a Dask run keeps "
            "one checkpoint per partition: choose another path"
        )
    return root
