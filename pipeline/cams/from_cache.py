"""CAMs from a feature cache: no image is read; per chunk of cached F one small matrix
product (``attention.selected_many``) and, where the stored top-5 cannot answer, the head
for the clean logits. In this process (:func:`cams_from_cache`), or on model actors that
ask for a GPU each when the cluster has them (:func:`cams_from_cache_on_ray`): each actor
reads, explains and writes whole source shards (one writer per group), the driver only
commits the manifest entries they return."""

from __future__ import annotations

import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np
import torch

from lcam import LCAM

from ..classes import ClassSelection
from ..configs import CamsConfig  # torch-free, no loop with pipeline.cams
from ..errors import UserError
from ..fs import StorageOptions
from ..progress import Progress
from ..raykit import actor_device, repin_threads
from ..store.cam_store import CamStore
from .explainer import checkpoint_fingerprint, explain_rows

# The job's summary (pipeline.cams.run.CamsSummary) comes in as an argument: pipeline.cams
# dispatches to this module, so naming its type here would tie the two modules in a loop.
CamsSummary = Any


def cams_from_cache(
    cfg: CamsConfig,
    model: LCAM,
    cache: Any,
    store: CamStore,
    selection: ClassSelection,
    todo: list[dict[str, Any]],
    summary: CamsSummary,
) -> CamsSummary:
    """Explain the cache's shard entries ``todo`` in this process, writing one group each; counts go to ``summary``."""
    view = cache.views.index(cfg.view)
    use_top5 = view == 0  # the cache's top-5 (and logits) are those of its first view
    size = store.upsampled_size
    fields = ["features", "labels", "top5_classes", "top5_probs"] + (
        ["logits"] if cache.store_logits and use_top5 else []
    )
    progress = Progress(sum(int(e["count"]) for e in todo) or None, cfg.progress, what="cams", unit="samples")
    t0 = time.perf_counter()

    chunks = [(e, ci) for e in todo for ci in range(math.ceil(int(e["count"]) / cache.chunk_rows))]
    threads_before = torch.get_num_threads()
    if next(model.attention.parameters()).device.type == "cpu":
        # The products are small and memory-bound: a second OpenMP thread mostly spins at
        # barriers while the reader threads need the cores to decompress (measured: process
        # CPU per 800-row run ~0.95 s with 2 threads, ~0.57 s with 1 on 2 cores; the maps are
        # bitwise the same). As in L-CAM-Fm training: half the cores, the rest read the cache.
        torch.set_num_threads(cache_threads(cfg.torch_threads))
    try:
        _run_chunks(cfg, model, cache, store, selection, chunks, view, use_top5, size, fields, progress, summary)
    finally:
        torch.set_num_threads(threads_before)
    progress.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def cache_threads(torch_threads: int | None) -> int:
    """torch threads of the local cache path: ``torch_threads``, else half the cores (at least 1)."""
    return torch_threads or max(1, (os.cpu_count() or 2) // 2)


def _run_chunks(
    cfg: CamsConfig,
    model: LCAM,
    cache: Any,
    store: CamStore,
    selection: ClassSelection,
    chunks: list[tuple[dict[str, Any], int]],
    view: int,
    use_top5: bool,
    size: int | None,
    fields: list[str],
    progress: Progress,
    summary: CamsSummary,
) -> None:
    with ThreadPoolExecutor(2) as readers, ThreadPoolExecutor(1) as writer:
        # Read ahead (zstd decode overlaps the matrix products) and write behind.
        ahead: deque[tuple[dict[str, Any], int, Future]] = deque()
        it = iter(chunks)

        def fill() -> None:
            while len(ahead) < 3:
                nxt = next(it, None)
                if nxt is None:
                    return
                e, ci = nxt
                ahead.append((e, ci, readers.submit(_read_cache_chunk, cache, e, ci, fields)))

        writes: deque[Future] = deque()
        parts: list[dict[str, np.ndarray]] = []
        fill()
        while ahead:
            e, ci, fut = ahead.popleft()
            fill()
            chunk = fut.result()
            parts.append(_explain_cache_chunk(model, chunk, view, selection, use_top5, size))
            progress.update(len(chunk["keys"]))
            if (ci + 1) * cache.chunk_rows >= int(e["count"]):  # last chunk of this shard
                rows, skipped = _join_parts(parts, e["url"])
                parts = []
                writes.append(writer.submit(store.write_shard, e["url"], rows, skipped))
            while writes and (writes[0].done() or len(writes) > 2):
                summary.commit(store, writes.popleft().result())
        while writes:
            summary.commit(store, writes.popleft().result())


class CacheCamActor:
    """The checkpoint's L-CAM in an actor: whole source shards of a feature cache -> their CAM groups.

    Each call reads one shard's chunks (the next read overlapping the current product),
    explains them as :func:`cams_from_cache` does (the same functions, so the same arrays) and
    writes the shard's group, replacing what was there: a call Ray re-executes after a lost
    actor rewrites the same group. It returns the manifest entry; only the driver commits it.
    """

    def __init__(
        self,
        checkpoint: str,
        storage_options: StorageOptions,
        weights: str | None,
        fingerprint: str,
        device: str,
        torch_threads: int | None,
    ) -> None:
        from ..train.checkpoints import load_lcam

        dev, self.threads = actor_device(torch_threads, device)
        self.model, ckpt = load_lcam(checkpoint, storage_options, weights=weights, device=dev)
        if checkpoint_fingerprint(ckpt) != fingerprint:
            raise RuntimeError(
                f"checkpoint {checkpoint} changed during the run (fingerprint {checkpoint_fingerprint(ckpt)}, expected {fingerprint}); re-run"
            )

    def node(self) -> str:
        from ..placement import node_id

        return node_id()

    def write_group(
        self,
        cache: Any,
        store: CamStore,
        entry: Mapping[str, Any],
        view: int,
        selection: ClassSelection,
        use_top5: bool,
        fields: list[str],
    ) -> dict[str, Any]:
        repin_threads(self.threads)
        chunks = math.ceil(int(entry["count"]) / cache.chunk_rows)
        parts: list[dict[str, np.ndarray]] = []
        with ThreadPoolExecutor(1) as reader:
            nxt = reader.submit(_read_cache_chunk, cache, entry, 0, fields) if chunks else None
            for ci in range(chunks):
                chunk = nxt.result()
                nxt = reader.submit(_read_cache_chunk, cache, entry, ci + 1, fields) if ci + 1 < chunks else None
                parts.append(_explain_cache_chunk(self.model, chunk, view, selection, use_top5, store.upsampled_size))
        rows, skipped = _join_parts(parts, entry["url"])
        return store.write_shard(entry["url"], rows, skipped)


def cams_from_cache_on_ray(
    cfg: CamsConfig,
    cache: Any,
    store: CamStore,
    selection: ClassSelection,
    todo: list[dict[str, Any]],
    summary: CamsSummary,
) -> CamsSummary:
    """:func:`cams_from_cache` over model actors: one per GPU of the cluster (``cfg.num_actors``
    overrides; one CPU actor on a CPU-only cluster), each fed whole shards, two in flight."""
    import ray

    from ..placement import model_resources, raise_user_errors
    from ..raykit import ensure_ray

    todo = deque(todo)
    t0 = time.perf_counter()
    summary.ray_startup_seconds = ensure_ray()
    view = cache.views.index(cfg.view)
    use_top5 = view == 0
    fields = ["features", "labels", "top5_classes", "top5_probs"] + (
        ["logits"] if cache.store_logits and use_top5 else []
    )
    resources = model_resources(cfg.device)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if resources.get("num_gpus") else 0
    count = max(1, min(cfg.num_actors or gpus or 1, len(todo)))
    actor_cls = ray.remote(CacheCamActor).options(max_restarts=1, max_task_retries=2, **resources)
    actors = [
        actor_cls.remote(
            cfg.checkpoint,
            cfg.checkpoint_storage_options,
            cfg.weights,
            store.identity["checkpoint"]["fingerprint"],
            cfg.device,
            cfg.torch_threads,
        )
        for _ in range(count)
    ]
    progress = Progress(sum(int(e["count"]) for e in todo) or None, cfg.progress, what="cams", unit="samples")
    cache_ref, store_ref = ray.put(cache), ray.put(store)
    pending: dict[Any, tuple[Any, dict[str, Any]]] = {}

    def feed(actor: Any) -> None:
        if todo:
            e = todo.popleft()
            pending[actor.write_group.remote(cache_ref, store_ref, e, view, selection, use_top5, fields)] = (actor, e)

    try:
        with raise_user_errors():
            summary.ran_on = sorted(ray.get([a.node.remote() for a in actors]))
            for actor in actors:
                feed(actor)
                feed(actor)  # the next shard queued: no idle gap between two calls
            while pending:
                [ready], _ = ray.wait(list(pending), num_returns=1)
                actor, e = pending.pop(ready)
                summary.commit(store, ray.get(ready))
                progress.update(int(e["count"]))
                feed(actor)
    finally:
        progress.close()
        for actor in actors:
            ray.kill(actor)
    summary.seconds = time.perf_counter() - t0
    return summary


def _read_cache_chunk(cache: Any, entry: Mapping[str, Any], ci: int, fields: list[str]) -> dict[str, Any]:
    try:
        return cache.read_chunk(entry["shard_id"], ci, fields=fields)
    except UserError:  # StoreDamaged: already names the shard and the repair
        raise
    except Exception as exc:  # a lost object or group: the cache is damaged, not this code
        raise UserError(
            f"feature cache {cache.url}: chunk {ci} of shard {entry['url']} is unreadable ({type(exc).__name__}: {exc}); "
            f"check it with `lcam cache verify {cache.url}` and re-extract that shard"
        ) from None


@torch.no_grad()
def _explain_cache_chunk(
    model: LCAM, chunk: dict[str, Any], view: int, selection: ClassSelection, use_top5: bool, size: int | None
) -> dict[str, np.ndarray]:
    labels = np.asarray(chunk["labels"], dtype=np.int64)
    classes = model.attention.num_classes
    # classes 'label' explains each row's label: rows without one, or with a class the classifier lacks, are skipped
    keep = (labels >= 0) & (labels < classes) if selection.mode == "label" else np.ones(len(labels), dtype=bool)
    keys = np.array(chunk["keys"], dtype=object)
    out: dict[str, np.ndarray] = {
        "key": keys[keep],
        "label": labels[keep],
        "dropped": keys[~keep],
        "dropped_label": labels[~keep],
    }
    if not keep.any():
        return out
    device = next(model.attention.parameters()).device
    # every row kept (all but classes 'label' with unlabelled rows): a view, not a copy of the chunk
    stored = chunk["features"][:, view] if keep.all() else chunk["features"][keep, view]
    feats = torch.from_numpy(np.ascontiguousarray(stored)).to(device).float()
    logits = torch.from_numpy(chunk["logits"][keep].astype(np.float32)).to(device) if "logits" in chunk else None
    out.update(
        explain_rows(
            model,
            feats,
            selection,
            logits=logits,
            labels=labels[keep],
            top5=chunk["top5_classes"][keep] if use_top5 else None,
            top5_probs=chunk["top5_probs"][keep] if use_top5 else None,
            upsample_to=size,
        )
    )
    return out


def _skip_reason(label: int) -> str:
    return (
        "no label: classes 'label' needs one" if label < 0 else f"label {label} is not one of the classifier's classes"
    )


def _join_parts(parts: list[dict[str, np.ndarray]], url: str) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    skipped = [
        {"key": str(k), "reason": _skip_reason(int(lab)), "shard": url}
        for p in parts
        for k, lab in zip(p.pop("dropped"), p.pop("dropped_label"))
    ]
    names = set().union(*(p.keys() for p in parts))
    rows = {n: np.concatenate([p[n] for p in parts if n in p]) for n in names}
    return rows, skipped
