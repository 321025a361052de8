"""``lcam audit``: a classifier audited over a whole CAM store, as a Ray Data job.

One read task per shard group of the store computes every sample's figures on a worker
(:mod:`pipeline.audit.stats` on its maps: area, entropy, border share, centre of mass,
spread; for a misclassified sample the overlap of its predicted-class and true-class maps;
with ``--compare`` the rank correlation with the evaluation's Grad-CAM map). Those rows stay
in Ray's object store; what reaches the driver is bounded whatever the dataset's size:

* one small partial aggregate per block, made on the workers: per class its counts, sums
  and sums of squares of every statistic and its top samples by border share; the block's
  (true, predicted) counts; its N most confident mistakes and N most disagreeing samples.
  The driver merges these (per-class rows, confusion pairs, two top-N lists);
* a second pass for each class's typical samples (nearest the class mean, known only then),

and then the pictures of those few samples, drawn by one Ray task per source shard (the
images come from the shards the store records). Outputs under OUT::

    audit.html          the page (written last, atomically): aggregates + a bounded number of thumbnails
    audit_files/        its thumbnails (JPEG, at most --max-thumbnails)
    per_class.csv       every per-class figure
    confusions.csv      every (true, predicted) pair with its count
    per_sample.parquet/ every per-sample figure (a Parquet dataset: one file per block)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .html import picture_name
from .stats import STAT_NAMES, map_statistics, resize_maps, spearman, top_region_iou
from ..errors import UserError
from ..store.layer import StoreDamaged
from ..fs import StorageOptions, get_fs, join, write_bytes_atomic

log = logging.getLogger(__name__)

ASSETS = "audit_files"
STRIP = 3  # typical and extreme samples per class strip
MAPS_FILE = "maps.npz"  # what `lcam eval --save-maps N` writes


from ..configs import AuditConfig  # noqa: E402


@dataclass
class AuditSummary:
    out: str
    page: str
    samples: int
    labelled: int
    errors: int
    classes: int
    compared: int
    thumbnails: int
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    label_maps: bool = True  # the store holds the true class's map of a misclassified sample

    def lines(self) -> list[str]:
        acc = f", accuracy {1 - self.errors / self.labelled:.1%}" if self.labelled else " (no labels: no errors to explain)"
        out = [
            f"audit of {self.samples} samples in {self.classes} predicted classes: {self.labelled} labelled, {self.errors} misclassified{acc}",
            f"compared with the second method on {self.compared} samples" if self.compared else "no second method compared (--compare EVAL_DIR)",
            f"{self.thumbnails} thumbnails; done in {self.seconds:.1f}s",
        ]
        if self.errors and not self.label_maps:
            out.insert(1, "errors are explained with the predicted class's map only: a store made with "
                          "`lcam cams ... --classes predicted,label` adds the true class's map and their overlap")
        out += [f"{name}: {url}" for name, url in self.files.items()]
        return out


# ---------------------------------------------------------------- per sample, on the workers
def _first_column(class_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Per row, the first column whose class is ``wanted`` (-1: none, or ``wanted`` < 0)."""
    hit = (class_ids == wanted[:, None]) & (wanted[:, None] >= 0)
    return np.where(hit.any(1), hit.argmax(1), -1)


