"""Pack an image folder into WebDataset tar shards.

Packing keeps the ORIGINAL image bytes (never re-encoded): the cached features must
come from exactly the pixels a user would get from their own files. Bad inputs are
decided once, here, with PIL, and reported; odd-but-usable images are packed and noted.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import random
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from PIL import Image, UnidentifiedImageError

from pipeline.classes import imagenet_classes, imagenet_wnids
from pipeline.errors import UserError
from pipeline.fs import StorageOptions, get_fs, is_local, join, write_json_atomic

from ..progress import Progress, skipped_lines
from .format import INDEX_FORMAT, INDEX_NAME
from .labels import WNID, find_labels_file, parse_labels
from .writer import ShardWriter

REPORT_NAME = "pack_report.json"

# File extension -> sample extension; the content decides in the end (see _inspect).
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
FORMAT_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
LAYOUTS = ("auto", "imagefolder", "labels", "imagenet-val")
CROP = 224  # images smaller than the crop get upsampled by Resize(256); noted

FOLDER_LABELS_WARNING = (
    "warning: the class folders are not ImageNet WordNet ids, so labels are 0..N-1 in folder-name order; an ImageNet "
    "classifier reads label 0 as tench, 1 as goldfish, ... Train L-CAM with --target predicted (the classifier's own "
    "class), or pack with --labels FILE mapping each image to the classifier's class index (or name the folders by WordNet id)"
)
_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})$")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
_DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"


@dataclass
class PackReport:
    packed: int
    skipped: list[dict]  # {"file", "reason"}
    notes: list[dict]  # {"file", "key", "kind", "note"}
    shards: list[dict]  # index entries: {"name", "count", "bytes", "sha256"}
    seconds: float
    layout: str = ""
    out_url: str = ""
    labels_scheme: str = ""
    labels_unmatched: list[dict] = field(default_factory=list)  # labels file rows naming no image: {"line", "file"}
    boxed: int = 0  # samples packed with bounding boxes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        rate = self.packed / self.seconds if self.seconds > 0 else 0.0
        size = sum(s["bytes"] for s in self.shards)
        lines = [
            f"packed {self.packed} images ({self.layout} layout, labels: {self.labels_scheme}) into "
            f"{len(self.shards)} shard(s), {size / 2**20:.1f} MiB, at {self.out_url} "
            f"in {self.seconds:.1f} s ({rate:.0f} img/s)"
            + (f"; {self.boxed} with bounding boxes" if self.boxed else ""),
        ]
        lines += skipped_lines(
            self.skipped, "files", f"{REPORT_NAME} lists them all", shown=5, name=lambda s: s["file"]
        )
        if self.labels_scheme == "folders":
            lines.append(FOLDER_LABELS_WARNING)
        if self.labels_unmatched:
            lines.append(f"labels file rows naming no image in the folder: {len(self.labels_unmatched)} (not packed)")
            lines += [f"  line {u['line']}: {u['file']}" for u in self.labels_unmatched[:5]]
            if len(self.labels_unmatched) > 5:
                lines.append(f"  ... {len(self.labels_unmatched) - 5} more (all in {REPORT_NAME})")
        if self.notes:
            by = Counter(n["kind"] for n in self.notes)
            lines.append(
                f"notes {len(self.notes)} (packed anyway): " + ", ".join(f"{k} x{v}" for k, v in by.most_common())
            )
        lines.append(f"full report: {join(self.out_url, REPORT_NAME)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- planning


@dataclass
class _Item:
    rel: str  # path relative to src, "/"-separated
    path: str
    label: int
    key: str = ""
    boxes: list[list[int]] | None = None  # from the labels file (pipeline.shards.boxes): original pixels, inclusive


@dataclass
class _Plan:
    layout: str
    items: list[_Item]
    skipped: list[dict]
    notes: list[dict]
    labels_scheme: str
    class_names: list[str] | None
    unmatched: list[dict] = field(default_factory=list)  # labels file rows naming no image: {"line", "file"}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan(src: Path, exclude: Path | None) -> tuple[list[str], dict[str, list[str]]]:
    """Top-level files, and for each top-level folder all files below it (relative paths)."""
    top_files, folders = [], {}
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if _is_hidden(entry.name):
            continue
        if entry.is_dir():
            if exclude is not None and Path(entry.path).resolve() == exclude:
                continue  # the output folder inside the source folder
            files = []
            for root, dirs, names in os.walk(entry.path):
                dirs[:] = sorted(
                    d for d in dirs if not _is_hidden(d) and (exclude is None or Path(root, d).resolve() != exclude)
                )
                files += [
                    os.path.relpath(os.path.join(root, n), src).replace(os.sep, "/")
                    for n in sorted(names)
                    if not _is_hidden(n)
                ]
            folders[entry.name] = files
        elif entry.is_file():
            top_files.append(entry.name)
    return top_files, folders


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _val_number(rel: str) -> int | None:
    m = _VAL_NAME.match(os.path.splitext(os.path.basename(rel))[0])
    return int(m.group(1)) if m else None


def _plan(
    src: Path,
    layout: str,
    labels_file: str | None,
    exclude: Path | None,
    num_classes: int = 1000,
    skip_bad_labels: bool = False,
) -> _Plan:
    top_files, folders = _scan(src, exclude)
    top_images = [n for n in top_files if _is_image_name(n)]
    class_dirs = {d: f for d, f in folders.items() if any(_is_image_name(x) for x in f)}
    labels_path: str | None = str(labels_file) if labels_file else None

    if layout == "auto":
        if class_dirs and top_images:
            raise UserError(
                f"{src}: cannot tell the layout: it has {len(class_dirs)} sub-folder(s) (class folders?) and "
                f"{len(top_images)} loose image(s) at the top; pass --layout imagefolder or --layout labels"
            )
        if class_dirs:
            if labels_path:
                raise UserError(
                    f"{src} has class sub-folders but --labels was given; pass --layout labels if the labels file lists paths"
                )
            layout = "imagefolder"
        elif top_images:
            if labels_path is None:
                found = find_labels_file(src, top_files)
                if found is None:
                    raise UserError(
                        f"{src} is a flat folder of images with no labels file; pass --labels FILE (or use class sub-folders)"
                    )
                labels_path = str(found)
            kind, _ = parse_labels(labels_path)
            all_val = all(_val_number(n) is not None for n in top_images)
            layout = "imagenet-val" if kind == "per-line" and all_val else "labels"
        else:
            raise UserError(f"{src}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))})")

    skipped: list[dict] = []
    notes: list[dict] = []
    items: list[_Item] = []
    class_names: list[str] | None = None
    used_labels = Path(labels_path).resolve() if labels_path and "://" not in labels_path else None

    def not_image(rel: str) -> bool:
        if _is_image_name(rel):
            return False
        if used_labels is None or (src / rel).resolve() != used_labels:
            ext = os.path.splitext(rel)[1]
            skipped.append({"file": rel, "reason": f"unknown extension: {ext or '(none)'}"})
        return True

    if layout == "imagefolder":
        if not class_dirs:
            raise UserError(f"{src}: no class sub-folders with files in them")
        names = sorted(class_dirs)
        wnids = imagenet_wnids()
        if all(WNID.match(n) for n in names):
            unknown = [n for n in names if n not in wnids]
            if unknown:
                raise UserError(
                    f"{src}: folders look like ImageNet WordNet ids but {unknown[:5]} are not ImageNet classes"
                )
            index = {n: wnids[n] for n in names}
            scheme, class_names = "imagenet", list(imagenet_classes())
        else:
            index = {n: i for i, n in enumerate(names)}
            scheme, class_names = "folders", names
        for rel in top_files:
            if _is_image_name(rel):
                skipped.append({"file": rel, "reason": "image outside the class sub-folders"})
            elif used_labels is None or (src / rel).resolve() != used_labels:
                skipped.append({"file": rel, "reason": f"unknown extension: {os.path.splitext(rel)[1] or '(none)'}"})
        for d in names:
            items += [_Item(rel, str(src / rel), index[d]) for rel in class_dirs[d] if not not_image(rel)]
        for d in sorted(set(folders) - set(class_dirs)):  # folders without images: not classes
            skipped += [
                {"file": rel, "reason": f"unknown extension: {os.path.splitext(rel)[1] or '(none)'}"}
                for rel in folders[d]
            ]
        return _Plan(layout, items, skipped, notes, scheme, class_names)

    if layout not in ("labels", "imagenet-val"):
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if labels_path is None:
        labels_path = str(find_labels_file(src, top_files) or "")
        if not labels_path:
            raise UserError(f"layout {layout} needs a labels file; pass --labels FILE")
        used_labels = Path(labels_path).resolve()
    kind, labels = parse_labels(labels_path, num_classes, skip_bad_labels)
    boxes = getattr(labels, "boxes", {})  # a per-line labels file carries none
    rels = [*top_files, *(f for files in folders.values() for f in files)]
    images = [rel for rel in rels if not not_image(rel)]

    if layout == "imagenet-val":
        if Path(labels_path).name == _DEVKIT_GT:
            raise UserError(
                f"{labels_path} is the devkit ground truth: its values are ILSVRC2012_IDs (1..1000) in the devkit's "
                "own order, not the standard class indices. Convert it with the devkit's meta.mat, or use a labels "
                "file of 0-based indices / WordNet ids (e.g. LOC_val_solution.csv)"
            )
        if kind == "per-line":
            bad = [v for v in labels if not 0 <= v < 1000]  # type: ignore[union-attr]
            if bad:
                raise UserError(
                    f"labels file {labels_path}: values must be 0-based class indices 0..999, found {bad[0]}"
                )
    elif kind == "per-line":
        raise UserError(
            f"labels file {labels_path} has one value per line, which only works for ImageNet validation images "
            "(ILSVRC2012_val_NNNNNNNN.JPEG); for other images give 'file<TAB>class' rows"
        )

    scheme = "imagenet" if layout == "imagenet-val" else "labels-file"
    used: set[str] = set()
    for rel in images:
        if kind == "per-line":
            n = _val_number(rel)
            label = labels[n - 1] if n is not None and 1 <= n <= len(labels) else None  # type: ignore[index]
        else:
            base = os.path.basename(rel)
            stem = os.path.splitext(base)[0]
            name = next((k for k in (rel, base, stem) if k in labels), None)
            label = labels[name] if name is not None else None  # type: ignore[call-overload]
            used.add(name or "")
            bad = next((labels.out_of_range[k] for k in (rel, base, stem) if k in labels.out_of_range), None)  # type: ignore[union-attr]
            if label is None and bad:
                skipped.append({"file": rel, "reason": bad})
                continue
        if label is None:
            label = -1
            notes.append(
                {"file": rel, "kind": "unlabeled", "note": f"no entry in {os.path.basename(labels_path)}: cls -1"}
            )
        found = next(
            (boxes[k] for k in (rel, os.path.basename(rel), os.path.splitext(os.path.basename(rel))[0]) if k in boxes),
            None,
        )
        items.append(_Item(rel, str(src / rel), label, boxes=found))
    if scheme == "imagenet":
        class_names = list(imagenet_classes())
    unmatched = (
        [] if kind == "per-line" else [{"line": ln, "file": k} for k, ln in labels.lines.items() if k not in used]
    )  # type: ignore[union-attr]
    return _Plan(layout, items, skipped, notes, scheme, class_names, sorted(unmatched, key=lambda u: u["line"]))


def _assign_keys(items: list[_Item]) -> None:
    """Keys from file stems (safe characters, no dots); the relative path where stems clash."""
    stems = [_UNSAFE_KEY.sub("_", os.path.splitext(os.path.basename(it.rel))[0]) for it in items]
    counts = Counter(stems)
    seen: set[str] = set()
    for it, stem in zip(items, stems):
        key = stem if counts[stem] == 1 else _UNSAFE_KEY.sub("_", os.path.splitext(it.rel)[0])
        key = key or "img"
        base, n = key, 1
        while key in seen:
            n += 1
            key = f"{base}-{n}"
        seen.add(key)
        it.key = key


# --------------------------------------------------------------------------- inspection


class _Skip(Exception):
    pass


def _readable(exn: BaseException) -> str:
    """An exception's message without object reprs such as ``<_io.BytesIO object at 0x...>``."""
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-f]+>", "", str(exn)).strip() or type(exn).__name__


