"""The Ray stage kit: connect to (or start) Ray, size the actor pool, keep a shard's rows together.

Every Ray stage (extraction, CAMs from images, evaluation, audit, L-CAM-Img training)
starts here, so that Ray is configured one way.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np


def ensure_ray() -> float:
    """Connect to the cluster (RAY_ADDRESS, or inside a Ray job) or start a local Ray; seconds taken."""
    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {}
        if not os.environ.get("RAY_ADDRESS"):  # a new local Ray: ours to configure
            # Ray keeps at most num_cpus idle workers and kills the rest; on a small machine
            # the read/decode tasks then land on fresh workers that re-import torch (~3 s CPU
            # each): measured 2.7x slower extraction on 2 cores. Keep more workers alive.
            kwargs["_system_config"] = {"num_workers_soft_limit": max(8, os.cpu_count() or 1)}
        ray.init(ignore_reinit_error=True, log_to_driver=False, configure_logging=False, **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver reports its own progress with rate and ETA
    ctx.print_on_execution_start = False
    return time.perf_counter() - t0


def actor_pool(requested: int | None) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU of the cluster, else one CPU actor; ``requested`` overrides the count."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if requested:
        return requested, (1.0 if gpus else 0.0)
    return (gpus, 1.0) if gpus else (1, 0.0)


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


class ShardAssembler:
    """Rows of each shard by index (a re-delivered row replaces, never duplicates)."""

    FIELDS = ("key", "label", "features", "top5_classes", "top5_probs", "logits")

    def __init__(self, fields: Sequence[str] | None = None) -> None:
        self.rows: dict[str, dict[int, dict[str, Any]]] = {}
        self.expected: dict[str, int] = {}
        self.fields = tuple(fields or self.FIELDS)  # the columns pop() stacks (CAM generation has others)

    def add(self, batch: dict[str, np.ndarray]) -> list[str]:
        """Add a batch; return the shards that became complete."""
        complete = []
        for i in range(len(batch["key"])):
            url = str(batch["shard"][i])
            count = int(batch["shard_count"][i])
            self.expected[url] = count
            self.rows.setdefault(url, {})[int(batch["index"][i])] = {k: batch[k][i] for k in batch}
            if len(self.rows[url]) == count:
                complete.append(url)
        return complete

    def pop(self, url: str) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
        rows = [r for _, r in sorted(self.rows.pop(url).items())]
        self.expected.pop(url, None)
        skipped = [{"key": str(r["key"]), "reason": str(r["error"]), "shard": url} for r in rows if r["error"]]
        # Failed rows carry zero-filled arrays of the right shape, so stacking every row and
        # keeping the good ones gives correctly shaped (possibly empty) arrays.
        keep = np.array([not r["error"] for r in rows], dtype=bool)
        stacked = {k: np.stack([r[k] for r in rows])[keep] for k in self.fields}
        return stacked, skipped
