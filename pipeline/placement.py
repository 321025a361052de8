"""Where a stage's model work runs: in this process, or in a Ray task/actor on a worker node.

On ``cluster.yaml`` a job's driver runs on the CPU-only head; a stage that ran its model
in the driver would run it there. Stages that are not Ray Data pipelines (L-CAM-Fm
training, CAMs from a feature cache) therefore run their model in a Ray task or actor
that asks for a GPU when the cluster has one (one CPU otherwise), and the driver only
waits, relays the task's progress lines and commits small metadata.

``where``: ``local`` (this process: fastest for a tiny run, no Ray start-up), ``ray``
(a task, on a local Ray when no cluster is given) or ``auto``: ``ray`` when there is a
cluster to use (``RAY_ADDRESS`` is set, as it is for every job ``lcam submit`` runs, or
this process is already connected to a Ray cluster of more than one node), else ``local``.

Progress lines a task logs under the ``lcam`` logger reach the user through a small
queue actor (:class:`LogRelay`): Ray's own log forwarding is off (``ensure_ray``) because
it would also forward every worker's noise. The relay is the one such channel: L-CAM-Img's
Ray Train rank 0 sends its step and epoch messages through it too, and the driver's handler
turns them into lines.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import UserError

WHERE = ("auto", "local", "ray")
log = logging.getLogger("lcam.remote")


def check_where(where: str) -> None:
    if where not in WHERE:
        raise UserError(lambda flag: f"{flag('where')} must be auto, local or ray, got {where!r}")


def resolve_where(where: str) -> str:
    """``local`` or ``ray`` for ``where`` (see the module's doc for ``auto``)."""
    check_where(where)
    if where != "auto":
        return where
    if os.environ.get("RAY_ADDRESS"):
        return "ray"
    import ray

    # a multi-node cluster this process already joined (a script, the scale benchmark);
    # a single-node local Ray alone is no reason to leave the process
    if ray.is_initialized() and sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
        return "ray"
    return "local"


def model_resources(device: str = "auto", cpus: float = 1.0) -> dict[str, float]:
    """Ray resources for one model task or actor: a GPU when the cluster has one (and the
    device allows it), else ``cpus`` CPUs. Never zero of both: a resource-less request
    could be placed on the head."""
    import ray

    name = str(device).split(":")[0]
    if name != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1.0, "num_cpus": 1.0}
    if name == "cuda":
        raise UserError(
            lambda flag: (
                f"{flag('device')} {device} asked for, but the Ray cluster has no GPU; use {flag('device')} auto or cpu"
            )
        )
    return {"num_cpus": float(cpus)}


def node_id() -> str:
    """The Ray node id of the calling task or actor (what placement is judged by)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError a task, actor or Ray Train worker raised, if that is what failed (also a
    missing file, a denied permission or unavailable backbone weights: one line, as in-process)."""
    from lcam.backbones.base import BackboneSpecError, WeightsUnavailable

    seen: list[BaseException] = [exc]
    seen += list(getattr(exc, "worker_failures", {}).values())
    while seen:
        e = seen.pop()
        if isinstance(e, UserError):
            if getattr(e, "compose", None) is not None:  # the message, still able to name the caller's flags
                return UserError(e.compose)
            return UserError(str(e).splitlines()[-1] if "Traceback" in str(e) else str(e))
        cause = getattr(e, "cause", None)  # the exception the task itself raised (ray.exceptions.RayTaskError)
        if isinstance(cause, (FileNotFoundError, PermissionError, WeightsUnavailable, BackboneSpecError)):
            return UserError(str(cause))
        for nxt in (e.__cause__, e.__context__, getattr(e, "cause", None)):
            if isinstance(nxt, BaseException):
                seen.append(nxt)
    return None


