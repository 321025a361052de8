"""Average Drop / Increase in Confidence at dataset scale (SPEC section 5).

Every method (L-CAM checkpoints and the baselines of :mod:`lcam.baselines`) is scored on
the same images read from WebDataset shards (centre crop), with the protocol of
:mod:`lcam.metrics`: predicted class, min-max at the map's own resolution, bilinear
upsampling, exactly ceil(r*H*W) kept pixels with their soft values, black masking in
pixel space, softmax scores.

Work is planned on the driver as a fixed list of batches (a batch never straddles a
shard), and one function, :meth:`Evaluator.evaluate_batch`, scores a batch: one clean
forward shared by all methods (so every method sees the same Y and predicted class, and
L-CAM's maps come from that forward's F at no extra pass), then per method its maps and
ONE forward of the R masked copies of every image. The local engine (one process,
decoding in a thread pool) and the Ray engine (Ray Data: one read+decode task per shard,
an actor pool holding the backbone and the methods, GPU when the cluster has one) feed
the same batches to that function, so they give identical numbers.

Outputs, each written atomically under the output folder: ``results.md`` (the table, the
formulas, N and the protocol), ``results.json`` (every number, protocol, N, versions,
seeds, timings), ``adic.png`` (bar chart) and ``per_image.csv`` (Y and O per image,
method and ratio: where explanations fail).
"""

from __future__ import annotations

import concurrent.futures
import csv
import datetime
import io
import json
import math
import os
import pickle
import platform
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from lcam.metrics import AD_FORMULA, DEFAULT_RATIOS, IC_FORMULA, ProtocolInfo, average_drop, confidence_scores, increase_in_confidence

from .errors import UserError
from .fs import StorageOptions, join, write_bytes_atomic, write_json_atomic

FORMAT = "lcam-eval/1"
BASELINE_NAMES = ("gradcam", "gradcam++", "scorecam", "rise", "gaussian", "random")
LABELS = {
    "lcam-fm": "L-CAM-Fm",
    "lcam-img": "L-CAM-Img",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "scorecam": "Score-CAM",
    "rise": "RISE",
    "gaussian": "Centred Gaussian",
    "random": "Random map",
}
FILES = ("results.md", "results.json", "adic.png", "per_image.csv")
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


# ---------------------------------------------------------------------------- configuration


