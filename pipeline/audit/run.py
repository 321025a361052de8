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

from ..errors import UserError
from ..fs import StorageOptions, get_fs, join, write_bytes_atomic
from ..store.integrity import StoreDamaged
from .figures import STRIP, block_partial, block_typical, figures_task, merge_partials
from .html import picture_name
from .stats import STAT_NAMES

log = logging.getLogger(__name__)

ASSETS = "audit_files"
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
        acc = (
            f", accuracy {1 - self.errors / self.labelled:.1%}"
            if self.labelled
            else " (no labels: no errors to explain)"
        )
        out = [
            f"audit of {self.samples} samples in {self.classes} predicted classes: {self.labelled} labelled, {self.errors} misclassified{acc}",
            f"compared with the second method on {self.compared} samples"
            if self.compared
            else "no second method compared (--compare EVAL_DIR)",
            f"{self.thumbnails} thumbnails; done in {self.seconds:.1f}s",
        ]
        if self.errors and not self.label_maps:
            out.insert(
                1,
                "errors are explained with the predicted class's map only: a store made with "
                "`lcam cams ... --classes predicted,label` adds the true class's map and their overlap",
            )
        out += [f"{name}: {url}" for name, url in self.files.items()]
        return out


# ---------------------------------------------------------------- the job
def _load_compare(cfg: AuditConfig) -> tuple[dict[str, tuple[int, np.ndarray]], str]:
    """key -> (class id, map) of the second method from an evaluation's maps.npz."""
    from ..fs import get_fs

    url = join(cfg.compare, MAPS_FILE)
    fs, path = get_fs(url, cfg.storage_options)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise UserError(
            f"--compare {cfg.compare}: no {MAPS_FILE} there; run `lcam eval ... --save-maps N` into that folder first"
        ) from None
    data = np.load(io.BytesIO(raw))
    methods = [str(m) for m in data["methods"]]
    if cfg.compare_method not in methods:
        raise UserError(
            f"--compare {cfg.compare}: {MAPS_FILE} has no {cfg.compare_method!r} maps (it has {', '.join(methods)}); pick one with --compare-method"
        )
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

    from ..classes import class_names_options, describe_classes, load_class_names, store_columns
    from ..options import validate
    from ..raykit import ensure_ray
    from ..store.cam_store import CamStore
    from .html import render_audit

    t0 = time.perf_counter()
    validate(cfg)  # --max-thumbnails, --band: their declared ranges
    store = CamStore.open(cfg.cams, cfg.storage_options)
    entries = store.entries()
    if not entries or len(store) == 0:
        raise UserError(f"the CAM store {cfg.cams} holds no samples; run `lcam cams` into it first")
    damaged = store.damage_scan()  # before Ray starts: a lost object would fail the audit minutes in
    if damaged:
        url, what = sorted(damaged.items())[0]
        raise StoreDamaged(
            f"CAM store {store.url}: {len(damaged)} shard(s) damaged, e.g. {url}: {what}; "
            "re-run the `lcam cams` that made the store (it re-makes damaged shards), then audit"
        )
    backbone = store.identity["checkpoint"]["backbone"]
    names = load_class_names(
        cfg.class_names, class_names_options(cfg.class_names, cfg.storage_options), int(backbone["num_classes"])
    )
    compare, compare_label = _load_compare(cfg) if cfg.compare else ({}, "")
    out_so = cfg.out_storage_options

    ensure_ray()
    compare_ref = ray.put(compare) if compare else None
    items = [{"shard_id": e["shard_id"], "url": e["url"], "shard_index": i} for i, e in enumerate(entries)]
    per_sample = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            figures_task,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={
                "store": store,
                "grid": cfg.grid,
                "band": cfg.band,
                "top_fraction": cfg.top_fraction,
                "compare": compare_ref,
            },
        )
        .materialize()
    )
    # the picture budget: each error row 3 pictures, each disagreement row 3, each class strip 2 x STRIP
    budget = cfg.max_thumbnails
    share_cmp = 0.2 if compare else 0.0
    n_error_rows = int(budget * (0.8 - share_cmp) / 2) // 3
    n_dis_rows = int(budget * share_cmp) // 3
    partials = [
        json.loads(r["partial"])
        for r in per_sample.map_batches(
            block_partial, batch_format="numpy", fn_kwargs={"n_errors": n_error_rows, "n_disagree": n_dis_rows}
        ).take_all()
    ]
    agg = merge_partials(partials, n_error_rows, n_dis_rows)
    log.info(
        "audit: figures of %d samples in %d blocks, %d classes, %.1fs",
        len(store),
        len(partials),
        len(agg.per_class),
        time.perf_counter() - t0,
    )
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
        if np.isfinite(
            float(r["label_prob"])
        ):  # the store holds the true class's map (a --classes predicted,label store)
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

    files = {
        "per_class.csv": join(cfg.out, "per_class.csv"),
        "confusions.csv": join(cfg.out, "confusions.csv"),
        "per_sample.parquet": join(cfg.out, "per_sample.parquet"),
        "audit.html": join(cfg.out, "audit.html"),
    }
    write_bytes_atomic(files["per_class.csv"], per_class_csv(ranked, names), out_so)
    write_bytes_atomic(files["confusions.csv"], confusions_csv(agg.confusions, names), out_so)
    _write_parquet(per_sample, files["per_sample.parquet"], out_so)
    info = store.info()
    context = {
        "store": cfg.cams,
        "samples": len(store),
        "labelled": labelled,
        "errors": n_err,
        "classes_desc": describe_classes(info["classes"]),
        "columns": store_columns(info["classes"]),
        "checkpoint": info["checkpoint"],
        "names": names,
        "band": cfg.band,
        "top_fraction": cfg.top_fraction,
        "grid": cfg.grid,
        "compare_label": compare_label,
        "compare_dir": cfg.compare,
        "compared": n_compared,
        "max_thumbnails": budget,
    }
    page = render_audit(
        context,
        per_class=ranked,
        confusions=agg.confusions,
        top_errors=top_errors,
        strips=ranked[:n_strips],
        disagreements=disagreements,
        pictures=set(pictures),
        assets=ASSETS,
    )
    write_bytes_atomic(files["audit.html"], page.encode(), out_so)  # last: the page never links to a missing picture
    columns = store_columns(info["classes"])
    return AuditSummary(
        cfg.out,
        files["audit.html"],
        len(store),
        labelled,
        n_err,
        len(ranked),
        n_compared,
        len(pictures),
        time.perf_counter() - t0,
        files,
        label_maps="label" in columns or any(c.startswith("top-") for c in columns),
    )


