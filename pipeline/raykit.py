"""The Ray stage kit: connect to (or start) Ray, size the actor pool, run shard-per-unit stages.

Every Ray stage (extraction, CAMs from images, evaluation, audit, L-CAM-Img training)
starts here, so that Ray is configured one way.

:func:`run_shard_stage` is the write path of the stages that turn source shards into
store groups (extraction, CAMs from shards): one unit of work = one shard; CPU tasks
read and decode it into the object store, an actor runs the model over it and writes that
shard's group itself; the driver receives only the manifest entry (metadata).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .decoders import Decoder, site_needs_gpus, stage_decoding
from .processes import descendant_pids, process_alive
from .shard_tasks import RawPart

log = logging.getLogger(__name__)

# A local Ray we start gets a bounded object store. Ray's default is 30% of the machine's
# memory (7 GB on a 24 GB machine; the extraction's process tree peaked near 8 GB on 800
# images with it). What our stages keep in it is bounded by their in-flight windows (see
# run_shard_stage: 2 shards per actor, ~150 MB of 224 px pixels per 1,000-image shard and
# view, plus the tar bytes), so 2 GiB holds several actors' windows; anything beyond spills
# to disk instead of growing memory. LCAM_OBJECT_STORE_MB overrides it.
LOCAL_OBJECT_STORE_BYTES = 2 * 2**30
# Ray Data stages (CAMs from images, evaluation, audit) get the same budget for their
# in-flight blocks: Ray Data backpressures its operators to stay under it (its default is
# a share of the whole cluster's store, which grows with the cluster, not with the job).
DATA_OBJECT_STORE_BYTES = 1 * 2**30


def local_object_store_bytes() -> int:
    """The object store size of a local Ray we start (LCAM_OBJECT_STORE_MB, else the default)."""
    mb = os.environ.get("LCAM_OBJECT_STORE_MB")
    return int(float(mb) * 2**20) if mb else LOCAL_OBJECT_STORE_BYTES


# A local Ray of ours: no token to set up, no usage report sent (the user's own values win).
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
VERBOSE_ENV = "LCAM_VERBOSE"  # set by `lcam --verbose`: Ray's own log lines are shown
# A local Ray of ours runs without Ray's dashboard: a command's Ray ends with the command, so
# nobody watches it, and its processes took ~2.5 ms of CPU per extracted image on 2 cores
# (benchmarks/RESULTS.md, "Extraction: where the CPU goes"). LCAM_RAY_DASHBOARD=1 keeps it.
DASHBOARD_ENV = "LCAM_RAY_DASHBOARD"
# ... and, without the dashboard, Ray's metrics are off, its log monitor rescans the log folder
# every 5 s instead of every 0.1 s, and its dashboard agent takes its node stats (psutil over
# every Ray process) every 60 s instead of every 5 s: nothing reads any of them (no dashboard or
# Prometheus; the log monitor only forwards workers' output to drivers, and ours say
# log_to_driver=False). Measured on 2 cores (benchmarks/RESULTS.md, "Ray's own processes, idle
# and under small tasks"): Ray's daemons 32 -> 20 ms of CPU a second idle, 65 -> 44 at 15
# small tasks a second (metrics ~7 idle / ~14 busy, the log monitor's scans ~6, the node stats
# ~2.5). Ray's memory monitor (OOM protection) and task events (the state API) stay as they are.
QUIET_SYSTEM_CONFIG = {"enable_metrics_collection": False}
QUIET_RAY_ENV = {  # read by the log monitor and the dashboard agent that ray.init starts
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",  # else it rescans at every 0.1 s poll under 1,000 files
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
}


def set_local_ray_env() -> None:
    """:data:`LOCAL_RAY_ENV` for a Ray this process will start (no RAY_ADDRESS); the user's values win."""
    if not os.environ.get("RAY_ADDRESS"):
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)


def quiet_ray_loggers() -> None:
    """Ray's and Ray Data's own INFO and WARNING lines (timestamps, dataset ids) off the console unless
    ``lcam --verbose``: the stage prints its own progress and summary."""
    import logging

    if os.environ.get(VERBOSE_ENV):
        return
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray._private", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)  # Ray Data's "Progress bars disabled" is a WARNING