@dataclass
class EvalConfig:
    """Everything ``lcam eval`` needs. None means "from the first checkpoint, else the default"."""

    shards: str | list[str]
    out: str
    checkpoints: list[str] = field(default_factory=list)  # URL or NAME=URL per L-CAM checkpoint
    methods: tuple[str, ...] = BASELINE_NAMES  # baselines to run next to the checkpoints
    backbone: str | None = None
    weights: str | None = None
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    limit: int | None = None  # seeded random subset of this many images (None: all)
    seed: int = 0  # image subset and the ranking that method subsets take prefixes of
    method_limits: dict[str, int] = field(default_factory=dict)  # method id -> its first N images of the ranking
    batch_size: int = 16  # images per planned batch and per forward (CPU: 8-16 is fastest for EfficientNet-Lite0)
    rise_masks: int = 4000
    rise_grid: int = 7
    rise_p: float = 0.5
    rise_batch: int = 32
    rise_seed: int = 0
    scorecam_batch: int = 32
    random_seed: int = 0
    gaussian_sigma: float = 0.25
    save_maps: int = 0  # the first N images (by rank) keep every method's map: maps.npz, the report's gallery
    road: bool = False
    road_percentiles: tuple[int, ...] = ROAD_PERCENTILES
    road_seed: int = 0
    engine: str = "auto"  # auto | local | ray
    actors: int | None = None  # ray: actor pool size (default: one per GPU, else 1)
    decode_workers: int = 4  # local: decoding threads
    torch_threads: int | None = None  # ray CPU actors: torch threads (default: all cores of the node)
    device: str = "auto"  # auto | cpu | cuda
    fold_batchnorm: bool = True  # BatchNorm folded into the convolutions: same function, 1.2-1.5x faster on CPU
    index: str | None = None
    shard_storage_options: StorageOptions = None
    out_storage_options: StorageOptions = None
    checkpoint_storage_options: StorageOptions = None
    progress: bool = True

    def public(self) -> dict[str, Any]:
        """The config for results.json: storage options (credentials) left out."""
        d = asdict(self)
        for k in ("shard_storage_options", "out_storage_options", "checkpoint_storage_options"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: how to build the method (anywhere: driver, Ray actor)."""

    id: str
    kind: str  # "lcam" or a baseline name of lcam.baselines.BASELINES
    label: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    limit: int | None = None  # evaluate on the images of rank < limit only
    attention_state: Mapping[str, torch.Tensor] | None = None  # lcam: the trained 1x1 convolution
    info: Mapping[str, Any] = field(default_factory=dict)  # for results.json (checkpoint URL, epoch, ...)


def _baseline_kwargs(name: str, cfg: EvalConfig) -> dict[str, Any]:
    if name == "rise":
        return {"num_masks": cfg.rise_masks, "grid": cfg.rise_grid, "p": cfg.rise_p, "mask_batch": cfg.rise_batch, "seed": cfg.rise_seed}
    if name == "scorecam":
        return {"batch_size": cfg.scorecam_batch}
    if name == "random":
        return {"seed": cfg.random_seed}
    if name == "gaussian":
        return {"sigma": cfg.gaussian_sigma}
    return {}


def _split_checkpoint_arg(arg: str) -> tuple[str | None, str]:
    """``NAME=URL`` or a bare URL (an '=' inside a URL path is not a name)."""
    head, sep, tail = arg.partition("=")
    if sep and head and not any(c in head for c in "/:."):
        return head, tail
    return None, arg


def resolve_backbone(cfg: EvalConfig) -> tuple[Any, list[tuple[str | None, str, dict[str, Any]]]]:
    """The backbone (from ``cfg`` or the first checkpoint) and the loaded checkpoints, all checked against it."""
    from lcam import build_backbone
    from lcam.backbones import WeightsUnavailable

    from .checkpoints import check_backbone, load_checkpoint

    loaded = []
    for arg in cfg.checkpoints:
        name, url = _split_checkpoint_arg(arg)
        loaded.append((name, url, load_checkpoint(url, cfg.checkpoint_storage_options)))
    first = loaded[0][2]["backbone"] if loaded else {}
    name = cfg.backbone or first.get("backbone") or "efficientnet_lite0"
    weights = cfg.weights or (first.get("weights") if first.get("backbone") == name else None) or "default"
    try:
        backbone = build_backbone(name, weights)
    except KeyError as exc:
        raise UserError(str(exc.args[0])) from None
    except WeightsUnavailable as exc:
        raise UserError(f"backbone {name}: {exc}") from None
    ident = backbone.describe()
    for _, url, ckpt in loaded:
        check_backbone(ckpt, ident, f"the evaluation backbone ({url} vs --backbone {name} --weights {weights})")
    return backbone, loaded


def method_specs(cfg: EvalConfig, loaded: Sequence[tuple[str | None, str, dict[str, Any]]]) -> list[MethodSpec]:
    """L-CAM rows from the checkpoints, then the baselines, with their subset limits."""
    from lcam.baselines import BASELINES

    specs: list[MethodSpec] = []
    used: set[str] = set()
    for name, url, ckpt in loaded:
        method = str(ckpt.get("method", ""))
        if method not in ("fm", "img"):
            raise UserError(f"checkpoint {url}: unknown L-CAM method {method!r} (expected fm or img)")
        mid = name or f"lcam-{method}"
        if mid in used:  # two checkpoints of one method: tell them apart by file name
            stem = url.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
            mid = f"lcam-{method}:{stem}"
            k = 2
            while mid in used:
                mid, k = f"lcam-{method}:{stem}-{k}", k + 1
        used.add(mid)
        label = LABELS.get(mid, f"{LABELS['lcam-' + method]} ({mid})" if name is None else mid)
        info = {"checkpoint": url, "method": method, "epoch": ckpt.get("epoch"), "step": ckpt.get("step"),
                "cache_fingerprint": ckpt.get("cache_fingerprint") or None, "train_config": ckpt.get("config", {})}
        specs.append(MethodSpec(mid, "lcam", label, {}, None, dict(ckpt["attention"]), info))
    for name in cfg.methods:
        if name not in BASELINES:
            raise UserError(lambda flag: f"{flag('methods')}: unknown method {name!r}; baselines: {', '.join(BASELINES)} (L-CAM rows come from {flag('checkpoints')})")
        if name in used:
            raise UserError(f"method {name!r} is listed twice")
        used.add(name)
        specs.append(MethodSpec(name, name, LABELS.get(name, name), _baseline_kwargs(name, cfg)))
    if not specs:
        raise UserError("nothing to evaluate: give --checkpoint and/or --methods")
    unknown = sorted(set(cfg.method_limits) - used)
    if unknown:
        raise UserError(f"--method-limit names {', '.join(unknown)}, which is not evaluated; methods: {', '.join(s.id for s in specs)}")
    out = []
    for s in specs:
        limit = cfg.method_limits.get(s.id)
        if limit is not None and limit < 1:
            raise UserError(f"--method-limit {s.id}={limit}: give at least 1 image")
        out.append(MethodSpec(s.id, s.kind, s.label, s.kwargs, limit, s.attention_state, s.info))
    return out


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlannedBatch:
    """Images ``positions`` of one shard, with their ranks in the seeded ordering."""

    batch_id: int
    shard_url: str
    shard_name: str
    shard_count: int | None
    positions: tuple[int, ...]
    ranks: tuple[int, ...]


@dataclass
class Plan:
    batches: list[PlannedBatch]
    available: int  # images in the shards
    selected: int  # images planned


def _count_samples(url: str, storage_options: StorageOptions) -> int:
    from .shards import iter_samples

    return sum(1 for _ in iter_samples(url, storage_options))


def plan_batches(shards: Sequence[Any], batch_size: int, limit: int | None, seed: int, storage_options: StorageOptions = None) -> Plan:
    """Fixed batches for any engine: a seeded random subset of ``limit`` images (all if None), in
    shard order, cut into batches of ``batch_size`` that never straddle a shard.

    Each selected image also gets a rank in a seeded random permutation; a method limited
    to M images evaluates the images of rank < M (a uniform random subset, nested: the
    images of a smaller limit are among those of a larger one).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    # shards packed elsewhere have no index count: read them once to count
    counts = [s.count if s.count is not None else _count_samples(s.url, storage_options) for s in shards]
    total = int(sum(counts))
    if total == 0:
        raise UserError("the shards hold no images")
    rng = np.random.default_rng(seed)
    if limit is None:
        chosen = np.arange(total)
    else:
        if limit < 1:
            raise UserError(lambda flag: f"{flag('limit')} must be at least 1, got {limit}")
        if limit > total:
            raise UserError(lambda flag: f"{flag('limit')} {limit} asks for more images than the shards hold ({total}); pass {flag('limit')} {total} or less, or leave it out")
        chosen = np.sort(rng.choice(total, size=limit, replace=False))
    ranks = rng.permutation(len(chosen))
    starts = np.cumsum([0, *counts])
    batches: list[PlannedBatch] = []
    for si, s in enumerate(shards):
        lo, hi = np.searchsorted(chosen, [starts[si], starts[si + 1]])
        pos = (chosen[lo:hi] - starts[si]).tolist()
        rk = ranks[lo:hi].tolist()
        for b in range(0, len(pos), batch_size):
            batches.append(PlannedBatch(len(batches), s.url, s.name, s.count, tuple(pos[b : b + batch_size]), tuple(rk[b : b + batch_size])))
    return Plan(batches, total, len(chosen))


# ---------------------------------------------------------------------------- reading and decoding


@dataclass
class DecodedBatch:
    """A planned batch's decodable images as uint8 pixels (exactly what ``preprocess`` gives x 255)."""

    batch_id: int
    shard: str
    keys: list[str]
    labels: np.ndarray  # (n,) int64, -1 when unlabelled
    ranks: np.ndarray  # (n,) int64
    pixels: np.ndarray  # (n, 3, H, W) uint8
    skipped: list[dict[str, str]]  # {"key", "shard", "reason"} of images that did not decode


def decode_to_uint8(data: bytes, prep: Any) -> np.ndarray:
    """Bytes -> (3, crop, crop) uint8 of the centre crop. Lossless: ``preprocess`` gives k/255,
    and ``u8.float() / 255`` gives back the same float32 values bit for bit."""
    from .images import decode_image, preprocess

    return np.ascontiguousarray((preprocess(decode_image(data), prep, "center") * 255).round_().to(torch.uint8).numpy())


def read_selected(batches: Sequence[PlannedBatch], storage_options: StorageOptions) -> dict[int, list[Any]]:
    """Read one shard (count checked against its index) and keep the samples the batches need."""
    from .shards import ShardInfo, read_shard

    b0 = batches[0]
    samples = read_shard(ShardInfo(b0.shard_url, b0.shard_name, b0.shard_count), storage_options)
    if b0.shard_count is None and max(max(b.positions) for b in batches) >= len(samples):
        raise UserError(f"shard {b0.shard_url} changed while evaluating (now {len(samples)} samples); rerun")
    return {b.batch_id: [samples[p] for p in b.positions] for b in batches}


def decode_batch(batch: PlannedBatch, samples: Sequence[Any], prep: Any, pool: concurrent.futures.Executor | None = None) -> DecodedBatch:
    def one(s: Any) -> tuple[np.ndarray | None, str]:
        try:
            return decode_to_uint8(s.image, prep), ""
        except Exception as exc:  # DecodeError and whatever PIL raises on odd files
            return None, f"decode: {exc}"

    decoded = list(pool.map(one, samples)) if pool is not None else [one(s) for s in samples]
    ok = [i for i, (px, _) in enumerate(decoded) if px is not None]
    skipped = [{"key": s.key, "shard": batch.shard_url, "reason": err} for s, (px, err) in zip(samples, decoded) if px is None]
    crop = prep.crop
    pixels = np.stack([decoded[i][0] for i in ok]) if ok else np.zeros((0, 3, crop, crop), np.uint8)
    return DecodedBatch(
        batch.batch_id, batch.shard_url, [samples[i].key for i in ok], np.array([samples[i].label for i in ok], np.int64),
        np.array([batch.ranks[i] for i in ok], np.int64), pixels, skipped,
    )


# ---------------------------------------------------------------------------- the per-batch computation


def batch_seed(seed: int, batch_id: int) -> int:
    """A seed for batch ``batch_id`` derived from ``seed``: independent of engine and worker."""
    return int(np.random.SeedSequence([int(seed), int(batch_id)]).generate_state(1, np.uint32)[0])


class _ForwardCounter:
    """Counts images through ``backbone.features`` (every full forward passes there)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.images += int(args[0].shape[0])


class _ChannelsLast(torch.nn.Module):
    """The backbone fed channels-last input (masking and indexing hand back NCHW copies)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


class Evaluator:
    """The backbone and the methods; :meth:`evaluate_batch` is THE computation of both engines."""

    def __init__(
        self,
        backbone: Any,
        specs: Sequence[MethodSpec],
        ratios: Sequence[float] = DEFAULT_RATIOS,
        *,
        forward_batch: int | None = 16,
        road: bool = False,
        road_percentiles: Sequence[int] = ROAD_PERCENTILES,
        road_seed: int = 0,
        device: str | torch.device = "cpu",
        keep_maps: int = 0,
        fold_batchnorm: bool = True,
    ) -> None:
        from lcam import LCAM
        from lcam.baselines import LCAMMethod, build_baseline

        self.device = torch.device(device)
        # an inference copy (Backbone.folded): every method, clean and masked passes share it
        self.backbone = (backbone.folded() if fold_batchnorm else backbone).to(self.device)
        self.ratios = tuple(float(r) for r in ratios)
        self.forward_batch = forward_batch
        self.road, self.road_percentiles, self.road_seed = road, tuple(road_percentiles), road_seed
        self.keep_maps = keep_maps
        self.specs = list(specs)
        self.methods = []
        for s in self.specs:
            if s.kind == "lcam":
                model = LCAM(self.backbone)
                model.attention.load_state_dict(dict(s.attention_state or {}))
                self.methods.append(LCAMMethod(model.to(self.device).eval()))
            else:
                self.methods.append(build_baseline(s.kind, self.backbone, **dict(s.kwargs)))
        self.counter = _ForwardCounter(self.backbone.features)
        self.model = _ChannelsLast(self.backbone)

    def close(self) -> None:
        """Remove the forward-counting hook from the backbone (it may be shared with the caller)."""
        self.counter.handle.remove()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def evaluate_batch(self, pixels: np.ndarray | torch.Tensor, ranks: Sequence[int], batch_id: int) -> dict[str, Any]:
        """Score one batch with every method.

        ``pixels``: (n, 3, H, W) uint8 centre crops; ``ranks``: each image's rank (method
        subsets); ``batch_id`` seeds the random map and ROAD's imputation noise. Returns
        plain numpy/Python values: ``class_ids`` and ``Y`` (n,), and per method the batch
        indices it scored, ``O`` (R, m), seconds and forward counts.
        """
        from lcam.baselines import LCAMMethod, RandomMap, road_scores

        # One memory format whatever the pixels' strides: oneDNN picks other kernels (other
        # rounding) per layout, and the engines deliver different strides. Channels-last:
        # measured 1.5-2x faster than NCHW for batches of 8-16 on CPU, and the GPU choice.
        x = torch.as_tensor(pixels).to(self.device).float().div_(255).contiguous(memory_format=torch.channels_last)
        ranks_t = torch.as_tensor(np.asarray(ranks, dtype=np.int64))
        self._sync()
        t0, c0 = time.perf_counter(), self.counter.images
        with torch.no_grad():
            feats, logits = self.backbone.extract(x)
            probs = logits.float().softmax(1)
        ids = probs.argmax(1)
        self._sync()
        out: dict[str, Any] = {
            "batch_id": int(batch_id),
            "class_ids": ids.cpu().numpy(),
            "Y": probs.gather(1, ids[:, None])[:, 0].cpu().numpy(),
            "clean_seconds": time.perf_counter() - t0,
            "clean_forwards": self.counter.images - c0,
            "methods": {},
        }
        keep = torch.nonzero(ranks_t < self.keep_maps)[:, 0]
        if len(keep):  # images for the report's gallery: their pixels and every method's map
            out["gallery"] = {"index": keep.numpy(), "pixels": np.asarray(torch.as_tensor(pixels)[keep])}
        for spec, method in zip(self.specs, self.methods):
            sel = torch.arange(x.shape[0]) if spec.limit is None else torch.nonzero(ranks_t < spec.limit)[:, 0]
            if len(sel) == 0:
                continue
            whole = len(sel) == x.shape[0]
            xs = x if whole else x[sel.to(self.device)]
            ids_s = ids if whole else ids[sel.to(self.device)]
            t1, c1 = time.perf_counter(), self.counter.images
            if isinstance(method, RandomMap):
                method.reseed(batch_seed(spec.kwargs.get("seed", 0), batch_id))
            if isinstance(method, LCAMMethod):  # F and the logits of the shared clean forward
                f_s, l_s = (feats, logits) if whole else (feats[sel.to(self.device)], logits[sel.to(self.device)])
                cams = method.from_features(f_s, ids_s, l_s)
            else:
                cams = method(xs, ids_s)
            self._sync()
            t2, c2 = time.perf_counter(), self.counter.images
            scores = confidence_scores(
                self.model, xs, cams, self.ratios, batch_size=self.forward_batch,
                clean_probs=probs if whole else probs[sel.to(self.device)],
            )
            self._sync()
            t3, c3 = time.perf_counter(), self.counter.images
            entry = {
                "index": sel.numpy(),
                "O": scores.O.cpu().numpy(),
                "map_seconds": t2 - t1,
                "masked_seconds": t3 - t2,
                "map_forwards": c2 - c1,
                "masked_forwards": c3 - c2,
            }
            if len(keep):
                kept = torch.nonzero(ranks_t[sel] < self.keep_maps)[:, 0]
                entry["maps"] = {"index": sel[kept].numpy(), "maps": cams[kept.to(cams.device)].float().cpu().numpy()}
            if self.road:
                r = road_scores(self.backbone, xs, cams, ids_s.cpu(), self.road_percentiles, seed=batch_seed(self.road_seed, batch_id))
                self._sync()
                entry["road"] = {"morf": r.morf.numpy(), "lerf": r.lerf.numpy(), "clean": r.clean.numpy()}
                entry["road_seconds"] = time.perf_counter() - t3
                entry["road_forwards"] = self.counter.images - c3
            out["methods"][spec.id] = entry
        return out


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible here; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


# ---------------------------------------------------------------------------- engines


def _prefetch(calls: Iterable[Callable[[], Any]], pool: concurrent.futures.Executor, depth: int) -> Iterator[Any]:
    """Results of ``calls`` in order, running up to ``depth`` of them ahead in ``pool``."""
    pending: deque[concurrent.futures.Future] = deque()
    for call in calls:
        pending.append(pool.submit(call))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _by_shard(plan: Plan) -> list[list[PlannedBatch]]:
    groups: list[list[PlannedBatch]] = []
    for b in plan.batches:
        if groups and groups[-1][0].shard_url == b.shard_url:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def run_local(plan: Plan, evaluator: Evaluator, prep: Any, storage_options: StorageOptions, decode_workers: int,
              on_batch: Callable[[DecodedBatch, dict | None], None]) -> None:
    """One process: a reader thread reads one shard ahead, a pool decodes batches ahead of the device."""
    groups = _by_shard(plan)
    workers = max(1, decode_workers)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eval-read") as reader, \
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="eval-decode") as decoder:
        shard_samples = _prefetch((partial(read_selected, g, storage_options) for g in groups), reader, depth=1)

        def decode_calls() -> Iterator[Callable[[], DecodedBatch]]:
            for group, samples in zip(groups, shard_samples):
                for b in group:
                    yield partial(decode_batch, b, samples[b.batch_id], prep)

        for decoded in _prefetch(decode_calls(), decoder, depth=workers):
            result = evaluator.evaluate_batch(decoded.pixels, decoded.ranks, decoded.batch_id) if len(decoded.keys) else None
            on_batch(decoded, result)


def ray_read_decode(row: dict[str, Any], prep: Any, storage_options: StorageOptions = None) -> list[dict[str, Any]]:
    """Ray task: one shard -> one row per planned batch (decoded pixels pickled; an error row on failure)."""
    batches = [PlannedBatch(**{**b, "positions": tuple(b["positions"]), "ranks": tuple(b["ranks"])}) for b in json.loads(row["batches"])]
    try:
        samples = read_selected(batches, storage_options)
    except Exception as exc:  # count mismatch, cut tar, unreadable object: the driver reports it
        return [{"batch_id": -1, "payload": pickle.dumps({"error": f"{row['url']}: {type(exc).__name__}: {exc}"})}]
    return [{"batch_id": b.batch_id, "payload": pickle.dumps(decode_batch(b, samples[b.batch_id], prep))} for b in batches]


class EvalActor:
    """Ray actor: builds the backbone and the methods once, then scores pickled batches."""

    def __init__(self, backbone_name: str, weights: str, digest: str, specs: list[MethodSpec], options: dict[str, Any]) -> None:
        from lcam import build_backbone

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # Ray sets OMP_NUM_THREADS=1 for its workers; use the node's cores. The count is
        # per OpenMP thread and Ray Data may call the actor from another thread than the
        # constructor's, so it is set again on every call.
        self.threads = (options.get("torch_threads") or os.cpu_count() or 1) if device == "cpu" else None
        if self.threads:
            torch.set_num_threads(self.threads)
        backbone = build_backbone(backbone_name, weights)
        if backbone.weights_digest() != digest:
            raise UserError(f"the {backbone_name} weights {weights!r} on this worker differ from the driver's (digest "
                            f"{backbone.weights_digest()[:12]} vs {digest[:12]}); give every node the same weights file")
        self.evaluator = Evaluator(backbone, specs, options["ratios"], forward_batch=options["forward_batch"], road=options["road"],
                                   road_percentiles=options["road_percentiles"], road_seed=options["road_seed"], device=device,
                                   keep_maps=options.get("keep_maps", 0), fold_batchnorm=options.get("fold_batchnorm", True))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.threads:  # unconditionally: torch reports the count it was last given, not this thread's
            torch.set_num_threads(self.threads)
        payloads = []
        for bid, payload in zip(batch["batch_id"], batch["payload"]):
            d = pickle.loads(payload)
            if int(bid) < 0:  # a shard read error passes through to the driver
                payloads.append(payload)
                continue
            result = self.evaluator.evaluate_batch(d.pixels, d.ranks, d.batch_id) if len(d.keys) else None
            d.pixels = d.pixels[:0]  # the driver needs the metadata, not the pixels
            payloads.append(pickle.dumps((d, result)))
        return {"batch_id": np.asarray(batch["batch_id"]), "payload": np.array(payloads, dtype=object)}


def run_ray(plan: Plan, cfg: EvalConfig, backbone: Any, specs: Sequence[MethodSpec],
            on_batch: Callable[[DecodedBatch, dict | None], None]) -> dict[str, Any]:
    """Ray Data: read+decode tasks per shard -> actor pool (backbone + methods) -> the driver."""
    import ray
    from ray.data import ActorPoolStrategy

    from .extract import ensure_ray

    startup = ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = cfg.actors or (gpus or 1)
    items = [{"url": g[0].shard_url, "batches": json.dumps([asdict(b) for b in g])} for g in _by_shard(plan)]
    options = {"ratios": cfg.ratios, "forward_batch": cfg.batch_size, "road": cfg.road, "road_percentiles": cfg.road_percentiles,
               "road_seed": cfg.road_seed, "torch_threads": cfg.torch_threads, "keep_maps": cfg.save_maps,
               "fold_batchnorm": cfg.fold_batchnorm}
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .flat_map(ray_read_decode, fn_kwargs={"prep": backbone.preprocessing, "storage_options": cfg.shard_storage_options}, num_cpus=1)
        .map_batches(
            EvalActor,
            fn_constructor_args=(backbone.name, backbone.weights_name, backbone.weights_digest(), list(specs), options),
            batch_size=1,
            compute=ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
        )
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        for bid, payload in zip(batch["batch_id"], batch["payload"]):
            if int(bid) < 0:
                raise UserError(f"evaluation stopped: shard {pickle.loads(payload)['error']}; re-download or re-pack that shard")
            decoded, result = pickle.loads(payload)
            on_batch(decoded, result)
    return {"ray_startup_seconds": startup, "actors": actors, "gpus_per_actor": 1 if gpus else 0}


# ---------------------------------------------------------------------------- aggregation


@dataclass
class MethodResult:
    id: str
    label: str
    kind: str
    config: dict[str, Any]
    n: int
    ad: list[float]
    ic: list[float]
    ad_se: list[float]  # standard error of AD (100 x std of the per-image drops / sqrt(N))
    ic_se: list[float]
    seconds: float
    map_forwards: int
    masked_forwards: int
    info: dict[str, Any] = field(default_factory=dict)
    road: dict[str, Any] | None = None

    def to_dict(self, ratios: Sequence[float]) -> dict[str, Any]:
        d = asdict(self)
        d["per_ratio"] = {f"{r:g}": {"AD": a, "IC": i, "AD_se": s, "IC_se": t}
                          for r, a, i, s, t in zip(ratios, self.ad, self.ic, self.ad_se, self.ic_se)}
        return d


class _Collector:
    """Batch outcomes -> per-image arrays, in batch order whatever order they arrived in."""

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
    per_method: dict[str, dict[str, Any]]  # id -> {"rows": (m,) image indices, "O": (R, m), "road": ...}
    methods: list[MethodResult]
    skipped: list[dict[str, str]]
    clean_seconds: float
    clean_forwards: int


def _se(per_image: np.ndarray) -> list[float]:
    n = per_image.shape[-1]
    return (100.0 * per_image.std(-1, ddof=1) / math.sqrt(n)).tolist() if n > 1 else [float("nan")] * per_image.shape[0]


def aggregate(collected: _Collector, specs: Sequence[MethodSpec], ratios: Sequence[float]) -> EvalResults:
    keys, shards, labels, ranks, ids, ys, skipped = [], [], [], [], [], [], []
    rows: dict[str, list[np.ndarray]] = {s.id: [] for s in specs}
    Os: dict[str, list[np.ndarray]] = {s.id: [] for s in specs}
    road: dict[str, dict[str, list[np.ndarray]]] = {s.id: {"morf": [], "lerf": [], "clean": []} for s in specs}
    timing = {s.id: [0.0, 0, 0, 0.0, 0] for s in specs}  # seconds, map fwd, masked fwd, road seconds, road fwd
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
            Os[mid].append(e["O"])
            t = timing[mid]
            t[0] += e["map_seconds"] + e["masked_seconds"]
            t[1] += e["map_forwards"]
            t[2] += e["masked_forwards"]
            if "road" in e:
                for k in ("morf", "lerf", "clean"):
                    road[mid][k].append(e["road"][k])
                t[3] += e["road_seconds"]
                t[4] += e["road_forwards"]
        offset += n
    if not keys:
        raise UserError("no image could be decoded: " + "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:3]))
    R = len(ratios)
    Y = np.concatenate(ys).astype(np.float64)
    per_method: dict[str, dict[str, Any]] = {}
    results: list[MethodResult] = []
    for s in specs:
        r = np.concatenate(rows[s.id]) if rows[s.id] else np.zeros(0, np.int64)
        O = np.concatenate(Os[s.id], axis=1).astype(np.float64) if Os[s.id] else np.zeros((R, 0))
        entry: dict[str, Any] = {"rows": r, "O": O}
        y, o = torch.from_numpy(Y[r]), torch.from_numpy(O)
        n = len(r)
        if n:
            drop = (np.maximum(0.0, Y[r][None] - O) / Y[r][None])  # what average_drop averages
            ad, ic = average_drop(y, o).tolist(), increase_in_confidence(y, o).tolist()
            ad_se, ic_se = _se(drop), _se((O > Y[r][None]).astype(np.float64))
        else:
            ad = ic = ad_se = ic_se = [float("nan")] * R
        road_summary = None
        if road[s.id]["morf"]:
            morf, lerf = np.concatenate(road[s.id]["morf"], 1), np.concatenate(road[s.id]["lerf"], 1)
            entry["road"] = {"morf": morf, "lerf": lerf}
            road_summary = {
                "morf_mean": morf.mean(1).tolist(), "lerf_mean": lerf.mean(1).tolist(),
                "combined": float(((lerf - morf) / 2).mean()), "seconds": timing[s.id][3], "forwards": timing[s.id][4],
            }
        per_method[s.id] = entry
        t = timing[s.id]
        results.append(MethodResult(s.id, s.label, s.kind, dict(s.kwargs), n, ad, ic, ad_se, ic_se, t[0], t[1], t[2],
                                    dict(s.info, limit=s.limit), road_summary))
    return EvalResults(tuple(ratios), keys, shards, np.concatenate(labels), np.concatenate(ranks), np.concatenate(ids), Y,
                       per_method, results, skipped, clean_seconds, clean_forwards)


def subset_table(res: EvalResults, limit: int) -> list[dict[str, Any]]:
    """AD/IC of every method on the images of rank < ``limit`` (the images a limited method saw)."""
    out = []
    for m in res.methods:
        e = res.per_method[m.id]
        keep = res.ranks[e["rows"]] < limit
        if keep.sum() < min(limit, len(res.keys)):
            continue  # the method did not see all of these images
        y, o = torch.from_numpy(res.Y[e["rows"][keep]]), torch.from_numpy(e["O"][:, keep])
        out.append({"id": m.id, "label": m.label, "n": int(keep.sum()), "AD": average_drop(y, o).tolist(),
                    "IC": increase_in_confidence(y, o).tolist()})
    return out


# ---------------------------------------------------------------------------- outputs


def _pct(r: float) -> str:
    return f"{r * 100:g}%"


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "numpy", "grad-cam", "pillow", "lcam", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def protocol_dict(ratios: Sequence[float], n: int) -> dict[str, Any]:
    d = ProtocolInfo(ratios=tuple(ratios), target="predicted", num_images=n).to_dict()
    d["preprocessing"] = "resize shorter side 256 (bilinear, PIL), centre crop 224, [0, 1] (torchvision-exact)"
    d["class"] = "the backbone's top-1 class on the clean image, shared by every method"
    return d


def _fmt(v: float) -> str:
    return "n/a" if v != v else f"{v:.2f}"


def render_markdown(res: EvalResults, report: Mapping[str, Any]) -> str:
    ratios = res.ratios
    n_all = len(res.keys)
    data = report["data"]
    bb = report["backbone"]
    head = ["Method", "N"] + [f"AD {_pct(r)} ↓" for r in ratios] + [f"IC {_pct(r)} ↑" for r in ratios]
    lines = [
        "# Average Drop / Increase in Confidence",
        "",
        f"Backbone `{bb['backbone']}` (weights `{bb['weights']}`, digest `{bb['weights_digest'][:12]}`); "
        f"{n_all} images from `{data['shards']}`"
        + (f" (seeded random subset, seed {data['seed']}, of {data['available']})" if data["limit"] else f" (all {data['available']})")
        + "; the class explained is the backbone's top-1 on the clean image.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "--:"] + ["--:"] * (2 * len(ratios))) + "|",
    ]
    for m in res.methods:
        lines.append("| " + " | ".join([m.label, str(m.n)] + [_fmt(v) for v in m.ad] + [_fmt(v) for v in m.ic]) + " |")
    lines += [
        "",
        f"- {AD_FORMULA}  (lower is better; the drop is divided by Y_i: pytorch-grad-cam's DropInConfidence is not)",
        f"- {IC_FORMULA}  (higher is better)",
        "- Y_i = softmax(model(x_i))[c_i], O_i = softmax(model(x_i * m_i))[c_i], c_i the top-1 class of the clean image.",
        "- m_i: the method's map for c_i, min-max normalised at its own resolution (a constant map becomes zeros), "
        "bilinearly upsampled (align_corners=False) to 224 x 224, then all but the ceil(r x H x W) highest pixels zeroed; "
        "kept pixels keep their soft values.",
        f"- Ties: {report['protocol']['tie_rule']}.",
        "- Masking in pixel space [0, 1] before the backbone's normalisation (removed pixels are black); softmax scores.",
        "- Standard errors of every number are in results.json; per-image Y and O in per_image.csv.",
    ]
    limits = sorted({m.info.get("limit") for m in res.methods if m.info.get("limit")})
    if limits:
        lines += ["", "## Methods on subsets", ""]
        lines += [f"- {m.label}: {m.n} images (the first {m.info['limit']} of a seeded random ranking of the {n_all})"
                  for m in res.methods if m.info.get("limit")]
        for lim in limits:
            rows = subset_table(res, lim)
            n = rows[0]["n"] if rows else 0
            lines += ["", f"All methods on the same {n} images (ranks < {lim}):", "",
                      "| " + " | ".join(head) + " |", "|" + "|".join(["---", "--:"] + ["--:"] * (2 * len(ratios))) + "|"]
            lines += ["| " + " | ".join([r["label"], str(r["n"])] + [_fmt(v) for v in r["AD"]] + [_fmt(v) for v in r["IC"]]) + " |" for r in rows]
    if any(m.road for m in res.methods):
        pr = report["road"]
        lines += ["", "## ROAD (pytorch-grad-cam)", "",
                  f"Percentiles {pr['percentiles']}: MoRF removes the most relevant pixels first (lower is better), LeRF the least "
                  "relevant first (higher is better), imputed with NoisyLinearImputer; combined = mean over percentiles of (LeRF - MoRF)/2. "
                  f"Cost per image: {2 * len(pr['percentiles']) + 1} forwards + {2 * len(pr['percentiles'])} sparse linear solves.", "",
                  "| Method | N | MoRF mean ↓ | LeRF mean ↑ | combined ↑ | seconds |", "|---|--:|--:|--:|--:|--:|"]
        for m in res.methods:
            if m.road:
                lines.append(f"| {m.label} | {m.n} | {np.mean(m.road['morf_mean']):.4f} | {np.mean(m.road['lerf_mean']):.4f} | "
                             f"{m.road['combined']:.4f} | {m.road['seconds']:.1f} |")
    t = report["timings"]
    lines += ["", "## Cost", "",
              f"Engine {report['engine']['name']} on {report['engine']['device']}, batches of {report['engine']['batch_size']}; "
              f"wall time {t['total_seconds']:.1f} s; one clean forward per image ({res.clean_forwards} in all, "
              f"{res.clean_seconds:.1f} s) shared by every method.", "",
              "| Method | N | seconds | images/s | forwards per image (maps + masked) |", "|---|--:|--:|--:|--:|"]
    for m in res.methods:
        if m.n:
            rate = m.n / m.seconds if m.seconds > 0 else float("inf")
            lines.append(f"| {m.label} | {m.n} | {m.seconds:.1f} | {rate:.2f} | "
                         f"{(m.map_forwards + m.masked_forwards) / m.n:.1f} ({m.map_forwards / m.n:.1f} + {m.masked_forwards / m.n:.1f}) |")
    if res.skipped:
        lines += ["", f"Skipped {len(res.skipped)} image(s) that did not decode (not in N):", ""]
        lines += [f"- `{s['shard']}` / `{s['key']}`: {s['reason']}" for s in res.skipped[:20]]
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.", ""]
    return "\n".join(lines)


def render_chart(res: EvalResults) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in res.methods if m.n]
    R = len(res.ratios)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(methods) + 5), 4.2))
    width = 0.8 / max(1, len(methods))
    x = np.arange(R)
    colors = plt.get_cmap("tab10")
    for ax, what, title in ((axes[0], "ad", "Average Drop (%) ↓"), (axes[1], "ic", "Increase in Confidence (%) ↑")):
        for j, m in enumerate(methods):
            vals = getattr(m, what)
            errs = m.ad_se if what == "ad" else m.ic_se
            bars = ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, yerr=np.nan_to_num(errs), capsize=2,
                          color=colors(j % 10), label=f"{m.label} (N={m.n})")
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        ax.set_xticks(x, [f"{_pct(r)} kept" for r in res.ratios])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"AD / IC on {len(res.keys)} images (error bars: standard error)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def render_csv(res: EvalResults, class_names: Sequence[str] | None) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    o_cols = [f"O@{r:g}" for r in res.ratios]
    road = any("road" in e for e in res.per_method.values())
    w.writerow(["key", "shard", "label", "predicted", "predicted_name", "rank", "method", "Y", *o_cols]
               + (["road_morf_mean", "road_lerf_mean"] if road else []))
    for m in res.methods:
        e = res.per_method[m.id]
        for j, i in enumerate(e["rows"]):
            c = int(res.class_ids[i])
            row = [res.keys[i], res.shards[i], int(res.labels[i]), c, class_names[c] if class_names else "", int(res.ranks[i]),
                   m.id, f"{res.Y[i]:.9g}", *(f"{v:.9g}" for v in e["O"][:, j])]
            if road:
                row += [f"{e['road']['morf'][:, j].mean():.9g}", f"{e['road']['lerf'][:, j].mean():.9g}"] if "road" in e else ["", ""]
            w.writerow(row)
    return buf.getvalue().encode()