def _draw(
    store: Any,
    entries: Sequence[Mapping[str, Any]],
    wanted: Mapping[int, Mapping[int, list[tuple[str, int]]]],
    compare: Mapping[str, tuple[int, np.ndarray]],
    cfg: AuditConfig,
) -> dict[str, bytes]:
    import ray

    draw = ray.remote(num_cpus=1)(draw_shard)
    refs = []
    for si, rows in sorted(wanted.items()):
        cmp = {}
        if compare:
            keys = store.read_shard(entries[si]["shard_id"], fields=[])["keys"]
            cmp = {
                keys[r]: compare[keys[r]]
                for r, w in rows.items()
                if any(k == "compare" for k, _ in w) and keys[r] in compare
            }
        refs.append(
            draw.remote(
                store,
                dict(entries[si]),
                si,
                dict(rows),
                cmp,
                cfg.storage_options,
                cfg.thumb_size,
                cfg.colormap,
                cfg.opacity,
            )
        )
    out: dict[str, bytes] = {}
    for part in ray.get(refs):
        out.update(part)
    return out


def draw_shard(
    store: Any,
    entry: Mapping[str, Any],
    shard_index: int,
    rows: Mapping[int, list[tuple[str, int]]],
    compare: Mapping[str, tuple[int, np.ndarray]],
    storage_options: StorageOptions,
    size: int,
    colormap: str,
    opacity: float,
) -> dict[str, bytes]:
    """JPEG thumbnails of some rows of one shard group: the centre crop the model saw, and overlays."""
    import torch
    from PIL import Image

    from lcam.backbones.preprocessing import Preprocessing
    from lcam.explain import upsampled_uint8

    from ..images import crop_pixels, decode_image
    from ..render import overlay
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
        raise UserError(
            f"the audit's pictures need the source shard {entry['url']}, which is unreadable ({type(exc).__name__}: {exc}); "
            "make it readable (--storage-option) or use --max-thumbnails 0"
        ) from None
    lost = sorted(set(keys) - set(found))
    if lost:
        raise UserError(
            f"the source shard {entry['url']} no longer holds {len(lost)} samples of the CAM store (e.g. {lost[:3]}); it changed since the CAMs were made"
        )
    prep = store.identity["checkpoint"]["backbone"]["preprocessing"]
    preprocessing = Preprocessing.from_dict(prep)  # with its interpolation (a bicubic model's crops)
    view = store.identity["source"].get("view", "center")
    out: dict[str, bytes] = {}
    for key, r in keys.items():
        crop = crop_pixels(decode_image(found[key]), preprocessing, view).transpose(1, 2, 0)
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
    cols = (
        ["class", "n", "labelled", "precision", "mean_prob"]
        + [f"{s}_{a}" for s in STAT_NAMES for a in ("mean", "std")]
        + ["rho_n", "rho_mean"]
    )
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
        w.writerow(
            [
                int(r["label"]),
                _name(names, int(r["label"])),
                int(r["predicted"]),
                _name(names, int(r["predicted"])),
                int(r["count"]),
            ]
        )
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