@contextmanager
def raise_user_errors() -> Iterator[None]:
    """Around Ray work (a task, model actors, a Ray Train run): a failure that was a user's
    mistake leaves as its one-line :class:`UserError` (:func:`user_error_in`), without the
    Ray traceback around it; any other failure propagates unchanged."""
    try:
        yield
    except Exception as exc:
        err = user_error_in(exc)
        if err is not None:
            raise err from None
        raise


class _QueueHandler(logging.Handler):
    def __init__(self, queue: Any) -> None:
        super().__init__(logging.INFO)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(self.format(record))
        except Exception:  # progress is best effort: never fail the work for a lost line
            pass


@contextmanager
def relayed_logs(queue: Any) -> Iterator[None]:
    """Task side: lines logged under ``lcam`` also go to the driver's :class:`LogRelay`."""
    if queue is None:
        yield
        return
    logger = logging.getLogger("lcam")
    handler = _QueueHandler(queue)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class LogRelay:
    """Driver side: a queue actor (no resources) and a thread that hands what tasks send to
    ``handle`` (by default: log the line). ``enabled=False``: no actor, no thread, ``queue``
    is None (tasks then send nothing)."""

    def __init__(self, enabled: bool = True, handle: Callable[[Any], None] | None = None) -> None:
        from ray.util.queue import Queue

        self.enabled = enabled
        self.handle: Callable[[Any], None] = handle or log.info
        self.queue = Queue(actor_options={"num_cpus": 0}) if enabled else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if enabled:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.queue.get(timeout=1.0)
            except Exception:  # ray.util.queue.Empty, or the queue actor gone at shutdown
                continue
            self.handle(msg)

    def close(self) -> None:
        """Stop the thread, then hand on what is still queued (the task has finished by now)."""
        if not self.enabled:
            return
        import ray

        self._stop.set()
        self._thread.join(timeout=10)
        try:
            while not self.queue.empty():
                self.handle(self.queue.get_nowait())
        except Exception:
            pass
        ray.kill(self.queue.actor)


# A Ray task lost with its worker process or its node (not a failure of its own): Ray's
# automatic retry would rerun it with the same arguments; run_task reruns it itself so that
# the caller can hand the next attempt what the lost one left (e.g. resume a checkpoint).
LOST_TASK_ERRORS = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "OutOfMemoryError")


def run_task(
    fn: Callable[..., Any],
    *args: Any,
    resources: dict[str, float],
    progress: bool = True,
    name: str | None = None,
    attempts: int = 1,
    retry_args: Callable[[], tuple] | None = None,
) -> Any:
    """``fn(*args, log_queue)`` as one Ray task with ``resources``; its result, or the
    UserError it raised (Ctrl-C cancels the task). A task lost with its worker or node runs
    again, ``attempts`` times in all, with ``retry_args()`` as its arguments when given;
    a failure of the task's own code is never retried."""
    import ray
    import ray.exceptions

    lost = tuple(getattr(ray.exceptions, n) for n in LOST_TASK_ERRORS if hasattr(ray.exceptions, n))
    task_name = name or fn.__name__
    for attempt in range(1, max(1, attempts) + 1):
        relay = LogRelay(progress)
        task = ray.remote(fn).options(max_retries=0, name=task_name, **resources)
        ref = task.remote(*args, relay.queue)
        try:
            with raise_user_errors():
                return ray.get(ref)
        except lost as exc:
            if attempt >= attempts:
                raise
            log.warning(
                "%s was lost (%s); running it again (attempt %d of %d)",
                task_name,
                type(exc).__name__,
                attempt + 1,
                attempts,
            )
            if retry_args is not None:
                args = retry_args()
        except KeyboardInterrupt:
            ray.cancel(ref, force=True)
            raise
        finally:
            relay.close()
    raise AssertionError("unreachable")


__all__ = [
    "WHERE",
    "LogRelay",
    "check_where",
    "model_resources",
    "node_id",
    "raise_user_errors",
    "relayed_logs",
    "resolve_where",
    "run_task",
    "user_error_in",
    "LOST_TASK_ERRORS",
]