# ---------------------------------------------------------------------------- progress and the entry point


class _Progress:
    """Periodic lines with images/s and ETA (stderr)."""

    def __init__(self, total: int, enabled: bool, every: float = 10.0) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = f", ETA {math.ceil((self.total - self.done) / rate)}s" if rate > 0 and self.done < self.total else ""
            print(f"eval: {self.done}/{self.total} images, {rate:.2f} images/s{eta}", file=sys.stderr, flush=True)


@dataclass
class EvalSummary:
    out: str
    files: dict[str, str]
    images: int
    skipped: int
    seconds: float
    methods: list[MethodResult]
    ratios: tuple[float, ...]

    def lines(self) -> list[str]:
        head = f"{'method':<22} {'N':>5}  " + "  ".join(f"AD{_pct(r):>5}" for r in self.ratios) + "  " + "  ".join(f"IC{_pct(r):>5}" for r in self.ratios)
        out = [f"evaluated {self.images} images in {self.seconds:.1f}s" + (f" ({self.skipped} skipped: undecodable)" if self.skipped else ""), head]
        for m in self.methods:
            out.append(f"{m.label:<22} {m.n:>5}  " + "  ".join(f"{v:7.2f}" for v in m.ad) + "  " + "  ".join(f"{v:7.2f}" for v in m.ic))
        out += [f"{k:<13} {v}" for k, v in self.files.items()]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "files": self.files, "images": self.images, "skipped": self.skipped, "seconds": self.seconds,
                "methods": [m.to_dict(self.ratios) for m in self.methods]}