def _inspect(item: _Item) -> tuple[bytes, str, dict, list[tuple[str, str]]]:
    """(original bytes, sample extension, json meta, notes); raises _Skip(reason)."""
    ext_in = os.path.splitext(item.rel)[1]
    if ext_in.lower() not in IMAGE_EXTS:
        raise _Skip(f"unknown extension: {ext_in or '(none)'}")
    try:
        with open(item.path, "rb") as f:
            data = f.read()
    except OSError as exn:
        raise _Skip(f"unreadable file: {exn}") from None
    if not data:
        raise _Skip("zero-byte file")
    notes: list[tuple[str, str]] = []
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode, (w, h) = im.format, im.mode, im.size
        rawmode = str(im.tile[0][3]) if im.tile else ""
        if fmt == "JPEG":
            # DCT-domain 1/8 decode still consumes every byte, so truncation is still
            # caught, at a fraction of the cost of a full decode.
            im.draft(None, (max(1, w // 8), max(1, h // 8)))
        im.load()
    except Image.DecompressionBombError as exn:
        raise _Skip(f"too large to decode safely: {exn}") from None
    except UnidentifiedImageError:  # its message names the BytesIO object, not the file
        raise _Skip("corrupt or truncated image: not a recognised image format") from None
    except Exception as exn:
        raise _Skip(f"corrupt or truncated image: {_readable(exn)}") from None
    ext = FORMAT_EXTS.get(fmt or "")
    if ext is None:
        raise _Skip(f"unsupported image format: {fmt} content in a {ext_in} file")
    if IMAGE_EXTS[ext_in.lower()] != ext:
        notes.append(("format", f"{ext_in} file holds {fmt} data: stored as .{ext}"))
    if mode != "RGB":
        notes.append(("mode", f"mode {mode}: packed as is, decoded to RGB"))
    elif "16" in rawmode:
        notes.append(("mode", f"16-bit {rawmode}: packed as is, decoded to 8-bit RGB"))
    if min(w, h) < CROP:
        notes.append(("small", f"{w}x{h} is smaller than the {CROP} crop: packed, upsampled by the resize"))
    meta = {"file": item.rel, "width": w, "height": h, "mode": mode, "format": fmt, "label": item.label}
    if item.boxes is not None:
        meta["boxes"] = item.boxes
    return data, ext, meta, notes


def _write_json(fs: fsspec.AbstractFileSystem, base: str, name: str, obj: Any) -> None:
    """Atomic JSON write through the filesystem object already in hand (a fresh s3fs
    instance costs a new HTTP session)."""
    if is_local(fs):
        write_json_atomic(os.path.join(base, name), obj)
    else:
        fs.pipe_file(f"{base}/{name}", json.dumps(obj, indent=1, sort_keys=True).encode())  # one PUT


def pack_folder(
    src: str | os.PathLike,
    out_url: str,
    *,
    layout: str = "auto",
    labels_file: str | os.PathLike | None = None,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    prefix: str = "shard",
    storage_options: StorageOptions = None,
    progress: bool = True,
    overwrite: bool = False,
    shuffle_seed: int | None = None,
    workers: int | None = None,
    num_classes: int = 1000,
    skip_bad_labels: bool = False,
) -> PackReport:
    """Pack an image folder into ``{prefix}-{i:06d}.tar`` shards + ``index.json`` at ``out_url``.

    ``layout``: "imagefolder" (class sub-folders), "labels" (flat folder + labels file),
    "imagenet-val" (ILSVRC2012_val_* + one class index per line, or a labels file) or
    "auto". ``overwrite`` allows an output that already holds shards (stale shards of
    the same prefix are removed at the end). ``shuffle_seed`` packs in a seeded random
    order instead of sorted file order. ``workers`` threads check images (PIL releases
    the GIL while decoding); default min(8, CPUs). ``num_classes``: the classifier's classes;
    a labels file row outside 0..num_classes-1 is refused (with ``skip_bad_labels``: its
    image is skipped, with the reason in the report).
    """
    t0 = time.time()
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if samples_per_shard < 1 or max_shard_bytes < 1:
        raise UserError("samples per shard and max shard bytes must be positive")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise UserError(f"shard prefix {prefix!r} may only use letters, digits, '_' and '-'")
    if "://" in str(src):
        raise UserError(f"{src}: the source must be a local folder")
    src_path = Path(src).resolve()
    if not src_path.is_dir():
        raise UserError(f"source folder {src} does not exist or is not a folder")

    fs, base = get_fs(out_url, storage_options)
    base = base.rstrip("/")
    exclude = Path(base).resolve() if is_local(fs) else None
    plan = _plan(src_path, layout, str(labels_file) if labels_file else None, exclude, num_classes, skip_bad_labels)
    _assign_keys(plan.items)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(plan.items)

    if is_local(fs):
        os.makedirs(base, exist_ok=True)
    old = sorted(fs.glob(f"{base}/{prefix}-*.tar")) if fs.exists(base) else []
    if (old or fs.exists(f"{base}/{INDEX_NAME}")) and not overwrite:
        raise UserError(
            f"{out_url} already holds shards or an {INDEX_NAME}; choose an empty folder or pass --overwrite"
        )
    if overwrite and fs.exists(f"{base}/{INDEX_NAME}"):
        fs.rm_file(f"{base}/{INDEX_NAME}")  # readers must not pair the old index with new shards

    skipped, notes, entries = list(plan.skipped), list(plan.notes), []
    writer = ShardWriter(fs, base, prefix)
    bar = Progress(len(plan.items), progress, what="pack", unit="img", every=10.0)
    packed = boxed = n_boxes = 0
    n_workers = workers or min(8, os.cpu_count() or 1)
    try:
        with concurrent.futures.ThreadPoolExecutor(n_workers) as pool:
            chunk = 64 * n_workers  # bounded read-ahead: never all file contents in memory
            for start in range(0, len(plan.items), chunk):
                batch = plan.items[start : start + chunk]
                futures = [pool.submit(_inspect, it) for it in batch]
                for it, fut in zip(batch, futures):
                    try:
                        data, ext, meta, item_notes = fut.result()
                    except _Skip as why:
                        skipped.append({"file": it.rel, "reason": str(why)})
                        bar.update(1)
                        continue
                    notes += [{"file": it.rel, "key": it.key, "kind": k, "note": n} for k, n in item_notes]
                    # Image last: a tar cut between members then loses the image, which
                    # read_shard reports, rather than a label that would silently become -1.
                    members = [
                        ("cls", str(it.label).encode()),
                        ("json", json.dumps(meta, sort_keys=True).encode()),
                        (ext, data),
                    ]
                    done = writer.add(it.key, members, samples_per_shard, max_shard_bytes, boxed="boxes" in meta)
                    boxed += "boxes" in meta
                    n_boxes += len(meta.get("boxes", ()))
                    if done:
                        entries.append(done)
                        bar.update(0, postfix=f"{len(entries)} shards")
                    packed += 1
                    bar.update(1)
        done = writer.finish()
        if done:
            entries.append(done)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if not writer.local:
            shutil.rmtree(writer.tmpdir, ignore_errors=True)

    if overwrite:
        names = {e["name"] for e in entries}
        for path in old:
            if path.rsplit("/", 1)[-1] not in names:
                fs.rm_file(path)

    report = PackReport(
        packed=packed,
        skipped=skipped,
        notes=notes,
        shards=entries,
        seconds=round(time.time() - t0, 3),
        layout=plan.layout,
        out_url=out_url,
        labels_scheme=plan.labels_scheme,
        labels_unmatched=plan.unmatched,
        boxed=boxed,
    )
    _write_json(fs, base, REPORT_NAME, report.to_dict())
    index = {
        "format": INDEX_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "layout": plan.layout,
        "samples": packed,
        # folders: 0..N-1 by folder name, not the classifier's classes (readers warn on --target label)
        "labels": {
            "scheme": plan.labels_scheme,
            "names": plan.class_names,
            "classifier_classes": plan.labels_scheme != "folders",
        },
        "shards": entries,
    }
    if boxed:  # per-sample boxes in each json member; readers map them to the model's input grid
        index["boxes"] = {"samples": boxed, "boxes": n_boxes, "grid": "original image pixels, x0 y0 x1 y1 inclusive"}
    _write_json(fs, base, INDEX_NAME, index)  # last: the commit point
    return report