def running_local_ray() -> str | None:
    """The address of a Ray that ``ray start --head`` left running on this machine (the one
    ``ray.init()`` itself would join: ``ray_current_cluster`` under Ray's temp dir), or None.
    Joining it skips the start-up; a new local Ray's settings (``object_store_memory``,
    ``_system_config``) must then not be passed, as Ray refuses them for a running cluster."""
    import socket

    try:
        from ray._private.services import canonicalize_bootstrap_address, parse_address

        address = canonicalize_bootstrap_address(None)
        if not address:
            return None
        host, port = parse_address(address)
        with socket.create_connection((host, int(port)), timeout=1.0):  # a file left by a Ray that is gone: refused
            return address
    except Exception:  # no such Ray, a stale or unreadable address file: start a Ray of our own
        return None


def ensure_ray() -> float:
    """Connect to the cluster (RAY_ADDRESS, or inside a Ray job) or start a local Ray; seconds taken."""
    set_local_ray_env()  # before Ray is imported: it may read them then
    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {}
        quiet_ray_loggers()
        running = None if os.environ.get("RAY_ADDRESS") else running_local_ray()
        if running:  # `ray start --head` on this machine: reuse it (no start-up), configured as it was started
            kwargs["address"] = running
            if sys.stderr.isatty():
                print(f"using the Ray already running on this machine at {running} ...", file=sys.stderr, flush=True)
        elif not os.environ.get("RAY_ADDRESS"):  # a new local Ray: ours to configure
            if sys.stderr.isatty():  # in a log, the stage's progress lines say it; errors stay one line
                print("starting Ray on this machine (RAY_ADDRESS unset) ...", file=sys.stderr, flush=True)
            # Ray keeps at most num_cpus idle workers and kills the rest; on a small machine
            # the read/decode tasks then land on fresh workers that re-import torch (~3 s CPU
            # each): measured 2.7x slower extraction on 2 cores. Keep more workers alive.
            kwargs["_system_config"] = {"num_workers_soft_limit": max(8, os.cpu_count() or 1)}
            kwargs["object_store_memory"] = local_object_store_bytes()
            kwargs["address"] = "local"  # a new one even where a stale address file names a Ray that is gone
            kwargs["include_dashboard"] = os.environ.get(DASHBOARD_ENV, "") not in ("", "0")
            if not kwargs["include_dashboard"]:  # with it, its metrics pages need both
                kwargs["_system_config"].update(QUIET_SYSTEM_CONFIG)
                for name, value in QUIET_RAY_ENV.items():  # the user's values win
                    os.environ.setdefault(name, value)
        ray.init(ignore_reinit_error=True, log_to_driver=False, configure_logging=False, **kwargs)
    from ray.data import DataContext

    quiet_ray_loggers()  # again: importing Ray Data configures its loggers
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver reports its own progress with rate and ETA
    ctx.print_on_execution_start = False
    limits = ctx.execution_options.resource_limits
    if limits.object_store_memory == float("inf"):  # unless the user set one
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=DATA_OBJECT_STORE_BYTES)
    return time.perf_counter() - t0


