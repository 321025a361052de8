"""Bulk CAMs: a trained L-CAM over a whole dataset, into a Zarr v3 CAM store.

Two sources, one store format:

* a **feature cache** (:mod:`pipeline.cache`): no image is read; per chunk of cached F
  one small matrix product (``attention.selected_many``) and, where the stored top-5
  cannot answer, the head for the clean logits. In this process (``where`` local), or
  (``where`` ray, the default on a cluster: :mod:`pipeline.placement`) on model actors
  that ask for a GPU each when the cluster has them: each actor reads, explains and
  writes whole source shards (one writer per group), the driver only commits the
  manifest entries they return.
* **WebDataset shards**: the extraction's write path (``raykit.run_shard_stage``): read
  and decode/preprocess on CPU tasks, then actors with the backbone and the attention
  (one GPU per actor when the cluster has GPUs) that each take a whole shard and write
  its group; the driver records manifest entries only. No cache needed.

Layout at URL (local path, s3://, gs://, any fsspec URL), mirroring the feature cache::

    zarr.json        root group; attrs {"format", "identity", "fingerprint", "checkpoint_url", "source_url"}
    manifest.json    written by the driver only, atomically (which source shards are done)
    shards/<id>/     one group per source shard (same <id> as the feature cache), ONE writer;
                     attrs {"source", "keys", "count"}: keys in source order
        class_ids      (n, T) int32    the explained classes
        probs          (n, T) float32  their softmax probabilities on the clean image
        raw            (n, T, h, w) float16   Z[b, t] before the sigmoid (maps = minmax(raw))
        upsampled      (n, T, H, W) uint8     round(255 * up(minmax(raw))), only with upsample
        labels         (n,) int32, -1 = no label
        predicted      (n,) int32;  predicted_prob (n,) float32   (the classifier's top-1)
        coverage       (n, T) int32    training samples of each explained class row (the checkpoint's
                                       coverage; 0 = an untrained row), when the checkpoint records it
    gallery/         overlays and index.html, when asked (pipeline.gallery)

The fingerprint covers the checkpoint's weights, the source's features (the cache's
fingerprint, or the backbone and preprocessing for images), the class selection and
the stored arrays: a re-run with the same settings resumes (done shards are skipped),
one with other settings is refused rather than mixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import zarr

from lcam import LCAM, Explanation, Preprocessing
from lcam.explain import choose_targets, explain_from_features, minmax_normalize, upsampled_uint8

from .cache import (
    ShardedStore,
    canonical,
    connect_fs,
    make_zarr_store,
    new_manifest as new_store_manifest,
    utc_now,
    read_json_fs,
    fingerprint_of,
    identity_diff,
    shard_id_for,
)
from .errors import UserError
from .device import autocast_dtype, resolve_device
from .progress import Progress
from .raykit import ShardWorker, pin_torch_threads
from .extract import pad_lone_image
from .fs import StorageOptions, join

FORMAT = "lcam-cam-store/1"
MODES = ("predicted", "label", "top-k", "ids")
SMALL_CHUNK_ROWS = 1024  # class ids, probs, raw maps: ~100 bytes a row
UPSAMPLED_CHUNK_BYTES = 4 << 20  # uint8 maps at 224 x 224: ~80 rows a chunk


class CamStoreMismatch(UserError):
    """A CAM store exists at the URL but for another checkpoint, source or class selection."""


class CamStoreNotFound(UserError):
    """No CAM store at the URL."""


# ---------------------------------------------------------------- which classes
@dataclass(frozen=True)
class ClassSelection:
    """Which classes to explain per sample: ``predicted`` (top-1), ``label`` (ground truth),
    ``top-k`` (the k most probable) or ``ids`` (the same list of class ids for every sample);
    or ``combined``: several of those side by side (``--classes predicted,label``,
    ``top5,label``), ``parts`` in the order given, ``k`` the total columns.

    A combination de-duplicates nothing: a sample whose label equals its prediction stores
    that class (and its map) in both columns, so column t always means the same thing. In a
    combination, a sample without a label is kept (its other columns are useful) and its
    label column holds class id -1, probability 0 and an all-zero raw map.
    """

    mode: str = "predicted"
    k: int = 1
    ids: tuple[int, ...] = ()
    parts: tuple["ClassSelection", ...] = ()

    @classmethod
    def parse(cls, classes: str | None = None, top_k: int | None = None, class_ids: str | Sequence[int] | None = None) -> "ClassSelection":
        """From command-line style settings; ``classes`` is inferred from ``top_k``/``class_ids`` when absent."""
        if isinstance(class_ids, str):
            try:
                class_ids = [int(c) for c in class_ids.replace(" ", "").split(",") if c]
            except ValueError:
                raise UserError(f"class ids {class_ids!r} must be integers separated by commas, e.g. 281,285") from None
        if classes and "," in classes:
            return cls._combined(classes, top_k, class_ids)
        mode = classes or ("ids" if class_ids else "top-k" if top_k is not None else "predicted")
        short = re.fullmatch(r"top-?(\d+)", mode)
        if short:  # top5 = top-k with k 5
            if top_k is not None and top_k != int(short.group(1)):
                raise UserError(f"classes {mode!r} and top-k {top_k} disagree; give one of them")
            mode, top_k = "top-k", int(short.group(1))
        if mode not in MODES:
            raise UserError(f"unknown class selection {mode!r}; choose from {', '.join(MODES)}, top5 (any k), or a combination such as predicted,label")
        if mode == "ids":
            if not class_ids:
                raise UserError("classes 'ids' needs the class ids (e.g. --class-ids 281,285)")
            if top_k is not None:
                raise UserError("give either class ids or top-k, not both")
            return cls("ids", len(class_ids), tuple(int(c) for c in class_ids))
        if class_ids:
            raise UserError(f"class ids were given but the class selection is {mode!r}; use classes 'ids'")
        if mode == "top-k":
            k = 5 if top_k is None else int(top_k)
            if k < 1:
                raise UserError(f"top-k must be at least 1, got {k}")
            return cls("top-k", k)
        if top_k is not None and top_k != 1:
            raise UserError(f"top-k {top_k} was given but the class selection is {mode!r}; use classes 'top-k'")
        return cls(mode, 1)

    @classmethod
    def _combined(cls, classes: str, top_k: int | None, class_ids: Sequence[int] | None) -> "ClassSelection":
        names = [c.strip() for c in classes.split(",") if c.strip()]
        parts = []
        for name in names:  # --top-k goes to a 'top-k' part, --class-ids to an 'ids' part
            parts.append(cls.parse(name, top_k if name == "top-k" else None, class_ids if name == "ids" else None))
        if top_k is not None and not any(p.mode == "top-k" and n == "top-k" for p, n in zip(parts, names)):
            raise UserError(f"top-k {top_k} was given but the classes {classes!r} have no 'top-k' part; write e.g. top5,label")
        if class_ids and not any(p.mode == "ids" for p in parts):
            raise UserError(f"class ids were given but the classes {classes!r} have no 'ids' part; write e.g. predicted,ids")
        kinds = [p.mode for p in parts]
        dup = sorted({m for m in kinds if kinds.count(m) > 1})
        if dup:
            raise UserError(f"classes {classes!r} name {dup[0]!r} twice; give each kind once")
        if "predicted" in kinds and "top-k" in kinds:
            raise UserError(f"classes {classes!r}: top-k already starts with the predicted class; drop 'predicted'")
        return cls("combined", sum(p.width for p in parts), (), tuple(parts))

    @property
    def width(self) -> int:
        """T: classes explained per sample."""
        return self.k

    @property
    def needs_label(self) -> bool:
        """Whether a column holds the ground-truth label."""
        return self.mode == "label" or any(p.mode == "label" for p in self.parts)

    def columns(self) -> list[str]:
        """What each of the T columns holds: predicted, top-2, ..., label, id:281."""
        out: list[str] = []
        for p in self.parts or (self,):
            if p.mode == "top-k":
                out += ["predicted"] + [f"top-{i + 1}" for i in range(1, p.k)]
            elif p.mode == "ids":
                out += [f"id:{c}" for c in p.ids]
            else:
                out.append(p.mode)
        return out

    def validate(self, num_classes: int) -> None:
        for p in self.parts:
            p.validate(num_classes)
        if self.mode == "top-k" and not 1 <= self.k <= num_classes:
            raise UserError(f"top-k {self.k} must be between 1 and the number of classes ({num_classes})")
        bad = [c for c in self.ids if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"class id {bad[0]} is out of range: the classifier has {num_classes} classes (0..{num_classes - 1})")
        if len(set(self.ids)) != len(self.ids):
            raise UserError(f"class ids {list(self.ids)} repeat an id; give each class once")

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "k": self.k, "ids": list(self.ids)}
        if self.parts:  # only combinations carry it: single selections keep their old fingerprint
            out["parts"] = [p.identity() for p in self.parts]
            out["columns"] = self.columns()
        return out


def checkpoint_fingerprint(checkpoint: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex) of the method, the backbone's weights digest and the attention weights.

    Where the file lives does not matter: a copy of the checkpoint has the same fingerprint.
    """
    h = hashlib.sha256()
    h.update(str(checkpoint.get("method")).encode())
    h.update(str(checkpoint["backbone"].get("weights_digest")).encode())
    for name, value in sorted(checkpoint["attention"].items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the Python API
class Explainer:
    """A trained L-CAM, loaded once, called on image tensors.

    >>> explain = Explainer.from_checkpoint("s3://bucket/run/checkpoint.pt", device="cuda")
    >>> e = explain(images)                    # (B, 3, H, W) in [0, 1], any device
    >>> e.class_ids, e.probs, e.maps           # tensors on the model's device
    >>> explain(image, targets=281, upsample=True).upsampled   # one (3, H, W) image

    Results stay on the model's device (nothing is copied to the CPU); a single
    (3, H, W) image gives a batch of one.
    """

    def __init__(self, model: LCAM, checkpoint: Mapping[str, Any] | None = None, autocast: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.checkpoint = dict(checkpoint or {})
        self.autocast = autocast

    @classmethod
    def from_checkpoint(
        cls,
        url: str,
        *,
        device: str | torch.device = "auto",
        weights: str | None = None,
        storage_options: StorageOptions = None,
        precision: str = "fp32",
    ) -> "Explainer":
        """Load an L-CAM-Fm or L-CAM-Img checkpoint (they explain the same way).

        ``device``: "auto" picks CUDA when present. ``weights`` overrides where the
        backbone's weights come from (the digest must still match). ``precision``:
        fp32 (default), or fp16/bf16/auto autocast for the backbone on a GPU.
        """
        from .checkpoints import load_lcam
        dev = resolve_device(device)
        model, ckpt = load_lcam(url, storage_options, weights=weights, device=dev)
        return cls(model, ckpt, autocast_dtype(precision, dev))

    @property
    def device(self) -> torch.device:
        return next(self.model.attention.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.model.backbone.num_classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.backbone.preprocessing

    @property
    def fingerprint(self) -> str:
        return checkpoint_fingerprint({"method": self.checkpoint.get("method"), "backbone": self.model.backbone.describe(), "attention": self.model.attention.state_dict()})

    def preprocess(self, image: bytes | np.ndarray | Any) -> torch.Tensor:
        """Encoded bytes, an RGB array or a PIL image -> (3, crop, crop) in [0, 1] on the model's device."""
        from .images import decode_image, preprocess

        rgb = decode_image(image) if isinstance(image, (bytes, bytearray)) else image
        return preprocess(rgb, self.preprocessing).to(self.device)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch tensor (B, 3, H, W) or (3, H, W) in [0, 1], got {type(images).__name__}")
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            return images.float().div_(255.0)
        lo, hi = torch.aminmax(images)
        if float(lo) < -1e-3 or float(hi) > 1.0 + 1e-3:  # normalised or 0..255 input gives nonsense maps
            raise ValueError(f"images must be in pixel space [0, 1] (got values in [{float(lo):.3g}, {float(hi):.3g}]); the backbone normalises inside")
        return images.float()

    def __call__(
        self,
        images: torch.Tensor,
        targets: int | Sequence[int] | torch.Tensor | None = None,
        top_k: int | None = None,
        upsample: bool = False,
        all_classes: bool = False,
    ) -> Explanation:
        """CAMs from one forward pass: the predicted class, or ``targets`` (one id per
        image, or (B, T) ids), or the ``top_k`` classes; ``upsample`` adds maps at the input size."""
        images = self._images(images)
        if isinstance(targets, int):
            targets = [targets]
        if targets is not None and not isinstance(targets, torch.Tensor):
            targets = torch.as_tensor(targets)
        if isinstance(targets, torch.Tensor):
            targets = targets.to(self.device)
        with torch.inference_mode(), self.autocast_context():
            feats, logits = self.model.backbone.extract(images)
        size = tuple(images.shape[-2:]) if upsample else None
        with torch.inference_mode():  # maps in fp32 whatever the backbone ran in: the product is tiny
            return explain_from_features(self.model.attention, feats.float(), logits.float(), targets, top_k, size, all_classes)

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """Autocast for the backbone's forward when a reduced precision was asked for."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def explain_features(
        self,
        feats: torch.Tensor,
        targets: int | Sequence[int] | torch.Tensor | None = None,
        top_k: int | None = None,
        upsample: bool = False,
    ) -> Explanation:
        """From feature maps F (B, C, h, w), e.g. read from a feature cache: no image needed."""
        if feats.dim() == 3:
            feats = feats.unsqueeze(0)
        if isinstance(targets, int):
            targets = [targets]
        size = self.preprocessing.crop if upsample else None
        return self.model.explain_features(feats.to(self.device).float(), targets, top_k, size)


# ---------------------------------------------------------------- maps for a batch of rows
def explain_rows(
    model: LCAM,
    feats: torch.Tensor,
    selection: ClassSelection,
    *,
    logits: torch.Tensor | None = None,
    labels: np.ndarray | None = None,
    top5: np.ndarray | None = None,
    top5_probs: np.ndarray | None = None,
    upsample_to: int | None = None,
) -> dict[str, np.ndarray]:
    """The store's columns for a batch of F (B, C, h, w): class ids, probs, raw maps, ...

    With the stored top-5 (a cache) and ``predicted``/``top-k`` up to 5, the classes and
    probabilities are the extraction's own (from float32 features), so they agree with
    explaining the images; otherwise the clean logits (given, or ``head(F)``) decide.
    """
    b = feats.shape[0]
    dev = feats.device
    parts = selection.parts or (selection,)
    ranked_k = max((p.k for p in parts if p.mode in ("predicted", "top-k")), default=0)
    all_probs: list[torch.Tensor] = []

    def softmax() -> torch.Tensor:  # the clean probabilities of every class, computed once when needed
        if not all_probs:
            all_probs.append((logits if logits is not None else model.backbone.head(feats)).float().softmax(1))
        return all_probs[0]

    if ranked_k and top5 is not None and ranked_k <= top5.shape[1]:
        ranked_ids = torch.from_numpy(np.ascontiguousarray(top5[:, :ranked_k], dtype=np.int64)).to(dev)
        ranked_probs = torch.from_numpy(np.ascontiguousarray(top5_probs[:, :ranked_k], dtype=np.float32)).to(dev)
        predicted, predicted_prob = top5[:, 0].astype(np.int32), top5_probs[:, 0].astype(np.float32)
    else:
        if logits is None:
            logits = model.backbone.head(feats)
        p = softmax()
        ranked_ids = choose_targets(logits, None, ranked_k) if ranked_k else None
        ranked_probs = p.gather(1, ranked_ids) if ranked_k else None
        top_p, top_c = p.max(1)
        predicted, predicted_prob = top_c.cpu().numpy().astype(np.int32), top_p.cpu().numpy().astype(np.float32)
    ids_cols: list[torch.Tensor] = []
    prob_cols: list[torch.Tensor] = []
    for part in parts:
        if part.mode in ("predicted", "top-k"):
            ids_cols.append(ranked_ids[:, : part.k])
            prob_cols.append(ranked_probs[:, : part.k])
        elif part.mode == "label":  # -1 (no label) stays -1: probability 0, map zeroed below
            lab = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(dev)[:, None]
            known = lab >= 0
            ids_cols.append(torch.where(known, lab, -1))
            prob_cols.append(softmax().gather(1, lab.clamp_min(0)) * known)
        else:
            fixed = torch.tensor(part.ids, device=dev).expand(b, len(part.ids))
            ids_cols.append(fixed)
            prob_cols.append(softmax().gather(1, fixed))
    class_ids = torch.cat(ids_cols, 1)
    probs = torch.cat(prob_cols, 1).float().cpu().numpy()
    raw = model.attention.selected_many(feats.float(), class_ids.clamp_min(0)).float()
    raw = raw * (class_ids >= 0)[:, :, None, None]  # a missing label's column: an all-zero map
    out = {
        "class_ids": class_ids.cpu().numpy().astype(np.int32),
        "probs": probs,
        "raw": raw.cpu().numpy().astype(np.float16),
        "predicted": predicted,
        "predicted_prob": predicted_prob,
    }
    if upsample_to:
        out["upsampled"] = upsampled_uint8(raw, upsample_to).cpu().numpy()
    return out


# ---------------------------------------------------------------- the store
class CamStore(ShardedStore):
    """One CAM store: the feature cache's layout and manifest (:class:`ShardedStore`), maps inside."""

    FORMAT = FORMAT
    KIND = "CAM store"
    DIMENSIONS = {
        "labels": ("sample",), "predicted": ("sample",), "predicted_prob": ("sample",), "coverage": ("sample",),
        "class_ids": ("sample", "target"), "probs": ("sample", "target"),
        "raw": ("sample", "target", "y", "x"), "upsampled": ("sample", "target", "Y", "X"),
    }

    def __init__(self, url: str, root_attrs: Mapping[str, Any], manifest: Mapping[str, Any], storage_options: StorageOptions = None, writable: bool = False) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.root_attrs = dict(root_attrs)
        self.identity: dict[str, Any] = dict(root_attrs["identity"])
        self.fingerprint: str = root_attrs["fingerprint"]
        layout = self.identity["maps"]
        self.width: int = int(layout["classes_per_sample"])
        self.map_size: tuple[int, int] = tuple(layout["map_size"])
        self.upsampled_size: int | None = layout.get("upsampled_size")
        # per class row, the samples that trained it (the checkpoint's); None: not recorded
        cov = root_attrs.get("class_coverage")
        self.class_coverage: np.ndarray | None = np.asarray(cov, dtype=np.int32) if cov is not None else None
        self.writable = writable
        self._manifest: dict[str, Any] = dict(manifest)
        self._init_handles()

    @classmethod
    def create_or_open(
        cls,
        url: str,
        identity: Mapping[str, Any],
        *,
        checkpoint_url: str = "",
        source_url: str = "",
        storage_options: StorageOptions = None,
        class_coverage: Sequence[int] | None = None,
    ) -> "CamStore":
        """Open for writing, creating if absent (driver only); another identity is refused.
        ``class_coverage``: the checkpoint's coverage per class row (kept in the root attrs)."""
        full = canonical(dict(identity))
        fp = fingerprint_of(full)
        url = url.rstrip("/")
        fs, root = connect_fs(url, storage_options)
        attrs = _read_store_attrs(fs, root, url)
        if attrs is not None:
            if attrs.get("fingerprint") != fp:
                diff = [d.replace(": cache has ", ": store has ", 1) for d in identity_diff(attrs.get("identity", {}), full)]
                raise CamStoreMismatch(
                    f"a CAM store already exists at {url} for other settings (fingerprint {attrs.get('fingerprint')}, requested {fp}). "
                    "Differing fields:\n  " + "\n  ".join(diff or ["(identities equal; fingerprint recipe changed)"])
                    + f"\nWrite these CAMs to another URL, or delete {url} to rebuild it."
                )
            manifest = read_json_fs(fs, f"{root}/manifest.json") or _new_manifest(fp)
            store = cls(url, attrs, manifest, storage_options, writable=True)
            store._fs_path = (fs, root)
            return store
        if fs.exists(root) and fs.ls(root):
            raise UserError(f"{url} exists and holds files but no CAM store (no zarr.json); pick an empty or new location")
        attrs = {"format": FORMAT, "identity": full, "fingerprint": fp, "checkpoint_url": checkpoint_url, "source_url": source_url}
        if class_coverage is not None:
            attrs["class_coverage"] = [int(c) for c in class_coverage]
        zstore = make_zarr_store(url, storage_options, read_only=False)
        zarr.open_group(zstore, mode="w", attributes=attrs)
        zarr.open_group(zstore, path="shards", mode="w")
        store = cls(url, attrs, _new_manifest(fp), storage_options, writable=True)
        store._fs_path = (fs, root)
        store._save_manifest(store.manifest)
        return store

    @classmethod
    def open(cls, url: str, storage_options: StorageOptions = None, writable: bool = False) -> "CamStore":
        """Open read-only; ``writable`` for manifest edits (``lcam cache repair``)."""
        url = url.rstrip("/")
        fs, root = connect_fs(url, storage_options)
        attrs = _read_store_attrs(fs, root, url)
        if attrs is None:
            raise CamStoreNotFound(f"no CAM store at {url} (no zarr.json with format {FORMAT}); make one with `lcam cams CHECKPOINT {url} --cache ...|--shards ...`")
        manifest = read_json_fs(fs, f"{root}/manifest.json") or _new_manifest(attrs["fingerprint"])
        store = cls(url, attrs, manifest, storage_options, writable=writable)
        store._fs_path = (fs, root)
        return store

    # ---- writing (one task per source shard)
    def write_shard(self, source_url: str, rows: Mapping[str, Any]) -> dict[str, Any]:
        """Write all rows of one source shard into its own group, replacing what was there.

        ``rows``: ``key`` (n,), ``label`` (n,), ``class_ids`` (n, T), ``probs`` (n, T),
        ``raw`` (n, T, h, w), ``predicted``/``predicted_prob`` (n,), and ``upsampled``
        (n, T, H, W) when the store keeps them. Data first, group attrs last, so a group
        with ``keys`` is complete. Returns the manifest entry for :meth:`mark_done`.
        """
        if not self.writable:
            raise PermissionError("CAM store opened read-only; use CamStore.create_or_open to write")
        t0 = time.perf_counter()
        keys = [str(k) for k in rows["key"]]
        n, t, (h, w) = len(keys), self.width, self.map_size
        if len(set(keys)) != n:
            dup = [k for k, c in Counter(keys).items() if c > 1][:5]
            raise ValueError(f"duplicate keys within shard {source_url}: {dup}")
        spec: dict[str, tuple[tuple[int, ...], Any, Any, int]] = {  # name -> (shape, dtype, fill, chunk rows)
            "labels": ((n,), np.int32, -1, SMALL_CHUNK_ROWS),
            "class_ids": ((n, t), np.int32, -1, SMALL_CHUNK_ROWS),
            "probs": ((n, t), np.float32, 0.0, SMALL_CHUNK_ROWS),
            "raw": ((n, t, h, w), np.float16, 0.0, SMALL_CHUNK_ROWS),
            "predicted": ((n,), np.int32, -1, SMALL_CHUNK_ROWS),
            "predicted_prob": ((n,), np.float32, 0.0, SMALL_CHUNK_ROWS),
        }
        if self.upsampled_size:
            s = self.upsampled_size
            spec["upsampled"] = ((n, t, s, s), np.uint8, 0, max(1, UPSAMPLED_CHUNK_BYTES // (t * s * s)))
        source_names = {"labels": "label"}
        arrays: dict[str, tuple[np.ndarray, Any, int]] = {}
        for name, (shape, dtype, fill, chunk) in spec.items():
            data = rows[source_names.get(name, name)] if n else np.zeros(shape, dtype)
            data = np.ascontiguousarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data, dtype=dtype)
            if data.shape != shape:
                raise ValueError(f"{name} of {source_url} has shape {data.shape}, expected {shape}")
            arrays[name] = (data, fill, chunk)
        if self.class_coverage is not None:
            ids = arrays["class_ids"][0]
            cov = np.where(ids >= 0, self.class_coverage[np.clip(ids, 0, len(self.class_coverage) - 1)], -1).astype(np.int32)
            arrays["coverage"] = (cov, -1, SMALL_CHUNK_ROWS)
        if not np.isfinite(arrays["raw"][0]).all():
            raise UserError(f"raw maps of {source_url} overflow float16 (|Z| > 65504): the checkpoint's attention weights are far out of range; check the checkpoint")
        sid = shard_id_for(source_url)
        self.write_group(sid, arrays, {"source": source_url, "keys": keys, "count": n})
        return {"url": source_url, "shard_id": sid, "count": n, "skipped": [], "seconds": round(time.perf_counter() - t0, 3), "finished_at": utc_now()}

    # ---- reading
    def entries(self) -> list[dict[str, Any]]:
        """Done shards in deterministic order: sorted by source URL (as the feature cache)."""
        return self._index()[0]

    def __len__(self) -> int:
        return sum(int(e["count"]) for e in self.entries())

    def _entry(self, shard: str) -> dict[str, Any]:
        for e in self.entries():
            if shard in (e["shard_id"], e["url"]):
                return e
        raise KeyError(f"shard {shard!r} is not in the manifest of {self.url}")

    def read_shard(self, shard: str, fields: Sequence[str] | None = None, normalized: bool = True) -> dict[str, Any]:
        """All rows of one shard (by shard id or source URL): ``keys`` and numpy arrays.

        ``fields`` limits the arrays read; with ``normalized`` a ``maps`` field (min-max
        normalised raw maps, float32) is added whenever ``raw`` is read.
        """
        e = self._entry(shard)
        names = list(fields) if fields is not None else [n for n in ("labels", "class_ids", "probs", "raw", "upsampled", "predicted", "predicted_prob") if n != "upsampled" or self.upsampled_size]
        names = [n for n in names if n != "maps"]
        if fields is None and self.class_coverage is not None:
            names.append("coverage")
        # checked whole first: a lost chunk object would otherwise read as fill values (zeros)
        _, checked = self.open_checked_group(e, names)
        out: dict[str, Any] = {"keys": list(checked["attrs"]["keys"])}
        for name in names:
            out[name] = self.read_array(e, name, checked["arrays"][name], slice(0, int(e["count"])))
        if normalized and "raw" in out:
            out["maps"] = minmax_normalize(torch.from_numpy(out["raw"].astype(np.float32))).numpy()
        return out

    def repair_hint(self, source_url: str) -> str:
        return f"`lcam cache repair {self.url}` (forgets damaged shards), then re-run the `lcam cams` that made this store"

    def check_shard(self, entry: Mapping[str, Any]) -> None:
        self.read_shard(entry["shard_id"], normalized=False)

    def iter_shards(self, fields: Sequence[str] | None = None) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(manifest entry, :meth:`read_shard` data) for every done shard, in store order."""
        for e in self.entries():
            yield e, self.read_shard(e["shard_id"], fields)

    def keys(self) -> list[str]:
        """All keys in store order (source shards sorted by URL, rows in source order)."""
        out: list[str] = []
        for e in self.entries():
            out += self.read_shard(e["shard_id"], fields=[])["keys"]
        return out

    def info(self) -> dict[str, Any]:
        entries = self.entries()
        fs, path = self._fs()
        ident = self.identity
        return {
            "url": self.url,
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "checkpoint": {**ident["checkpoint"], "url": self.root_attrs.get("checkpoint_url", "")},
            "source": {**ident["source"], "url": self.root_attrs.get("source_url", "")},
            "classes": ident["classes"],
            "classes_per_sample": self.width,
            "map_size": list(self.map_size),
            "upsampled_size": self.upsampled_size,
            "samples": sum(int(e["count"]) for e in entries),
            "shards_done": len(entries),
            "skipped": sum(len(e.get("skipped", [])) for e in entries),
            "bytes_on_disk": int(fs.du(path, total=True)) if fs.exists(path) else 0,
            "gallery": join(self.url, "gallery", "index.html") if fs.exists(f"{path}/gallery/index.html") else None,
            "class_rows_trained": None if self.class_coverage is None else int((self.class_coverage > 0).sum()),
            "versions": self._manifest.get("versions", {}),
            "created": self._manifest.get("created"),
            "updated": self._manifest.get("updated"),
        }


def _read_store_attrs(fs: Any, root: str, url: str) -> dict[str, Any] | None:
    meta = read_json_fs(fs, f"{root}/zarr.json")
    if meta is None:
        return None
    attrs = meta.get("attributes", {})
    if attrs.get("format") != FORMAT:
        raise UserError(f"{url} is a Zarr store but not a CAM store (format {attrs.get('format')!r}, expected {FORMAT!r}); pick another output URL")
    return attrs


def _new_manifest(fingerprint: str) -> dict[str, Any]:
    return new_store_manifest(fingerprint, FORMAT)


# ---------------------------------------------------------------- bulk generation
from .configs import CamsConfig  # noqa: E402  re-exported: the config lives in the torch-free pipeline.configs


@dataclass
class CamsSummary:
    store: str
    fingerprint: str
    source: str
    shards_total: int
    shards_done_before: int
    shards_written: int = 0
    samples: int = 0
    maps: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed_shards: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    ray_startup_seconds: float = 0.0
    actors_ready_seconds: float = 0.0  # shard source: from the start until the first model actor was ready
    ran_on: list[str] = field(default_factory=list)  # cache source on Ray: the Ray node id of each model actor
    gallery: str | None = None

    @property
    def maps_per_second(self) -> float:
        return self.maps / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_maps_per_second(self) -> float:
        """Maps/s once a model actor was ready: the fixed start-up (Ray, processes importing
        torch, building the model) excluded, as a large dataset amortises it."""
        busy = self.seconds - self.actors_ready_seconds
        return self.maps / busy if self.actors_ready_seconds and busy > 0 else self.maps_per_second

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["maps_per_second"] = round(self.maps_per_second, 2)
        out["steady_maps_per_second"] = round(self.steady_maps_per_second, 2)
        return out

    def lines(self) -> list[str]:
        out = [
            f"CAM store {self.store} (fingerprint {self.fingerprint}) from {self.source}",
            f"shards: {self.shards_total} in the source, {self.shards_done_before} already done, {self.shards_written} written now",
            f"samples: {self.samples}, maps: {self.maps} in {self.seconds:.1f}s ({self.maps_per_second:.1f} maps/s"
            + (f"; {self.steady_maps_per_second:.1f} maps/s after the {self.actors_ready_seconds:.0f}s start-up)" if self.actors_ready_seconds else ")"),
        ]
        if self.ran_on:
            nodes = Counter(n[:12] for n in self.ran_on)
            out.append(f"model actors: {len(self.ran_on)} on Ray node(s) " + ", ".join(f"{n} (x{c})" for n, c in nodes.items()))
        if self.skipped:
            reasons = Counter(s["reason"].split(":")[0] for s in self.skipped)
            out.append(f"skipped {len(self.skipped)} samples: " + ", ".join(f"{r} x{n}" for r, n in reasons.items()))
            out += [f"  {s.get('shard', '')}/{s['key']}: {s['reason']}" for s in self.skipped[:20]]
            if len(self.skipped) > 20:
                out.append(f"  ... and {len(self.skipped) - 20} more (see the store's manifest.json)")
        for f in self.failed_shards:
            out.append(f"FAILED shard {f['url']}: {f['reason']}")
        if self.gallery:
            out.append(f"gallery: {self.gallery}")
        return out


def generate_cams(cfg: CamsConfig) -> CamsSummary:
    """Run (or resume) CAM generation; then overlays and a gallery when asked.

    All inputs are checked (checkpoint against the source's backbone, class ids, an
    empty or missing source) before anything is written at ``cfg.out``.
    """
    from .checkpoints import check_backbone, load_lcam
    from .placement import check_where, resolve_where

    if (cfg.cache is None) == (cfg.shards is None):
        raise UserError("give exactly one source: a feature cache (--cache URL) or WebDataset shards (--shards PATTERN)")
    check_where(cfg.where)
    selection = ClassSelection.parse(cfg.classes, cfg.top_k, cfg.class_ids)
    if cfg.overlays < 0:
        raise UserError(f"--overlays must be >= 0, got {cfg.overlays}")
    if not 0.0 <= cfg.opacity <= 1.0:
        raise UserError(f"--opacity must be between 0 and 1, got {cfg.opacity}")
    _check_colormap(cfg.colormap)
    on_ray = cfg.cache is not None and resolve_where(cfg.where) == "ray"
    # the driver's copy only checks the inputs when the actors or the shard source do the work
    device = resolve_device(cfg.device) if cfg.cache is not None and not on_ray else torch.device("cpu")
    model, ckpt = load_lcam(cfg.checkpoint, cfg.checkpoint_storage_options, weights=cfg.weights, device=device)
    backbone = ckpt["backbone"]
    selection.validate(int(backbone["num_classes"]))
    if cfg.class_names is not None or cfg.overlays:  # a bad names file fails now, not after the work
        from .classes import class_names_options, load_class_names

        load_class_names(cfg.class_names, class_names_options(cfg.class_names, cfg.source_storage_options), int(backbone["num_classes"]))
    crop = int(backbone["preprocessing"]["crop"])
    maps_layout = {
        "classes_per_sample": selection.width,
        "map_size": list(backbone["feature_shape"][1:]),
        "raw_dtype": "float16",
        "upsampled_size": crop if cfg.upsample else None,
        "upsampled_dtype": "uint8",
    }
    coverage = ckpt.get("coverage")
    if coverage is not None:  # only then: stores of checkpoints without it keep their fingerprint
        maps_layout["coverage"] = "int32"
    identity = {
        "checkpoint": {"fingerprint": checkpoint_fingerprint(ckpt), "method": ckpt.get("method"), "backbone": backbone},
        "classes": selection.identity(),
        "maps": maps_layout,
    }

    if cfg.cache is not None:
        from .cache import FeatureCache

        cache = FeatureCache.open(cfg.cache, cfg.source_storage_options)
        check_backbone(ckpt, cache.identity, f"the feature cache {cfg.cache}")
        if cfg.view not in cache.views:
            raise UserError(f"view {cfg.view!r} is not in the feature cache {cfg.cache} (it holds {', '.join(cache.views)}); pick one of those")
        if len(cache) == 0:
            raise UserError(f"the feature cache {cfg.cache} holds no samples (no shard is done); run `lcam extract` into it first")
        if selection.mode == "label":
            _require_labels(cache)
        identity["source"] = {"kind": "cache", "fingerprint": cache.fingerprint, "view": cfg.view}
        store = CamStore.create_or_open(cfg.out, identity, checkpoint_url=cfg.checkpoint, source_url=cfg.cache, storage_options=cfg.out_storage_options,
                                        class_coverage=None if coverage is None else coverage.tolist())
        if on_ray:
            del model  # the actors load their own
            summary = _from_cache_on_ray(cfg, cache, store, selection)
        else:
            summary = _from_cache(cfg, model, cache, store, selection)
    else:
        shards = _list_existing_shards(cfg)
        identity["source"] = {"kind": "images", "preprocessing": backbone["preprocessing"], "view": "center"}
        store = CamStore.create_or_open(cfg.out, identity, checkpoint_url=cfg.checkpoint, source_url=str(cfg.shards), storage_options=cfg.out_storage_options,
                                        class_coverage=None if coverage is None else coverage.tolist())
        del model  # the actors build their own
        summary = _from_shards(cfg, ckpt, store, selection, shards)

    if cfg.overlays:
        from .gallery import write_gallery

        result = write_gallery(
            store,
            cfg.overlays,
            out_url=cfg.gallery,
            colormap=cfg.colormap,
            opacity=cfg.opacity,
            class_names_url=cfg.class_names,
            source_storage_options=cfg.source_storage_options,
            out_storage_options=cfg.out_storage_options,
            progress=cfg.progress,
        )
        summary.gallery = result.index_url
    return summary


def _check_colormap(name: str) -> None:
    from matplotlib import colormaps

    if name not in colormaps:
        raise UserError(f"unknown colormap {name!r}; matplotlib offers e.g. jet, viridis, inferno, magma, turbo")


def _require_labels(cache: Any) -> None:
    """Classes 'label' on a dataset without any label is a mistake, not N skipped rows."""
    for sid in cache.shard_ids():
        for ci in range(cache.num_chunks(sid)):
            if (cache.read_chunk(sid, ci, fields=["labels"])["labels"] >= 0).any():
                return
    raise UserError(f"classes 'label' was asked for, but no sample of the feature cache {cache.url} has a label; use classes 'predicted', 'top-k' or 'ids'")


def _list_existing_shards(cfg: CamsConfig) -> list[Any]:
    """The source shards, with a clear error for a pattern that matches nothing or a missing shard."""
    from .fs import get_fs
    from .shards import require_shards

    shards = require_shards(cfg.shards, storage_options=cfg.source_storage_options, index_url=cfg.index)
    by_folder: dict[str, list[str]] = {}
    for s in shards:
        folder = s.url.rsplit("/", 1)[0] if "/" in s.url else "."
        by_folder.setdefault(folder, []).append(s.url)
    missing: list[str] = []
    for folder, urls in by_folder.items():  # one listing per folder, not one request per shard
        fs, path = get_fs(folder, cfg.source_storage_options)
        try:
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            names = set()
        missing += [u for u in urls if u.rsplit("/", 1)[-1] not in names]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise UserError(f"{len(missing)} of {len(shards)} shards are missing: {', '.join(missing[:10])}{more}; restore them or leave them out of the pattern")
    if sum(s.count or 0 for s in shards) == 0 and all(s.count is not None for s in shards):
        raise UserError(f"the shards {cfg.shards!r} hold no samples (their index says 0)")
    return shards


# ---- source: feature cache (no Ray, no image)
def _from_cache(cfg: CamsConfig, model: LCAM, cache: Any, store: CamStore, selection: ClassSelection) -> CamsSummary:
    entries = [cache.manifest["shards"][u] for u in sorted(cache.done_sources())]  # the cache's own order
    done = store.done_sources()
    todo = [e for e in entries if e["url"] not in done]
    summary = CamsSummary(store.url, store.fingerprint, f"feature cache {cache.url}", len(entries), len(entries) - len(todo))
    view = cache.views.index(cfg.view)
    use_top5 = view == 0  # the cache's top-5 (and logits) are those of its first view
    size = store.upsampled_size
    fields = ["features", "labels", "top5_classes", "top5_probs"] + (["logits"] if cache.store_logits and use_top5 else [])
    progress = Progress(sum(int(e["count"]) for e in todo) or None, cfg.progress, what="cams", unit="samples")
    t0 = time.perf_counter()

    chunks = [(e, ci) for e in todo for ci in range(math.ceil(int(e["count"]) / cache.chunk_rows))]
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
                writes.append(writer.submit(_write_entry, store, e["url"], rows, skipped))
            while writes and (writes[0].done() or len(writes) > 2):
                _finish_write(store, writes.popleft().result(), summary)
        while writes:
            _finish_write(store, writes.popleft().result(), summary)
    progress.close()
    summary.seconds = time.perf_counter() - t0
    return summary


class CacheCamActor:
    """The checkpoint's L-CAM in an actor: whole source shards of a feature cache -> their CAM groups.

    Each call reads one shard's chunks (the next read overlapping the current product),
    explains them as :func:`_from_cache` does (the same functions, so the same arrays) and
    writes the shard's group, replacing what was there: a call Ray re-executes after a lost
    actor rewrites the same group. It returns the manifest entry; only the driver commits it.
    """

    def __init__(self, checkpoint: str, storage_options: StorageOptions, weights: str | None, fingerprint: str, device: str, torch_threads: int | None) -> None:
        from .checkpoints import load_lcam

        dev = resolve_device(device)
        self.threads = pin_torch_threads(torch_threads, dev.type)
        self.model, ckpt = load_lcam(checkpoint, storage_options, weights=weights, device=dev)
        if checkpoint_fingerprint(ckpt) != fingerprint:
            raise RuntimeError(f"checkpoint {checkpoint} changed during the run (fingerprint {checkpoint_fingerprint(ckpt)}, expected {fingerprint}); re-run")

    def node(self) -> str:
        from .placement import node_id

        return node_id()

    def write_group(self, cache: Any, store: CamStore, entry: Mapping[str, Any], view: int, selection: ClassSelection, use_top5: bool,
                    fields: list[str]) -> dict[str, Any]:
        if self.threads:
            torch.set_num_threads(self.threads)
        chunks = math.ceil(int(entry["count"]) / cache.chunk_rows)
        parts: list[dict[str, np.ndarray]] = []
        with ThreadPoolExecutor(1) as reader:
            nxt = reader.submit(_read_cache_chunk, cache, entry, 0, fields) if chunks else None
            for ci in range(chunks):
                chunk = nxt.result()
                nxt = reader.submit(_read_cache_chunk, cache, entry, ci + 1, fields) if ci + 1 < chunks else None
                parts.append(_explain_cache_chunk(self.model, chunk, view, selection, use_top5, store.upsampled_size))
        rows, skipped = _join_parts(parts, entry["url"])
        return _write_entry(store, entry["url"], rows, skipped)


def _from_cache_on_ray(cfg: CamsConfig, cache: Any, store: CamStore, selection: ClassSelection) -> CamsSummary:
    """:func:`_from_cache` over model actors: one per GPU of the cluster (``cfg.num_actors``
    overrides; one CPU actor on a CPU-only cluster), each fed whole shards, two in flight."""
    import ray

    from .placement import model_resources, user_error_in
    from .raykit import ensure_ray

    entries = [cache.manifest["shards"][u] for u in sorted(cache.done_sources())]
    done = store.done_sources()
    todo = deque(e for e in entries if e["url"] not in done)
    summary = CamsSummary(store.url, store.fingerprint, f"feature cache {cache.url}", len(entries), len(entries) - len(todo))
    if not todo:
        return summary
    t0 = time.perf_counter()
    summary.ray_startup_seconds = ensure_ray()
    view = cache.views.index(cfg.view)
    use_top5 = view == 0
    fields = ["features", "labels", "top5_classes", "top5_probs"] + (["logits"] if cache.store_logits and use_top5 else [])
    resources = model_resources(cfg.device)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if resources.get("num_gpus") else 0
    count = max(1, min(cfg.num_actors or gpus or 1, len(todo)))
    actor_cls = ray.remote(CacheCamActor).options(max_restarts=1, max_task_retries=2, **resources)
    actors = [actor_cls.remote(cfg.checkpoint, cfg.checkpoint_storage_options, cfg.weights, store.identity["checkpoint"]["fingerprint"],
                               cfg.device, cfg.torch_threads) for _ in range(count)]
    progress = Progress(sum(int(e["count"]) for e in todo) or None, cfg.progress, what="cams", unit="samples")
    cache_ref, store_ref = ray.put(cache), ray.put(store)
    pending: dict[Any, tuple[Any, dict[str, Any]]] = {}

    def feed(actor: Any) -> None:
        if todo:
            e = todo.popleft()
            pending[actor.write_group.remote(cache_ref, store_ref, e, view, selection, use_top5, fields)] = (actor, e)

    try:
        summary.ran_on = sorted(ray.get([a.node.remote() for a in actors]))
        for actor in actors:
            feed(actor)
            feed(actor)  # the next shard queued: no idle gap between two calls
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            actor, e = pending.pop(ready)
            _finish_write(store, ray.get(ready), summary)
            progress.update(int(e["count"]))
            feed(actor)
    except Exception as exc:
        err = user_error_in(exc)
        if err is not None:
            raise err from None
        raise
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
def _explain_cache_chunk(model: LCAM, chunk: dict[str, Any], view: int, selection: ClassSelection, use_top5: bool, size: int | None) -> dict[str, np.ndarray]:
    labels = np.asarray(chunk["labels"], dtype=np.int64)
    keep = labels >= 0 if selection.mode == "label" else np.ones(len(labels), dtype=bool)
    keys = np.array(chunk["keys"], dtype=object)
    out: dict[str, np.ndarray] = {"key": keys[keep], "label": labels[keep], "dropped": keys[~keep]}
    if not keep.any():
        return out
    device = next(model.attention.parameters()).device
    feats = torch.from_numpy(np.ascontiguousarray(chunk["features"][keep, view])).to(device).float()
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


def _join_parts(parts: list[dict[str, np.ndarray]], url: str) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    skipped = [{"key": str(k), "reason": "no label: classes 'label' needs one", "shard": url} for p in parts for k in p.pop("dropped")]
    names = set().union(*(p.keys() for p in parts))
    rows = {n: np.concatenate([p[n] for p in parts if n in p]) for n in names}
    return rows, skipped


def _write_entry(store: CamStore, url: str, rows: dict[str, np.ndarray], skipped: list[dict[str, str]]) -> dict[str, Any]:
    entry = store.write_shard(url, rows)
    entry["skipped"] = skipped
    return entry


def _finish_write(store: CamStore, entry: dict[str, Any], summary: CamsSummary) -> None:
    store.mark_done([entry])
    summary.shards_written += 1
    summary.samples += int(entry["count"])
    summary.maps += int(entry["count"]) * store.width
    summary.skipped += entry["skipped"]


# ---- source: WebDataset shards (Ray Data, one forward per image)
class CamActor:
    """Backbone + attention in an actor: (n, 1, 3, H, W) uint8 pixels -> the store's columns."""

    def __init__(self, checkpoint: str, storage_options: StorageOptions, weights: str | None, fingerprint: str, selection: ClassSelection, upsample_to: int | None, precision: str, torch_threads: int | None) -> None:
        device = resolve_device("auto")
        self.threads = pin_torch_threads(torch_threads, device.type)
        self.explainer = Explainer.from_checkpoint(checkpoint, device=device, weights=weights, storage_options=storage_options, precision=precision)
        if self.explainer.fingerprint != fingerprint:
            raise RuntimeError(f"checkpoint {checkpoint} changed during the run (fingerprint {self.explainer.fingerprint}, expected {fingerprint}); re-run")
        self.selection, self.upsample_to = selection, upsample_to
        # as in extraction: BatchNorm folded (same function and identity), channels-last on CPU and GPU
        model = self.explainer.model
        model.backbone = model.backbone.folded().to(memory_format=torch.channels_last)
        self.ready_at = time.time()  # wall clock: the driver compares it with its own

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.threads:
            torch.set_num_threads(self.threads)
        ex, sel = self.explainer, self.selection
        model, dev = ex.model, ex.device
        pixels = batch["pixels"][:, 0]
        errors = np.array(batch["error"], dtype=object)
        labels = np.asarray(batch["label"], dtype=np.int64)
        if sel.mode == "label":
            errors[(labels < 0) & (errors == "")] = "no label: classes 'label' needs one"
        ok = errors == ""
        n, t, (h, w) = len(labels), sel.width, model.backbone.feature_shape[1:]
        out = {k: batch[k] for k in ("key", "label")}
        out.update(
            class_ids=np.full((n, t), -1, np.int32),
            probs=np.zeros((n, t), np.float32),
            raw=np.zeros((n, t, h, w), np.float16),
            predicted=np.full(n, -1, np.int32),
            predicted_prob=np.zeros(n, np.float32),
        )
        if self.upsample_to:
            out["upsampled"] = np.zeros((n, t, self.upsample_to, self.upsample_to), np.uint8)
        if ok.any():
            x = torch.from_numpy(pixels[ok]).to(dev, non_blocking=True).float().div_(255.0).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                with ex.autocast_context():
                    feats, logits = model.backbone.extract(pad_lone_image(x))  # as in extraction
                feats, logits = feats[: len(x)], logits[: len(x)]
                rows = explain_rows(model, feats.float(), sel, logits=logits.float(), labels=labels[ok], upsample_to=self.upsample_to)
            for k, v in rows.items():
                out[k][ok] = v
        out["error"] = errors.astype(str)
        return out


class CamWorker(ShardWorker):
    """The CAM stage's actor (shard source): a shard's decoded parts -> maps -> its group in
    the store, written here; returns the manifest entry only (see raykit.run_shard_stage)."""

    WRITE_ATTEMPTS = 3  # storage hiccups (OSError): the group is rewritten whole, so retrying is safe

    def __init__(self, store: CamStore, batch_size: int, *actor_args: Any) -> None:
        import threading

        self.store, self.batch_size = store, batch_size
        self.model = CamActor(*actor_args)
        self.model_lock = threading.Lock()  # two calls at once: one forward at a time

    def process(self, item: dict[str, Any], *parts: dict[str, Any]) -> dict[str, Any]:
        from .extract import join_parts

        url = item["url"]
        bad = next((p["shard_error"] for p in parts if p.get("shard_error")), None)
        if bad:
            return {"url": url, "failed": bad}
        batch = join_parts(parts)
        n = len(batch["key"])
        with self.model_lock:
            outs = [self.model({k: v[lo : lo + self.batch_size] for k, v in batch.items()}) for lo in range(0, n, self.batch_size)]
        del batch, parts
        out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}
        keep = out["error"] == "" if outs else np.zeros(0, bool)
        skipped = [{"key": str(k), "reason": str(e), "shard": url} for k, e in zip(out["key"][~keep], out["error"][~keep])] if outs else []
        fields = ("key", "label", "class_ids", "probs", "raw", "predicted", "predicted_prob") + (("upsampled",) if self.store.upsampled_size else ())
        rows = {k: out[k][keep] for k in fields} if outs else {"key": np.zeros(0, dtype=str)}
        for attempt in range(1, self.WRITE_ATTEMPTS + 1):
            try:
                entry = _write_entry(self.store, url, rows, skipped)
                break
            except OSError:
                if attempt == self.WRITE_ATTEMPTS:
                    raise
                time.sleep(attempt)
        entry.update(ready_at=self.model.ready_at, node_id=self.node_id())
        return entry


def _from_shards(cfg: CamsConfig, ckpt: Mapping[str, Any], store: CamStore, selection: ClassSelection, shards: list[Any]) -> CamsSummary:
    from lcam.backbones import Preprocessing

    from .extract import shard_parts
    from .raykit import actor_pool, ensure_ray, run_shard_stage

    done = store.done_sources()
    todo = [s for s in shards if s.url not in done]
    summary = CamsSummary(store.url, store.fingerprint, f"shards {cfg.shards}", len(shards), len(shards) - len(todo))
    if not todo:
        return summary
    t0, wall0 = time.perf_counter(), time.time()
    summary.ray_startup_seconds = ensure_ray()
    preprocessing = Preprocessing.from_dict(ckpt["backbone"]["preprocessing"])
    items = [{"url": s.url, "name": s.name, "count": s.count if s.count is not None else -1} for s in todo]
    actors, gpus = actor_pool(cfg.num_actors)
    progress = Progress(sum(s.count or 0 for s in todo) or None, cfg.progress, what="cams", unit="images")
    ready_at = math.inf

    def committed(entry: dict[str, Any]) -> None:  # driver: metadata in, manifest out
        nonlocal ready_at
        ready_at = min(ready_at, float(entry.pop("ready_at", math.inf)))
        _finish_write(store, entry, summary)
        progress.update(int(entry["count"]) + len(entry["skipped"]))

    # The same write path as extraction (one shard per unit of work, the worker writes its
    # group, the driver records the manifest): pipeline.raykit.run_shard_stage.
    run_shard_stage(
        items,
        lambda item: shard_parts(item, storage_options=cfg.source_storage_options, preprocessing=preprocessing, views=("center",), part_rows=cfg.decode_batch_size),
        CamWorker,
        (store, cfg.batch_size, cfg.checkpoint, cfg.checkpoint_storage_options, cfg.weights, store.identity["checkpoint"]["fingerprint"],
         selection, store.upsampled_size, cfg.precision, cfg.torch_threads),
        actors=actors,
        gpus=gpus,
        on_result=committed,
        on_failure=lambda url, reason: summary.failed_shards.append({"url": url, "reason": reason}),
    )
    progress.close()
    summary.seconds = time.perf_counter() - t0
    if ready_at < math.inf:
        summary.actors_ready_seconds = max(0.0, ready_at - wall0)
    return summary
