"""Batch outcomes -> per-image arrays and per-method summaries, whatever the engine or order."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import UserError
from .config import MethodSpec
from .metrics.base import EvalMetric
from .plan import DecodedBatch


@dataclass
class MethodResult:
    """One row: the method, its N and cost, and each metric's summary (``metrics[name]``)."""

    id: str
    label: str
    kind: str
    config: dict[str, Any]
    n: int
    seconds: float  # maps and every metric
    map_forwards: int
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric name -> summary (+ seconds, forwards)

    # AD/IC, the protocol's metric, by name (the summary lines and older readers use these)
    @property
    def ad(self) -> list[float]:
        return self.metrics["adic"]["ad"]

    @property
    def ic(self) -> list[float]:
        return self.metrics["adic"]["ic"]

    @property
    def ad_se(self) -> list[float]:
        return self.metrics["adic"]["ad_se"]

    @property
    def ic_se(self) -> list[float]:
        return self.metrics["adic"]["ic_se"]

    def to_dict(self, ratios: Sequence[float] | None = None) -> dict[str, Any]:
        """results.json's entry: AD/IC's numbers at the top level (ad, ic, per_ratio, ...), every
        other metric under its name."""
        d = {
            "id": self.id,
            "label": self.label,
            "kind": self.kind,
            "config": self.config,
            "n": self.n,
            "seconds": self.seconds,
            "map_forwards": self.map_forwards,
            "info": self.info,
        }
        adic = self.metrics.get("adic", {})
        d.update({k: v for k, v in adic.items() if k not in ("seconds", "forwards")})
        d["masked_forwards"] = adic.get("forwards", 0)
        d.update({name: s for name, s in self.metrics.items() if name != "adic"})
        return d


class Collector:
    """Batch outcomes kept by batch id: the engines deliver them in any order."""

    def __init__(self) -> None:
        self.batches: dict[int, tuple[DecodedBatch, dict | None]] = {}

    def __call__(self, decoded: DecodedBatch, result: dict | None) -> None:
        self.batches[decoded.batch_id] = (decoded, result)

    def images(self) -> int:
        return sum(len(d.keys) for d, _ in self.batches.values())


@dataclass
class EvalResults:
    ratios: tuple[float, ...]
    keys: list[str]
    shards: list[str]
    labels: np.ndarray
    ranks: np.ndarray
    class_ids: np.ndarray
    Y: np.ndarray
    per_method: dict[str, dict[str, Any]]  # id -> {"rows": (m,) image indices, metric name -> its arrays}
    methods: list[MethodResult]
    skipped: list[dict[str, str]]
    clean_seconds: float
    clean_forwards: int
    metrics: list[EvalMetric] = field(default_factory=list)


def aggregate(collected: Collector, specs: Sequence[MethodSpec], metrics: Sequence[EvalMetric]) -> EvalResults:
    """Concatenate every batch's arrays in batch order; each metric summarises each method."""
    keys, shards, labels, ranks, ids, ys, skipped = [], [], [], [], [], [], []
    rows: dict[str, list[np.ndarray]] = {s.id: [] for s in specs}
    arrays: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {s.id: {m.name: {} for m in metrics} for s in specs}
    cost = {
        s.id: {
            "map_seconds": 0.0,
            "map_forwards": 0,
            **{f"{m.name}_{k}": 0 for m in metrics for k in ("seconds", "forwards")},
        }
        for s in specs
    }
    clean_seconds, clean_forwards, offset = 0.0, 0, 0
    for bid in sorted(collected.batches):
        decoded, result = collected.batches[bid]
        skipped += decoded.skipped
        if result is None:
            continue
        n = len(decoded.keys)
        keys += decoded.keys
        shards += [decoded.shard] * n
        labels.append(decoded.labels)
        ranks.append(decoded.ranks)
        ids.append(result["class_ids"])
        ys.append(result["Y"])
        clean_seconds += result["clean_seconds"]
        clean_forwards += result["clean_forwards"]
        for mid, e in result["methods"].items():
            rows[mid].append(e["index"] + offset)
            for k in cost[mid]:
                cost[mid][k] += e[k]
            for m in metrics:
                for name, a in e[m.name].items():
                    arrays[mid][m.name].setdefault(name, []).append(a)
        offset += n
    if not keys:
        raise UserError("no image could be decoded: " + "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:3]))
    Y = np.concatenate(ys).astype(np.float64)
    per_method: dict[str, dict[str, Any]] = {}
    results: list[MethodResult] = []
    for s in specs:
        r = np.concatenate(rows[s.id]) if rows[s.id] else np.zeros(0, np.int64)
        entry: dict[str, Any] = {"rows": r}
        summaries: dict[str, dict[str, Any]] = {}
        for m in metrics:
            # images on the last axis; {} for a method that saw no image (every summarize handles it)
            joined = {name: np.concatenate(parts, axis=-1) for name, parts in arrays[s.id][m.name].items()}
            entry[m.name] = joined
            summaries[m.name] = {
                **m.summarize(Y[r], joined),
                "seconds": cost[s.id][f"{m.name}_seconds"],
                "forwards": cost[s.id][f"{m.name}_forwards"],
            }
        per_method[s.id] = entry
        c = cost[s.id]
        seconds = c["map_seconds"] + sum(c[f"{m.name}_seconds"] for m in metrics)
        results.append(
            MethodResult(
                s.id,
                s.label,
                s.kind,
                dict(s.kwargs),
                len(r),
                seconds,
                c["map_forwards"],
                dict(s.info, limit=s.limit),
                summaries,
            )
        )
    return EvalResults(
        tuple(metrics[0].ratios),
        keys,
        shards,
        np.concatenate(labels),
        np.concatenate(ranks),
        np.concatenate(ids),
        Y,
        per_method,
        results,
        skipped,
        clean_seconds,
        clean_forwards,
        list(metrics),
    )


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "numpy", "grad-cam", "pillow", "lcam", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def jsonable(obj: Any) -> Any:
    """numpy/tensor values and tuples to JSON types; NaN to None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if obj != obj else float(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return jsonable(obj.tolist())
    return obj