def _choose_engine(engine: str) -> str:
    if engine == "auto":
        import importlib.util

        if os.environ.get("RAY_ADDRESS"):
            return "ray"
        if importlib.util.find_spec("ray") is not None:
            import ray

            return "ray" if ray.is_initialized() else "local"
        return "local"
    if engine not in ("local", "ray"):
        raise UserError(f"unknown engine {engine!r}; use auto, local or ray")
    return engine


def evaluate(cfg: EvalConfig) -> EvalSummary:
    """Plan, score every batch with every method, write the four outputs; see the module docstring."""
    from .shards import require_shards

    t_start = time.perf_counter()
    ratios = tuple(float(r) for r in cfg.ratios)
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise UserError(f"keep ratios must be in (0, 1], got {list(cfg.ratios)}")
    cfg.ratios = ratios
    engine = _choose_engine(cfg.engine)
    shards = require_shards(cfg.shards, storage_options=cfg.shard_storage_options, index_url=cfg.index)
    backbone, loaded = resolve_backbone(cfg)
    specs = method_specs(cfg, loaded)
    plan = plan_batches(shards, cfg.batch_size, cfg.limit, cfg.seed, cfg.shard_storage_options)
    for s in specs:
        if s.limit is not None and s.limit > plan.selected:
            raise UserError(lambda flag: f"--method-limit {s.id}={s.limit} exceeds the {plan.selected} images evaluated; lower it or raise {flag('limit')}")
    if cfg.progress:
        print(f"eval: {plan.selected} images of {plan.available} in {len(plan.batches)} batches; methods: "
              + ", ".join(s.label + (f" (N={s.limit})" if s.limit else "") for s in specs) + f"; engine {engine}",
              file=sys.stderr, flush=True)

    collected = _Collector()
    progress = _Progress(plan.selected, cfg.progress)

    def on_batch(decoded: DecodedBatch, result: dict | None) -> None:
        collected(decoded, result)
        progress.update(len(decoded.keys) + len(decoded.skipped))

    t_eval = time.perf_counter()
    engine_info: dict[str, Any] = {"name": engine, "batch_size": cfg.batch_size, "fold_batchnorm": cfg.fold_batchnorm}
    if engine == "local":
        device = _pick_device(cfg.device)
        evaluator = Evaluator(backbone, specs, ratios, forward_batch=cfg.batch_size, road=cfg.road,
                              road_percentiles=cfg.road_percentiles, road_seed=cfg.road_seed, device=device,
                              keep_maps=cfg.save_maps, fold_batchnorm=cfg.fold_batchnorm)
        try:
            run_local(plan, evaluator, backbone.preprocessing, cfg.shard_storage_options, cfg.decode_workers, on_batch)
        finally:
            evaluator.close()
        engine_info.update(device=device, torch_threads=torch.get_num_threads(), decode_workers=cfg.decode_workers)
    else:
        engine_info.update(run_ray(plan, cfg, backbone, specs, on_batch))
        engine_info["device"] = "cuda" if engine_info["gpus_per_actor"] else "cpu"
    eval_seconds = time.perf_counter() - t_eval
    res = aggregate(collected, specs, ratios)

    class_names = None
    if backbone.num_classes == 1000:
        from .classes import imagenet_classes

        class_names = list(imagenet_classes())
    report = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "protocol": protocol_dict(ratios, len(res.keys)),
        "data": {"shards": cfg.shards, "index": cfg.index, "available": plan.available, "selected": plan.selected,
                 "evaluated": len(res.keys), "limit": cfg.limit, "seed": cfg.seed, "skipped": res.skipped},
        "backbone": backbone.describe(),
        "methods": {m.id: m.to_dict(ratios) for m in res.methods},
        "subsets": {str(lim): subset_table(res, lim) for lim in sorted({s.limit for s in specs if s.limit})},
        "seeds": {"subset": cfg.seed, "rise": cfg.rise_seed, "random_map": cfg.random_seed, "road": cfg.road_seed,
                  "per_batch": "random map and ROAD noise seeded by SeedSequence([seed, batch_id])"},
        "engine": engine_info,
        "timings": {"total_seconds": time.perf_counter() - t_start, "evaluation_seconds": eval_seconds,
                    "clean_forward_seconds": res.clean_seconds, "clean_forwards": res.clean_forwards,
                    "images_per_second": len(res.keys) / eval_seconds if eval_seconds > 0 else None},
        "versions": _versions(),
        "config": cfg.public(),
    }
    if cfg.road:
        report["road"] = {"percentiles": list(cfg.road_percentiles), "seed": cfg.road_seed,
                          "cost_per_image": f"{2 * len(cfg.road_percentiles) + 1} forwards + {2 * len(cfg.road_percentiles)} sparse linear solves"}
    # the markdown states the wall time; measure it last, then write every file (each atomically)
    report["timings"]["total_seconds"] = time.perf_counter() - t_start
    so = cfg.out_storage_options
    files = {name: join(cfg.out, name) for name in FILES}
    write_bytes_atomic(files["per_image.csv"], render_csv(res, class_names), so)
    write_bytes_atomic(files["adic.png"], render_chart(res), so)
    write_bytes_atomic(files["results.md"], render_markdown(res, report).encode(), so)
    write_json_atomic(files["results.json"], _jsonable(report), so)
    if cfg.save_maps:
        _save_gallery_maps(collected, specs, join(cfg.out, "maps.npz"), so)
    return EvalSummary(cfg.out, files, len(res.keys), len(res.skipped), time.perf_counter() - t_start, res.methods, ratios)