def shard_figures(store: Any, entry: Mapping[str, Any], shard_index: int, grid: int, band: float, top_fraction: float,
                  compare: Mapping[str, tuple[int, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Every figure of every sample of one shard group: columns of ``n`` values.

    The evidence map of a sample is the map of its predicted class (a column holding that
    class), else its first map. ``compare``: key -> (class id, map) of the second method.
    """
    data = store.read_shard(entry["shard_id"], fields=["labels", "class_ids", "probs", "raw", "predicted", "predicted_prob"])
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
        "label_prob": np.where(label_col >= 0, probs[rows, np.maximum(label_col, 0)] if n else 0.0, np.nan).astype(np.float32),
    }
    for name, value in map_statistics(evidence, band).items():
        out[name] = value.astype(np.float32)
    iou = np.full(n, np.nan, np.float32)
    both = (pred_col >= 0) & (label_col >= 0) & (out["correct"] == 0)
    if both.any():
        b = rows[both]
        iou[both] = top_region_iou(resize_maps(maps[b, pred_col[b]], grid), resize_maps(maps[b, label_col[b]], grid), top_fraction)
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


def _figures_task(batch: dict[str, np.ndarray], store: Any, grid: int, band: float, top_fraction: float, compare: Any) -> dict[str, np.ndarray]:
    import ray

    if isinstance(compare, ray.ObjectRef):
        compare = ray.get(compare)
    parts = [shard_figures(store, {"shard_id": s, "url": u}, int(i), grid, band, top_fraction, compare)
             for s, u, i in zip(batch["shard_id"], batch["url"], batch["shard_index"])]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


RECORD = ("shard_index", "shard", "key", "row", "label", "predicted", "predicted_prob", "label_prob", "pred_label_iou",
          "evidence_class", "compare_class", "compare_rho", *STAT_NAMES)


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
            "n": len(idx), "labelled": int((correct[idx] >= 0).sum()), "correct": int((correct[idx] == 1).sum()),
            "prob": float(batch["predicted_prob"][idx].astype(np.float64).sum()),
            "sum": {s: float(batch[s][idx].astype(np.float64).sum()) for s in STAT_NAMES},
            "sumsq": {s: float((batch[s][idx].astype(np.float64) ** 2).sum()) for s in STAT_NAMES},
            "rho_n": len(rho), "rho_sum": float(rho.sum()),
            "extreme": [[float(border[j]), int(batch["shard_index"][idx[j]]), int(batch["row"][idx[j]])] for j in _top(border, STRIP)],
        }
    wrong = np.flatnonzero(correct == 0)
    pairs, counts = np.unique(np.stack([batch["label"][wrong], batch["predicted"][wrong]], 1).reshape(-1, 2), axis=0, return_counts=True)
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
        out[str(int(c))] = [[float(dist[j]), int(batch["shard_index"][idx[j]]), int(batch["row"][idx[j]])] for j in _top(-dist, STRIP)]
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
            acc = classes.setdefault(int(c), {"n": 0, "labelled": 0, "correct": 0, "prob": 0.0, "rho_n": 0, "rho_sum": 0.0, "extreme": [],
                                              "sum": dict.fromkeys(STAT_NAMES, 0.0), "sumsq": dict.fromkeys(STAT_NAMES, 0.0)})
            for k in ("n", "labelled", "correct", "prob", "rho_n", "rho_sum"):
                acc[k] += v[k]
            for s in STAT_NAMES:
                acc["sum"][s] += v["sum"][s]
                acc["sumsq"][s] += v["sumsq"][s]
            acc["extreme"] = sorted(acc["extreme"] + v["extreme"], key=lambda e: (-e[0], e[1], e[2]))[:STRIP]
        for a, b, n in p["confusions"]:
            confusions[(a, b)] = confusions.get((a, b), 0) + n
        errors = sorted(errors + p["errors"], key=lambda r: (-r["predicted_prob"], r["shard_index"], r["row"]))[:n_errors]
        disagreements = sorted(disagreements + p["disagreements"], key=lambda r: (r["compare_rho"], r["shard_index"], r["row"]))[:n_disagree]
        compared += p["compared"]
    per_class = []
    for c, acc in sorted(classes.items()):
        n = acc["n"]
        row: dict[str, Any] = {"class": c, "n": n, "labelled": acc["labelled"],
                               "precision": acc["correct"] / acc["labelled"] if acc["labelled"] else math.nan, "mean_prob": acc["prob"] / n}
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


# ---------------------------------------------------------------- the job
def _load_compare(cfg: AuditConfig) -> tuple[dict[str, tuple[int, np.ndarray]], str]:
    """key -> (class id, map) of the second method from an evaluation's maps.npz."""
    from ..fs import get_fs

    url = join(cfg.compare, MAPS_FILE)
    fs, path = get_fs(url, cfg.storage_options)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise UserError(f"--compare {cfg.compare}: no {MAPS_FILE} there; run `lcam eval ... --save-maps N` into that folder first") from None
    data = np.load(io.BytesIO(raw))
    methods = [str(m) for m in data["methods"]]
    if cfg.compare_method not in methods:
        raise UserError(f"--compare {cfg.compare}: {MAPS_FILE} has no {cfg.compare_method!r} maps (it has {', '.join(methods)}); pick one with --compare-method")
    label = [str(x) for x in data["labels"]][methods.index(cfg.compare_method)]
    maps = np.asarray(data[f"map__{cfg.compare_method}"], dtype=np.float32)
    out = {}
    for key, cls, m in zip(data["keys"], data["class_ids"], maps):
        if np.isfinite(m).all():  # NaN: the method ran on a subset without this image
            out[str(key)] = (int(cls), m)
    return out, label


def run_audit(cfg: AuditConfig) -> AuditSummary:
    """Read the CAM store with Ray Data, aggregate, draw a bounded number of thumbnails, write the page."""
    import ray

    from .html import render_audit
    from ..store.cam_store import CamStore
    from ..classes import class_names_options, describe_classes, store_columns
    from ..classes import load_class_names
    from ..options import validate
    from ..raykit import ensure_ray

    t0 = time.perf_counter()
    validate(cfg)  # --max-thumbnails, --band: their declared ranges
    store = CamStore.open(cfg.cams, cfg.storage_options)
    entries = store.entries()
    if not entries or len(store) == 0:
        raise UserError(f"the CAM store {cfg.cams} holds no samples; run `lcam cams` into it first")
    damaged = store.damage_scan()  # before Ray starts: a lost object would fail the audit minutes in
    if damaged:
        url, what = sorted(damaged.items())[0]
        raise StoreDamaged(f"CAM store {store.url}: {len(damaged)} shard(s) damaged, e.g. {url}: {what}; "
                           "re-run the `lcam cams` that made the store (it re-makes damaged shards), then audit")
    backbone = store.identity["checkpoint"]["backbone"]
    names = load_class_names(cfg.class_names, class_names_options(cfg.class_names, cfg.storage_options), int(backbone["num_classes"]))
    compare, compare_label = _load_compare(cfg) if cfg.compare else ({}, "")
    out_so = cfg.out_storage_options

    ensure_ray()
    compare_ref = ray.put(compare) if compare else None
    items = [{"shard_id": e["shard_id"], "url": e["url"], "shard_index": i} for i, e in enumerate(entries)]
    per_sample = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(_figures_task, batch_size=1, batch_format="numpy",
                     fn_kwargs={"store": store, "grid": cfg.grid, "band": cfg.band, "top_fraction": cfg.top_fraction, "compare": compare_ref})
        .materialize()
    )
    # the picture budget: each error row 3 pictures, each disagreement row 3, each class strip 2 x STRIP
    budget = cfg.max_thumbnails
    share_cmp = 0.2 if compare else 0.0
    n_error_rows = int(budget * (0.8 - share_cmp) / 2) // 3
    n_dis_rows = int(budget * share_cmp) // 3
    partials = [json.loads(r["partial"]) for r in per_sample.map_batches(block_partial, batch_format="numpy", fn_kwargs={"n_errors": n_error_rows, "n_disagree": n_dis_rows}).take_all()]
    agg = merge_partials(partials, n_error_rows, n_dis_rows)
    log.info("audit: figures of %d samples in %d blocks, %d classes, %.1fs", len(store), len(partials), len(agg.per_class), time.perf_counter() - t0)
    means = {str(r["class"]): r["border_mean"] for r in agg.per_class}
    typical: dict[int, list] = {}
    for r in per_sample.map_batches(block_typical, batch_format="numpy", fn_kwargs={"means": means}).take_all():
        for c, picks in json.loads(r["partial"]).items():
            typical[int(c)] = sorted(typical.get(int(c), []) + picks)[:STRIP]
    for row in agg.per_class:
        row["typical"] = [(si, r) for _, si, r in typical.get(row["class"], [])]
        if store.class_coverage is not None and 0 <= row["class"] < len(store.class_coverage):
            row["train_samples"] = int(store.class_coverage[row["class"]])  # the samples behind this class's maps
    n_err = sum(r["count"] for r in agg.confusions)
    labelled = sum(int(r["labelled"]) for r in agg.per_class)
    ranked = sorted(agg.per_class, key=lambda r: (-r["border_mean"], -r["spread_mean"], r["class"]))
    top_errors, disagreements, n_compared = agg.errors, agg.disagreements, agg.compared
    used = 3 * (len(top_errors) + len(disagreements))
    n_strips = min(len(ranked), max(0, budget - used) // (2 * STRIP))

    # the pictures: one task per source shard that holds a picked sample
    wanted: dict[int, dict[int, list[tuple[str, int]]]] = {}  # shard index -> row -> [(what, class id)]
    for r in top_errors:
        w = wanted.setdefault(int(r["shard_index"]), {}).setdefault(int(r["row"]), [])
        w += [("image", -1), ("cam", int(r["predicted"]))]
        if np.isfinite(float(r["label_prob"])):  # the store holds the true class's map (a --classes predicted,label store)
            w.append(("cam", int(r["label"])))
    for r in disagreements:
        w = wanted.setdefault(int(r["shard_index"]), {}).setdefault(int(r["row"]), [])
        w += [("image", -1), ("cam", int(r["compare_class"])), ("compare", int(r["compare_class"]))]
    for c in ranked[:n_strips]:
        for si, row in c["typical"] + c["extreme"]:
            wanted.setdefault(si, {}).setdefault(row, []).append(("cam", int(c["class"])))
    pictures = _draw(store, entries, wanted, compare, cfg)
    log.info("audit: %d pictures from %d source shards, %.1fs", len(pictures), len(wanted), time.perf_counter() - t0)
    assets = join(cfg.out, ASSETS)
    for name, data in pictures.items():
        write_bytes_atomic(join(assets, name), data, out_so)

    files = {"per_class.csv": join(cfg.out, "per_class.csv"), "confusions.csv": join(cfg.out, "confusions.csv"),
             "per_sample.parquet": join(cfg.out, "per_sample.parquet"), "audit.html": join(cfg.out, "audit.html")}
    write_bytes_atomic(files["per_class.csv"], per_class_csv(ranked, names), out_so)
    write_bytes_atomic(files["confusions.csv"], confusions_csv(agg.confusions, names), out_so)
    _write_parquet(per_sample, files["per_sample.parquet"], out_so)
    info = store.info()
    context = {
        "store": cfg.cams, "samples": len(store), "labelled": labelled, "errors": n_err, "classes_desc": describe_classes(info["classes"]),
        "columns": store_columns(info["classes"]), "checkpoint": info["checkpoint"], "names": names, "band": cfg.band,
        "top_fraction": cfg.top_fraction, "grid": cfg.grid, "compare_label": compare_label, "compare_dir": cfg.compare,
        "compared": n_compared, "max_thumbnails": budget,
    }
    page = render_audit(context, per_class=ranked, confusions=agg.confusions, top_errors=top_errors, strips=ranked[:n_strips],
                        disagreements=disagreements, pictures=set(pictures), assets=ASSETS)
    write_bytes_atomic(files["audit.html"], page.encode(), out_so)  # last: the page never links to a missing picture
    columns = store_columns(info["classes"])
    return AuditSummary(cfg.out, files["audit.html"], len(store), labelled, n_err, len(ranked), n_compared, len(pictures),
                        time.perf_counter() - t0, files, label_maps="label" in columns or any(c.startswith("top-") for c in columns))


def _draw(store: Any, entries: Sequence[Mapping[str, Any]], wanted: Mapping[int, Mapping[int, list[tuple[str, int]]]],
          compare: Mapping[str, tuple[int, np.ndarray]], cfg: AuditConfig) -> dict[str, bytes]:
    import ray

    draw = ray.remote(num_cpus=1)(draw_shard)
    refs = []
    for si, rows in sorted(wanted.items()):
        cmp = {}
        if compare:
            keys = store.read_shard(entries[si]["shard_id"], fields=[])["keys"]
            cmp = {keys[r]: compare[keys[r]] for r, w in rows.items() if any(k == "compare" for k, _ in w) and keys[r] in compare}
        refs.append(draw.remote(store, dict(entries[si]), si, dict(rows), cmp, cfg.storage_options, cfg.thumb_size, cfg.colormap, cfg.opacity))
    out: dict[str, bytes] = {}
    for part in ray.get(refs):
        out.update(part)
    return out


def draw_shard(store: Any, entry: Mapping[str, Any], shard_index: int, rows: Mapping[int, list[tuple[str, int]]],
               compare: Mapping[str, tuple[int, np.ndarray]], storage_options: StorageOptions, size: int, colormap: str, opacity: float) -> dict[str, bytes]:
    """JPEG thumbnails of some rows of one shard group: the centre crop the model saw, and overlays."""
    import torch
    from PIL import Image

    from lcam.backbones.base import Preprocessing

    from lcam.explain import upsampled_uint8
    from ..images import decode_image, preprocess
    from ..render import overlay, tensor_to_uint8
    from ..shards.read import iter_samples

    data = store.read_shard(entry["shard_id"], fields=["class_ids", "raw"], normalized=False)
    keys = {data["keys"][r]: r for r in rows}
    found: dict[str, bytes] = {}
    try:
        for s in iter_samples(entry["url"], storage_options):
            if s.key in keys:
                found[s.key] = s.image
                if len(found) == len(keys):
                    break
    except Exception as exc:  # missing file, no access, damaged tar
        raise UserError(f"the audit's pictures need the source shard {entry['url']}, which is unreadable ({type(exc).__name__}: {exc}); "
                        "make it readable (--storage-option) or use --max-thumbnails 0") from None
    lost = sorted(set(keys) - set(found))
    if lost:
        raise UserError(f"the source shard {entry['url']} no longer holds {len(lost)} samples of the CAM store (e.g. {lost[:3]}); it changed since the CAMs were made")
    prep = store.identity["checkpoint"]["backbone"]["preprocessing"]
    preprocessing = Preprocessing(resize=prep["resize"], crop=prep["crop"], mean=tuple(prep["mean"]), std=tuple(prep["std"]))
    view = store.identity["source"].get("view", "center")
    out: dict[str, bytes] = {}
    for key, r in keys.items():
        crop = tensor_to_uint8(preprocess(decode_image(found[key]), preprocessing, view))
        thumb = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
        for what, cls in rows[r]:
            name = picture_name(what, shard_index, r, cls)
            if name in out:
                continue
            if what == "image":
                pic = thumb
            else:
                if what == "cam":
                    cols = np.nonzero(data["class_ids"][r] == cls)[0]
                    if not len(cols):  # the store holds no map of this class for this sample: the page says "not drawn"
                        continue
                    col = int(cols[0])
                    raw = torch.from_numpy(data["raw"][r, col].astype(np.float32))
                else:
                    raw = torch.from_numpy(np.asarray(compare[key][1], dtype=np.float32))
                cam = upsampled_uint8(raw, size).numpy().astype(np.float32) / 255.0
                pic = overlay(thumb, cam, colormap, opacity)
            buf = io.BytesIO()
            Image.fromarray(pic).save(buf, format="JPEG", quality=85)
            out[name] = buf.getvalue()
    return out


# ---------------------------------------------------------------- tables
def _name(names: Sequence[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else ""


def per_class_csv(per_class: Sequence[Mapping[str, Any]], names: Sequence[str]) -> bytes:
    cols = ["class", "n", "labelled", "precision", "mean_prob"] + [f"{s}_{a}" for s in STAT_NAMES for a in ("mean", "std")] + ["rho_n", "rho_mean"]
    cols += ["train_samples"] if any("train_samples" in r for r in per_class) else []
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "class", "name"] + cols[1:])
    for i, r in enumerate(per_class, 1):
        w.writerow([i, int(r["class"]), _name(names, int(r["class"]))] + [_fmt(r[c]) for c in cols[1:]])
    return buf.getvalue().encode()


def confusions_csv(confusions: Sequence[Mapping[str, Any]], names: Sequence[str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["label", "label_name", "predicted", "predicted_name", "count"])
    for r in confusions:
        w.writerow([int(r["label"]), _name(names, int(r["label"])), int(r["predicted"]), _name(names, int(r["predicted"])), int(r["count"])])
    return buf.getvalue().encode()


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    return str(int(v)) if isinstance(v, (int, np.integer)) else str(v)


def _write_parquet(ds: Any, url: str, storage_options: StorageOptions) -> None:
    """Into a temporary folder beside it, then renamed: never a half-written dataset under its final name."""
    import pyarrow.fs as pafs

    fs, path = get_fs(url, storage_options)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    ds.write_parquet(tmp, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)))
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.mv(tmp, path, recursive=True)