def stop_local_ray(grace_s: float = 5.0, quick: bool = False) -> None:
    """After Ctrl-C or at the end of the ``lcam`` command: shut down the Ray this process started
    (never a cluster it joined) and end what is left of it within ``grace_s`` + 1 s. Ray's agents
    outlive their raylet by about a minute, so this process's own descendants, listed before the
    shutdown, are ended by id. ``quick``: the process exits next, having finished its work: no
    ``ray.shutdown()`` and no wait (together about 3 s on 2 cores after the summary), each of its
    Ray processes gets SIGTERM and ends by itself."""
    import signal
    import sys

    if "ray" not in sys.modules or os.environ.get("RAY_ADDRESS"):
        return
    import ray

    ours = descendant_pids(os.getpid())  # also when interrupted inside ray.init: its processes may be up already
    if not quick:
        try:
            ray.shutdown()
        except BaseException:  # a second Ctrl-C, or a half-started Ray: the processes are ended below
            pass
    deadline = time.monotonic() + grace_s
    for sig in (signal.SIGTERM,) if quick else (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        while not quick and time.monotonic() < deadline and any(process_alive(p) for p in ours):
            time.sleep(0.1)
        deadline = time.monotonic() + 1.0


def actor_pool(requested: int | None) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU of the cluster, else one CPU actor; ``requested`` overrides the count."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if requested:
        return requested, (1.0 if gpus else 0.0)
    return (gpus, 1.0) if gpus else (1, 0.0)


def shard_stage_decoding(name: str, site: str, num_actors: int | None) -> tuple[Decoder, bool, float]:
    """(the decoder, whether the model's actors decode, seconds spent starting Ray) of a shard
    stage on this cluster (``--decoder``, ``--decode-on``, ``--num-actors``). A stage records
    the decoder in its output's identity before any work, so when the choice depends on the
    actors' GPUs (:func:`pipeline.decoders.site_needs_gpus`) Ray starts here, first; otherwise
    no cluster is needed to know it."""
    if not site_needs_gpus(name, site):
        return (*stage_decoding(name, site, 0.0), 0.0)
    seconds = ensure_ray()
    return (*stage_decoding(name, site, actor_pool(num_actors)[1]), seconds)


def pin_torch_threads(torch_threads: int | None, device_type: str) -> int | None:
    """Threads for a CPU actor: Ray sets OMP_NUM_THREADS=1 in workers; use the node's cores.

    torch's thread count is per calling thread and Ray Data may call an actor from another
    thread, so actors call this again on every batch (it returns the count to re-apply).
    """
    if device_type != "cpu":
        return None
    import torch

    threads = torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def actor_device(torch_threads: int | None = None, device: Any = "auto") -> tuple[Any, int | None]:
    """An actor's torch device, resolved the one way (:func:`pipeline.device.resolve_device`),
    and on a CPU its thread count, pinned now (:func:`pin_torch_threads`). Every actor starts
    with this and calls :func:`repin_threads` with the count at the top of every call."""
    from .device import resolve_device

    dev = resolve_device(device)
    return dev, pin_torch_threads(torch_threads, dev.type)


def repin_threads(threads: int | None) -> None:
    """Re-apply an actor's CPU thread count (None on a GPU: nothing to do)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


# ---------------------------------------------------------------- shard-per-unit stages
@dataclass
class StageStats:
    """What the driver of :func:`run_shard_stage` saw: results and their size, actors' nodes."""

    shards_done: int = 0
    shards_failed: int = 0
    result_bytes: int = 0  # pickled size of every result the driver received (manifest entries)
    array_bytes: int = 0  # numpy array bytes among them: 0 by construction (features stay on the workers)
    actor_nodes: list[str] = field(default_factory=list)  # node id of every actor the stage started
    actors_lost: int = 0
    first_result_at: float | None = None  # perf_counter of the first finished shard
    last_result_at: float | None = None


def _array_bytes(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, Mapping):
        return sum(_array_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_array_bytes(v) for v in obj)
    return 0


def run_shard_stage(
    items: Sequence[Mapping[str, Any]],
    prepare: Callable[[Mapping[str, Any]], list[Any]],
    actor_cls: type,
    actor_args: tuple,
    *,
    actors: int,
    gpus: float,
    on_result: Callable[[dict[str, Any]], None],
    on_failure: Callable[[str, str], None],
    in_flight_per_actor: int = 2,
    min_rows_in_flight: int = 0,
    max_attempts: int = 3,
    actor_wait_s: float = 900.0,
) -> StageStats:
    """Run one shard per unit of work: ``prepare(item)`` submits the CPU tasks that read and
    decode the shard ``item["url"]`` and returns the refs of its parts; an actor of
    ``actor_cls(*actor_args)`` (a :class:`ShardWorker`) gets them, runs the model, writes
    the shard's group itself and returns its manifest entry (small metadata, nothing else).
    The driver passes refs along and never fetches a part: the bytes stay on the workers.
    The parts go as one list of refs, ``process(item, [part refs])``: the call starts at
    once and :meth:`ShardWorker.run_parts` fetches them one at a time, so the model starts
    on the first decoded part, not after the whole shard's decode.

    Why this shape, not Ray Data (measured, benchmarks/RESULTS.md "Scale"): Ray Data splits
    a shard's rows over blocks, so one writer per shard group needs the rows re-assembled
    somewhere: on the driver (every feature byte crossed it twice, 3.2 ms of driver CPU per
    image) or in a keyed shuffle; a Datasink writes blocks, not shards, and per-block part
    groups would change the cache layout that readers, verify and resume rely on. Keeping a
    shard in one actor call keeps the layout, the one writer per group and resume at shard
    granularity, and makes the driver's work per shard, not per row.

    Bounded memory: at most ``actors * in_flight_per_actor`` shards are in flight (read,
    decoded, queued at an actor); 2 per actor lets the next shard decode while one runs the
    model and writes. Peak object store use is that window times a shard's pixels, whatever
    the dataset's size. Small shards widen the window up to ``min_rows_in_flight`` rows per
    actor (items' ``count``; one of unknown count counts as that many): with shards of one
    batch, two in flight left the model waiting for the next decode, which starts only once
    the previous shard is written and committed (measured: 0.2-1.7 s per 32-image shard).

    Failures: an actor lost with its node (or an input object lost) puts the shard back in
    the queue (``max_attempts`` in all), its writes being idempotent (a group is rewritten
    whole); lost actors are replaced only when none is left (a replacement asking for a GPU
    that no node has would wait forever), failing the rest after ``actor_wait_s``. Any other
    error of a shard, or an entry ``{"url", "failed": reason}`` from the worker, is reported
    through ``on_failure(url, reason)``; ``on_result(entry)`` commits a finished one (the
    driver's manifest write).
    """
    import ray
    from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

    stats = StageStats()
    if not items:
        return stats
    remote_cls = ray.remote(actor_cls).options(
        num_gpus=gpus,
        num_cpus=0 if gpus else 1,
        # two calls at once: one shard writes (zstd, storage I/O) while the next runs the
        # model; the actor serialises its model section itself
        max_concurrency=2,
    )
    pool: dict[Any, int] = {}  # live actor -> calls outstanding

    node_refs: list[Any] = []  # where each actor runs (asked once it is up, not waited for)

    def start_actor() -> Any:
        actor = remote_cls.remote(*actor_args)
        pool[actor] = 0
        node_refs.append(actor.node_id.remote())
        return actor

    for _ in range(max(1, actors)):
        start_actor()
    queue = [(dict(item), 1) for item in items]
    queue.reverse()  # pop() from the end: the given order
    running: dict[Any, tuple[dict[str, Any], int, Any]] = {}  # result ref -> (item, attempt, actor)
    window = max(1, actors) * max(1, in_flight_per_actor)

    def rows(item: Mapping[str, Any]) -> int:
        count = int(item.get("count", -1))
        return count if count >= 0 else min_rows_in_flight

    def window_open() -> bool:
        if len(running) < window:
            return True
        return sum(rows(it) for it, _, _ in running.values()) < max(1, len(pool)) * min_rows_in_flight

    def submit() -> None:
        while queue and pool and window_open():
            item, attempt = queue.pop()
            actor = min(pool, key=pool.get)  # the least busy
            parts = prepare(item)
            # the refs in a list, not as arguments: Ray would resolve arguments (wait for the
            # whole shard's decode) before the call starts; in a list they reach the actor
            # as refs and ShardWorker.run_parts fetches them one at a time
            running[actor.process.remote(item, list(parts))] = (item, attempt, actor)
            pool[actor] += 1
            del parts  # the driver keeps no ref to the data: Ray frees it after the call

    submit()
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        item, attempt, actor = running.pop(ref)
        if actor in pool:
            pool[actor] -= 1
        try:
            entry = ray.get(ref)
        except (RayActorError, ObjectLostError) as exc:  # the node went away: run the shard again
            if isinstance(exc, RayActorError) and actor in pool:
                del pool[actor]
                stats.actors_lost += 1
                log.warning("an actor of the stage was lost (%s); %d left", type(exc).__name__, len(pool))
            if attempt < max_attempts:
                queue.append((item, attempt + 1))
            else:
                stats.shards_failed += 1
                on_failure(item["url"], f"lost {attempt} times: {type(exc).__name__}")
            if not pool:
                start_actor()
                try:
                    ray.get(node_refs[-1], timeout=actor_wait_s)
                except RayActorError as again:  # it cannot even start (its constructor fails): nothing to retry
                    raise RuntimeError(f"the stage's model actor could not start: {again}") from None
                except GetTimeoutError:
                    for it, _ in queue:
                        on_failure(it["url"], f"no node could take a model actor within {actor_wait_s:.0f}s")
                    stats.shards_failed += len(queue)
                    queue.clear()
                    for a in list(pool):
                        ray.kill(a)
                    pool.clear()
        except Exception as exc:  # the shard's own failure (unreadable, write failed): reported, a re-run retries it
            text = str(exc).strip().splitlines()
            stats.shards_failed += 1
            on_failure(item["url"], f"{type(exc).__name__}: {text[-1] if text else ''}")
        else:
            stats.result_bytes += len(pickle.dumps(entry))
            stats.array_bytes += _array_bytes(entry)
            if entry.get("failed"):  # the worker found the shard unusable (damaged, cut): reported, not retried
                stats.shards_failed += 1
                on_failure(item["url"], str(entry["failed"]))
                submit()
                continue
            now = time.perf_counter()
            stats.first_result_at = stats.first_result_at or now
            stats.last_result_at = now
            stats.shards_done += 1
            on_result(entry)
        submit()
    ready, _ = ray.wait(node_refs, num_returns=len(node_refs), timeout=5)
    for ref in ready:
        try:
            stats.actor_nodes.append(ray.get(ref))
        except Exception:  # an actor lost with its node: no record
            pass
    return stats


@dataclass
class ShardRun:
    """One shard through a worker's model (:meth:`ShardWorker.run_parts`)."""

    failed: str | None = None  # the shard's own error (damaged, cut): nothing was run
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # the parts' carried columns, joined in row order
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # the model's outputs, joined ({} when no row)
    rows: int = 0


class ShardWorker:
    """Base of the actors of :func:`run_shard_stage`: subclasses define ``process(item, *parts)``
    and run their model over the parts with :meth:`run_parts`."""

    # the columns of a decoded part that outlive the model run (the pixels do not)
    CARRIED = ("key", "label", "error")

    def __init__(self) -> None:
        import threading

        # two calls at once (see run_shard_stage): one shard's model section at a time
        self.model_lock = threading.Lock()

    def run_parts(
        self, parts: Sequence[Any], fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], batch_size: int
    ) -> ShardRun:
        """Run ``fn`` over a shard's decoded parts in slices of ``batch_size`` rows, in row order.

        ``parts``: decoded parts (dicts), their object refs, or lists of refs (what
        :func:`run_shard_stage` passes), or :class:`pipeline.shard_tasks.RawPart` that this
        actor decodes (on its GPU) outside the model lock: refs are fetched one at a time, so the model starts
        on the first decoded part while the others still decode. The slices are those of
        the joined shard (rows carried over from one part into the next slice), so the
        batches, hence the features, are the same however the shard was cut into parts.
        A part with ``shard_error`` fails the shard (``ShardRun.failed``).
        """
        import ray

        flat: list[Any] = []
        for p in parts:
            flat.extend(p if isinstance(p, (list, tuple)) else [p])
        run = ShardRun()
        carried: list[dict[str, np.ndarray]] = []
        outs: list[dict[str, np.ndarray]] = []
        pending: dict[str, np.ndarray] | None = None  # decoded rows not run yet
        for part in flat:
            # the fetch waits for decoding: outside the lock, so the other call's shard keeps
            # the model busy meanwhile; each shard's own batches still run in row order
            if isinstance(part, ray.ObjectRef):
                part = ray.get(part)
            elif isinstance(part, RawPart):  # --decode-on actor: the bytes came, this process decodes
                part = part.decode(ray.get(part.rows))
            if part.get("shard_error"):
                return ShardRun(failed=str(part["shard_error"]))
            carried.append({k: part[k] for k in self.CARRIED})
            pending = dict(part) if pending is None else {k: np.concatenate([pending[k], part[k]]) for k in pending}
            with self.model_lock:
                while len(pending["key"]) >= batch_size:
                    outs.append(fn({k: v[:batch_size] for k, v in pending.items()}))
                    pending = {k: v[batch_size:] for k, v in pending.items()}
        if pending is not None and len(pending["key"]):
            with self.model_lock:
                outs.append(fn(pending))
        del pending, flat
        if carried:
            run.columns = {k: np.concatenate([c[k] for c in carried]) for k in self.CARRIED}
            run.rows = len(run.columns["key"])
        if outs:
            run.outputs = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        return run

    def node_id(self) -> str:
        """The Ray node this actor runs on (Ray's own id: placement is checked against it); "" outside Ray."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