def _save_gallery_maps(collected: _Collector, specs: Sequence[MethodSpec], url: str, so: StorageOptions) -> None:
    """Every method's map of the first images by rank (NaN where a method's subset left one out)."""
    from .report import save_comparison_maps

    keys, images, ids, probs, maps = [], [], [], [], {s.id: [] for s in specs}
    for bid in sorted(collected.batches):
        decoded, result = collected.batches[bid]
        if not result or "gallery" not in result:
            continue
        for j, i in enumerate(result["gallery"]["index"]):
            keys.append(decoded.keys[i])
            images.append(result["gallery"]["pixels"][j].transpose(1, 2, 0))
            ids.append(int(result["class_ids"][i]))
            probs.append(float(result["Y"][i]))
            for s in specs:
                e = result["methods"].get(s.id, {}).get("maps")
                hit = [] if e is None else list(np.nonzero(e["index"] == i)[0])
                maps[s.id].append(e["maps"][hit[0]] if hit else None)
    if not keys:
        return
    stacked = {}
    for mid, per_image in maps.items():
        shape = next((m.shape for m in per_image if m is not None), None)
        if shape is not None:
            stacked[mid] = np.stack([m if m is not None else np.full(shape, np.nan, np.float32) for m in per_image])
    save_comparison_maps(url, keys=keys, images=np.stack(images), class_ids=np.asarray(ids), probs=np.asarray(probs),
                         maps=stacked, labels={s.id: s.label for s in specs}, storage_options=so)


def _jsonable(obj: Any) -> Any:
    """numpy/tensor values and tuples to JSON types; NaN to None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if obj != obj else float(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _jsonable(obj.tolist())
    return obj


__all__ = [
    "BASELINE_NAMES", "DecodedBatch", "EvalActor", "EvalConfig", "EvalResults", "EvalSummary", "Evaluator", "MethodResult",
    "MethodSpec", "Plan", "PlannedBatch", "aggregate", "batch_seed", "decode_batch", "decode_to_uint8", "evaluate",
    "method_specs", "plan_batches", "read_selected", "resolve_backbone", "run_local", "run_ray", "subset_table",
]
