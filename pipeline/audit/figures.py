"""``lcam audit``'s figures, computed on the workers: every sample's statistics from its
maps (:func:`shard_figures`, one task per shard group of the store), and the bounded
partial aggregates of a block (:func:`block_partial`, :func:`block_typical`) that the
driver merges (:func:`merge_partials`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .stats import STAT_NAMES, map_statistics, resize_maps, spearman, top_region_iou

STRIP = 3  # typical and extreme samples per class strip


def _first_column(class_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Per row, the first column whose class is ``wanted`` (-1: none, or ``wanted`` < 0)."""
    hit = (class_ids == wanted[:, None]) & (wanted[:, None] >= 0)
    return np.where(hit.any(1), hit.argmax(1), -1)


def shard_figures(
    store: Any,
    entry: Mapping[str, Any],
    shard_index: int,
    grid: int,
    band: float,
    top_fraction: float,
    compare: Mapping[str, tuple[int, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Every figure of every sample of one shard group: columns of ``n`` values.

    The evidence map of a sample is the map of its predicted class (a column holding that
    class), else its first map. ``compare``: key -> (class id, map) of the second method.
    """
    data = store.read_shard(
        entry["shard_id"], fields=["labels", "class_ids", "probs", "raw", "predicted", "predicted_prob"]
    )
    n = len(data["keys"])
    ids, probs, maps = data["class_ids"], data["probs"], data["maps"]
    labels, predicted = data["labels"].astype(np.int64), data["predicted"].astype(np.int64)
    rows = np.arange(n)
    pred_col = _first_column(ids, predicted)
    label_col = _first_column(ids, labels)
    ev_col = np.where(pred_col >= 0, pred_col, 0)
    evidence = resize_maps(maps[rows, ev_col], grid) if n else np.zeros((0, grid, grid), np.float32)
    out: dict[str, np.ndarray] = {
        "shard_index": np.full(n, shard_index, np.int32),
        "shard": np.array([entry["url"]] * n, dtype=object),
        "key": np.array(data["keys"], dtype=object),
        "row": rows.astype(np.int32),
        "label": labels.astype(np.int32),
        "predicted": predicted.astype(np.int32),
        "predicted_prob": data["predicted_prob"].astype(np.float32),
        "evidence_class": ids[rows, ev_col].astype(np.int32) if n else np.zeros(0, np.int32),
        "correct": np.where(labels < 0, -1, labels == predicted).astype(np.int8),
        "label_prob": np.where(label_col >= 0, probs[rows, np.maximum(label_col, 0)] if n else 0.0, np.nan).astype(
            np.float32
        ),
    }
    for name, value in map_statistics(evidence, band).items():
        out[name] = value.astype(np.float32)
    iou = np.full(n, np.nan, np.float32)
    both = (pred_col >= 0) & (label_col >= 0) & (out["correct"] == 0)
    if both.any():
        b = rows[both]
        iou[both] = top_region_iou(
            resize_maps(maps[b, pred_col[b]], grid), resize_maps(maps[b, label_col[b]], grid), top_fraction
        )
    out["pred_label_iou"] = iou
    rho = np.full(n, np.nan, np.float32)
    cmp_class = np.full(n, -1, np.int32)
    if compare:
        for r, key in enumerate(data["keys"]):
            hit = compare.get(key)
            if hit is None:
                continue
            col = _first_column(ids[r : r + 1], np.array([hit[0]]))[0]
            if col < 0:  # the store has no map of the class the second method explained
                continue
            cmp_class[r] = hit[0]
            rho[r] = spearman(resize_maps(maps[r, col], grid), resize_maps(hit[1], grid))
    out["compare_class"] = cmp_class
    out["compare_rho"] = rho
    return out


def figures_task(
    batch: dict[str, np.ndarray], store: Any, grid: int, band: float, top_fraction: float, compare: Any
) -> dict[str, np.ndarray]:
    import ray

    if isinstance(compare, ray.ObjectRef):
        compare = ray.get(compare)
    parts = [
        shard_figures(store, {"shard_id": s, "url": u}, int(i), grid, band, top_fraction, compare)
        for s, u, i in zip(batch["shard_id"], batch["url"], batch["shard_index"])
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


RECORD = (
    "shard_index",
    "shard",
    "key",
    "row",
    "label",
    "predicted",
    "predicted_prob",
    "label_prob",
    "pred_label_iou",
    "evidence_class",
    "compare_class",
    "compare_rho",
    *STAT_NAMES,
)


def _record(batch: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    return {k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in RECORD}


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values, largest first (stable: earlier rows win ties)."""
    return np.argsort(-values, kind="stable")[:n] if n > 0 else np.zeros(0, np.int64)


def block_partial(batch: dict[str, np.ndarray], n_errors: int, n_disagree: int) -> dict[str, np.ndarray]:
    """One block of per-sample rows -> one small partial aggregate (JSON), merged on the driver.

    Per class: counts, sums and sums of squares of every statistic, and its top samples by
    border share; the block's confusion counts; its most confident mistakes and its most
    disagreeing samples (``n`` each: the global top-N is among the blocks' top-N).
    """
    cls = batch["evidence_class"].astype(np.int64)
    correct = batch["correct"]
    classes: dict[str, Any] = {}
    for c in np.unique(cls):
        idx = np.flatnonzero(cls == c)
        rho = batch["compare_rho"][idx]
        rho = rho[np.isfinite(rho)].astype(np.float64)
        border = batch["border"][idx]
        classes[str(int(c))] = {
            "n": len(idx),
            "labelled": int((correct[idx] >= 0).sum()),
            "correct": int((correct[idx] == 1).sum()),
            "prob": float(batch["predicted_prob"][idx].astype(np.float64).sum()),
            "sum": {s: float(batch[s][idx].astype(np.float64).sum()) for s in STAT_NAMES},
            "sumsq": {s: float((batch[s][idx].astype(np.float64) ** 2).sum()) for s in STAT_NAMES},
            "rho_n": len(rho),
            "rho_sum": float(rho.sum()),
            "extreme": [
                [float(border[j]), int(batch["shard_index"][idx[j]]), int(batch["row"][idx[j]])]
                for j in _top(border, STRIP)
            ],
        }
    wrong = np.flatnonzero(correct == 0)
    pairs, counts = np.unique(
        np.stack([batch["label"][wrong], batch["predicted"][wrong]], 1).reshape(-1, 2), axis=0, return_counts=True
    )
    compared = np.flatnonzero(batch["compare_class"] >= 0)
    part = {
        "classes": classes,
        "confusions": [[int(a), int(b), int(n)] for (a, b), n in zip(pairs, counts)],
        "errors": [_record(batch, int(wrong[j])) for j in _top(batch["predicted_prob"][wrong], n_errors)],
        "compared": len(compared),
        "disagreements": [_record(batch, int(compared[j])) for j in _top(-batch["compare_rho"][compared], n_disagree)],
    }
    return {"partial": np.array([json.dumps(part)], dtype=object)}


def block_typical(batch: dict[str, np.ndarray], means: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Per class in the block, the samples whose border share is nearest the class mean (second pass)."""
    cls = batch["evidence_class"].astype(np.int64)
    out: dict[str, list] = {}
    for c in np.unique(cls):
        idx = np.flatnonzero(cls == c)
        dist = np.abs(batch["border"][idx].astype(np.float64) - means[str(int(c))])
        out[str(int(c))] = [
            [float(dist[j]), int(batch["shard_index"][idx[j]]), int(batch["row"][idx[j]])] for j in _top(-dist, STRIP)
        ]
    return {"partial": np.array([json.dumps(out)], dtype=object)}


@dataclass
class Aggregates:
    """Everything the page and the tables need, merged from the blocks' partials: bounded size."""

    per_class: list[dict[str, Any]]
    confusions: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    disagreements: list[dict[str, Any]]
    compared: int


def merge_partials(parts: Sequence[Mapping[str, Any]], n_errors: int, n_disagree: int) -> Aggregates:
    classes: dict[int, dict[str, Any]] = {}
    confusions: dict[tuple[int, int], int] = {}
    errors: list[dict[str, Any]] = []
    disagreements: list[dict[str, Any]] = []
    compared = 0
    for p in parts:
        for c, v in p["classes"].items():
            acc = classes.setdefault(
                int(c),
                {
                    "n": 0,
                    "labelled": 0,
                    "correct": 0,
                    "prob": 0.0,
                    "rho_n": 0,
                    "rho_sum": 0.0,
                    "extreme": [],
                    "sum": dict.fromkeys(STAT_NAMES, 0.0),
                    "sumsq": dict.fromkeys(STAT_NAMES, 0.0),
                },
            )
            for k in ("n", "labelled", "correct", "prob", "rho_n", "rho_sum"):
                acc[k] += v[k]
            for s in STAT_NAMES:
                acc["sum"][s] += v["sum"][s]
                acc["sumsq"][s] += v["sumsq"][s]
            acc["extreme"] = sorted(acc["extreme"] + v["extreme"], key=lambda e: (-e[0], e[1], e[2]))[:STRIP]
        for a, b, n in p["confusions"]:
            confusions[(a, b)] = confusions.get((a, b), 0) + n
        errors = sorted(errors + p["errors"], key=lambda r: (-r["predicted_prob"], r["shard_index"], r["row"]))[
            :n_errors
        ]
        disagreements = sorted(
            disagreements + p["disagreements"], key=lambda r: (r["compare_rho"], r["shard_index"], r["row"])
        )[:n_disagree]
        compared += p["compared"]
    per_class = []
    for c, acc in sorted(classes.items()):
        n = acc["n"]
        row: dict[str, Any] = {
            "class": c,
            "n": n,
            "labelled": acc["labelled"],
            "precision": acc["correct"] / acc["labelled"] if acc["labelled"] else math.nan,
            "mean_prob": acc["prob"] / n,
        }
        for s in STAT_NAMES:
            mean = acc["sum"][s] / n
            row[f"{s}_mean"], row[f"{s}_std"] = mean, math.sqrt(max(0.0, acc["sumsq"][s] / n - mean * mean))
        row["rho_n"] = acc["rho_n"]
        row["rho_mean"] = acc["rho_sum"] / acc["rho_n"] if acc["rho_n"] else math.nan
        row["extreme"] = [(si, r) for _, si, r in acc["extreme"]]
        per_class.append(row)
    pairs = [{"label": a, "predicted": b, "count": n} for (a, b), n in confusions.items()]
    pairs.sort(key=lambda r: (-r["count"], r["label"], r["predicted"]))
    return Aggregates(per_class, pairs, errors, disagreements, compared)
