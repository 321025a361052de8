"""Distributed feature extraction: WebDataset shards -> Ray Data -> Zarr feature cache.

One unit of work = one source shard (:func:`pipeline.raykit.run_shard_stage`):

1. read: one CPU task per shard reads its tar as raw bytes (count checked against the
   shard index) and hands it on in parts of ``DECODE_PART_ROWS`` samples;
2. decode + preprocess: one CPU task per part, every image to RGB uint8 pixels, failures
   kept as rows with a reason instead of crashing the job;
3. the frozen backbone in an actor (one per GPU of the cluster, with autocast and
   channels-last there; else one CPU actor) takes a shard's parts as they finish decoding
   (the model starts on the first), runs the model and writes the shard's group into the
   cache itself (deterministic, so a re-run rewrites
   the same objects; one writer per group);
4. the driver receives only the manifest entry (keys count, skipped images) and alone
   records it in the manifest. Feature arrays never reach the driver.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

# the config lives in the torch-free pipeline.configs (lcam extract --help reads it)
from ..configs import ExtractConfig
from ..decoders import Decoder, stage_decoding
from ..device import autocast_dtype, pad_lone_image
from ..fs import absolute
from ..options import validate
from ..progress import Progress, skipped_lines
from ..raykit import (
    ShardWorker,
    StageStats,
    actor_device,
    actor_pool,
    ensure_ray,
    repin_threads,
    run_shard_stage,
    shard_stage_decoding,
)
from ..shard_tasks import shard_parts
from ..store.feature_cache import FeatureCache
from ..store.integrity import KeyOwners

log = logging.getLogger(__name__)

IN_FLIGHT_BATCHES = (
    4  # batches of rows read/decoded or queued per actor, at least (run_shard_stage's min_rows_in_flight)
)


@dataclass
class ExtractSummary:
    cache: str
    fingerprint: str
    shards_total: int
    shards_done_before: int
    shards_extracted: int
    images: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed_shards: list[dict[str, str]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ray_startup_seconds: float = 0.0
    steady_images_per_second: float = 0.0  # from the first finished shard to the end: no start-up
    stage: StageStats | None = None  # what the driver received (metadata only) and where the actors ran

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["images_per_second"] = round(self.images_per_second, 2)
        return out

    def lines(self) -> list[str]:
        out = [
            f"cache {self.cache} (fingerprint {self.fingerprint})",
            f"shards: {self.shards_total} in the dataset, {self.shards_done_before} already cached, {self.shards_extracted} extracted now",
            f"images: {self.images} in {self.seconds:.1f}s ({self.images_per_second:.3g} images/s overall, "
            + (
                f"{self.steady_images_per_second:.3g} in steady state"
                if self.steady_images_per_second > 0
                else "no steady state: one shard"
            )  # the rate after the first shard needs a second one
            + f"; Ray start-up {self.ray_startup_seconds:.1f}s)",
        ]
        out += skipped_lines(self.skipped, "images", "see the cache manifest")
        for f in self.failed_shards:
            out.append(f"FAILED shard {f['url']}: {f['reason']}")
        if self.failed_shards:
            out.append(
                "failed shards are recorded in the cache manifest (`lcam cache info`); re-run the same command to retry them"
            )
        out += [f"notice: {n}" for n in self.notices]
        return out


def check_config(cfg: ExtractConfig) -> None:
    """Mistakes in the settings, found before anything is read, created or started: the
    declared choices and ranges and ``ExtractConfig.check`` (:func:`pipeline.options.validate`)."""
    validate(cfg)


def cache_identity(backbone: Any, views: Sequence[str], dtype: str, decoder: Decoder | None = None) -> dict[str, Any]:
    """What makes two caches interchangeable: backbone + weights digest, layer, preprocessing, dtype, views,
    and the decoder when it gives other crops than ``pil`` (absent otherwise: older caches still match)."""
    ident = backbone.describe()
    ident["layer"] = "features"
    ident["views"] = list(views)
    ident["dtype"] = dtype
    if decoder is not None and decoder.identity() is not None:
        ident["decoder"] = decoder.identity()
    return ident


def open_cache_for(backbone: Any, cfg: ExtractConfig, decoder: Decoder | None = None) -> FeatureCache:
    """The cache ``cfg`` names, for features decoded by ``decoder`` (None: the one a cluster
    without GPUs resolves ``cfg``'s choice to)."""
    if decoder is None:
        decoder = stage_decoding(cfg.decoder, cfg.decode_on, 0.0)[0]
    return FeatureCache.create_or_open(
        cfg.cache,
        cache_identity(backbone, cfg.views, cfg.dtype, decoder),
        feature_shape=backbone.feature_shape,
        views=cfg.views,
        dtype=cfg.dtype,
        store_logits=cfg.store_logits,
        num_classes=backbone.num_classes,
        storage_options=cfg.cache_storage_options,
    )


class BackboneRunner:
    """The frozen backbone: (n, V, 3, H, W) uint8 -> features, top-5, logits (one batch)."""

    def __init__(
        self, backbone: str, weights: str, precision: str, store_logits: bool, dtype: str, torch_threads: int | None
    ) -> None:
        import torch

        from lcam import build_backbone

        self.torch = torch
        self.device, self.threads = actor_device(torch_threads)
        # BatchNorm folded into the convolutions: the same features (identity unchanged), faster;
        # channels-last weights and input: faster on GPU, and 1.5-2x on CPU (depthwise convs)
        self.model = build_backbone(backbone, weights).folded().to(self.device).to(memory_format=torch.channels_last)
        self.autocast = autocast_dtype(precision, self.device)
        self.store_logits = store_logits
        self.out_dtype = {"float16": np.float16, "float32": np.float32, "bfloat16": np.float32}[dtype]
        # cast by torch on the model's device: ~20x faster than numpy's astype on CPU (6.6 vs ~0.3 ms
        # a 32-image batch), half the bytes off a GPU, and the same IEEE round-to-nearest-even
        self.out_torch_dtype = torch.float16 if self.out_dtype == np.float16 else torch.float32

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        repin_threads(self.threads)
        pixels = batch["pixels"]
        n, v = pixels.shape[:2]
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        c, h, w = self.model.feature_shape
        feats = np.zeros((n, v, c, h, w), dtype=self.out_dtype)
        top5_c = np.full((n, 5), -1, dtype=np.int32)
        top5_p = np.zeros((n, 5), dtype=np.float32)
        logits_out = np.zeros((n, self.model.num_classes if self.store_logits else 0), dtype=np.float16)
        if ok.any():
            x = torch.from_numpy(pixels[ok].reshape(-1, *pixels.shape[2:])).to(self.device, non_blocking=True)
            x = x.float().div_(255.0).contiguous(memory_format=torch.channels_last)
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None),
            ):
                f, logits = self.model.extract(pad_lone_image(x))
                f, logits = f[: len(x)], logits[: len(x)]
            f = f.float().reshape(int(ok.sum()), v, c, h, w)
            logits = logits.float().reshape(int(ok.sum()), v, -1)[:, 0]  # top-5 of the centre view
            probs = logits.softmax(1)
            p5, c5 = probs.topk(5, dim=1)
            feats[ok] = f.to(self.out_torch_dtype).cpu().numpy()
            top5_c[ok] = c5.cpu().numpy().astype(np.int32)
            top5_p[ok] = p5.cpu().numpy()
            if self.store_logits:
                logits_out[ok] = logits.half().cpu().numpy()
        return {"features": feats, "top5_classes": top5_c, "top5_probs": top5_p, "logits": logits_out}


class ExtractWorker(ShardWorker):
    """The extraction's actor: a shard's decoded parts -> the backbone -> its group in the cache.

    Returns the manifest entry only. The cache ships as URL + options (picklable)."""

    WRITE_ATTEMPTS = 3  # storage hiccups (OSError): the group is rewritten whole, so retrying is safe

    def __init__(
        self,
        cache: FeatureCache,
        backbone: str,
        weights: str,
        precision: str,
        store_logits: bool,
        dtype: str,
        torch_threads: int | None,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.cache = cache
        self.runner = BackboneRunner(backbone, weights, precision, store_logits, dtype, torch_threads)
        self.batch_size = batch_size

    def process(self, item: dict[str, Any], *parts: Any) -> dict[str, Any]:
        url = item["url"]
        run = self.run_parts(parts, self.runner, self.batch_size)
        if run.failed:
            return {"url": url, "failed": run.failed}
        batch, n = run.columns, run.rows
        keep = batch["error"] == ""
        skipped = [
            {"key": str(k), "reason": str(e), "shard": url} for k, e in zip(batch["key"][~keep], batch["error"][~keep])
        ]
        keys, labels = [str(k) for k in batch["key"][keep]], batch["label"][keep]
        cols = {
            k: run.outputs[k][keep] if run.outputs else None
            for k in ("features", "top5_classes", "top5_probs", "logits")
        }
        del run, parts  # only the features are kept until written
        if not keep.any():  # every image undecodable: an empty group (verify counts them as skipped)
            V, (C, h, w) = len(self.cache.views), self.cache.feature_shape
            cols = {
                "features": np.zeros((0, V, C, h, w), np.float32),
                "top5_classes": np.zeros((0, 5), np.int32),
                "top5_probs": np.zeros((0, 5), np.float32),
                "logits": np.zeros((0, self.cache.num_classes), np.float16),
            }
        for attempt in range(1, self.WRITE_ATTEMPTS + 1):
            try:
                entry = self.cache.write_shard(
                    url,
                    keys=keys,
                    labels=labels,
                    features=cols["features"],
                    top5_classes=cols["top5_classes"],
                    top5_probs=cols["top5_probs"],
                    logits=cols["logits"] if self.cache.store_logits else None,
                )
                break
            except OSError:
                if attempt == self.WRITE_ATTEMPTS:
                    raise
                time.sleep(attempt)
        entry.update(skipped=skipped, expected_count=n, node_id=self.node_id())
        return entry


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Run (or resume) an extraction; returns a summary. Idempotent: done shards are skipped."""
    from lcam import build_backbone

    from ..shards.read import require_shards

    t_start = time.perf_counter()
    check_config(cfg)
    # Absolute local paths: the cache records shard URLs, and later stages (and Ray workers
    # in other folders) must name the same shards the same way.
    cfg = dataclasses.replace(
        cfg,
        cache=absolute(cfg.cache),
        shards=[absolute(s) for s in cfg.shards] if isinstance(cfg.shards, list) else absolute(cfg.shards),
    )
    shards = require_shards(cfg.shards, storage_options=cfg.shard_storage_options, index_url=cfg.index)
    backbone = build_backbone(cfg.backbone, cfg.weights)
    decoder, in_actor, ray_seconds = shard_stage_decoding(cfg.decoder, cfg.decode_on, cfg.num_actors)
    cache = open_cache_for(backbone, cfg, decoder)
    done = cache.done_sources()
    todo = [s for s in shards if s.url not in done]
    summary = ExtractSummary(cfg.cache, cache.fingerprint, len(shards), len(shards) - len(todo), 0)
    summary.ray_startup_seconds = ray_seconds
    if not todo:
        summary.seconds = time.perf_counter() - t_start
        return summary

    # Indexed counts recorded as planned (index-less ones with each commit): `cache verify`
    # then judges the cache rightly after any interruption, not only after a whole run.
    cache.record_counts({s.url: s.count for s in todo if s.count is not None})
    for other in cache.leases.others():
        log.warning(
            "another extraction into %s is running or was killed (host %s, pid %s, started %s, %s shards to do): "
            "both do the same shards, and the cache stays consistent; stop one to save the work",
            cache.url,
            other.get("host"),
            other.get("pid"),
            other.get("started"),
            other.get("todo"),
        )
        summary.notices.append(
            f"another extraction into this cache started {other.get('started')} on {other.get('host')} (pid {other.get('pid')})"
        )
    lease = cache.leases.take({"todo": len(todo)})
    preprocessing = backbone.preprocessing
    del backbone  # the actors build their own; free the driver's copy
    try:
        return _run(cfg, cache, preprocessing, todo, summary, (decoder, in_actor))
    finally:
        cache.leases.drop(lease)


def _run(
    cfg: ExtractConfig,
    cache: FeatureCache,
    preprocessing: Any,
    todo: list[Any],
    summary: ExtractSummary,
    decoding: tuple[Decoder, bool],
) -> ExtractSummary:
    summary.ray_startup_seconds += ensure_ray()
    known = cache.manifest.get("expected_counts", {})
    total = sum((s.count if s.count is not None else known.get(s.url, 0)) for s in todo) or None
    items = [
        {"url": s.url, "name": s.name, "count": s.count if s.count is not None else -1, "sha256": s.sha256 or ""}
        for s in todo
    ]
    actors, gpus = actor_pool(cfg.num_actors)
    decoder, in_actor = decoding
    progress = Progress(total, cfg.progress, what="extract")
    t_pipe = time.perf_counter()
    counts: dict[str, int] = {}
    schemes = {s.url: s.labels_scheme for s in todo}  # what the labels mean, for training's --target label
    first_count = 0

    owners = KeyOwners(cache)  # the keys of the done shards: a shard repeating one fails at its commit

    def committed(entry: dict[str, Any]) -> None:  # driver: metadata in, manifest out
        nonlocal first_count
        url = entry["url"]
        clash = owners.clash(url, cache.group_keys(entry["shard_id"]))
        if clash:
            failed(url, clash)
            return
        counts[url] = int(entry["expected_count"])
        entry["labels_scheme"] = schemes.get(url)
        cache.mark_done([entry])
        summary.shards_extracted += 1
        summary.images += int(entry["count"])
        summary.skipped += entry["skipped"]
        first_count = first_count or int(entry["expected_count"])
        progress.update(int(entry["expected_count"]))

    def failed(url: str, reason: str) -> None:
        summary.failed_shards.append({"url": url, "reason": reason})
        cache.mark_failed({url: reason})  # in the manifest at once: verify and info list them, a re-run retries them

    stats = run_shard_stage(
        items,
        lambda item: shard_parts(
            item,
            storage_options=cfg.shard_storage_options,
            preprocessing=preprocessing,
            views=cfg.views,
            part_rows=cfg.decode_batch_size,
            decoder=decoder,
            in_actor=in_actor,
        ),
        ExtractWorker,
        (
            cache,
            cfg.backbone,
            cfg.weights,
            cfg.precision,
            cfg.store_logits,
            cfg.dtype,
            cfg.torch_threads,
            cfg.batch_size,
        ),
        actors=actors,
        gpus=gpus,
        on_result=committed,
        on_failure=failed,
        # as a DataLoader's default prefetch (2 workers x 2 batches): small shards still keep
        # the decode that far ahead of the model
        min_rows_in_flight=IN_FLIGHT_BATCHES * cfg.batch_size,
    )
    progress.close()
    summary.stage = stats
    # The index's counts, and for shards made elsewhere the counts of this first pass:
    # `cache verify` checks against them from now on.
    indexed = {s.url: s.count for s in todo if s.count is not None}
    cache.record_counts({**{u: n for u, n in counts.items() if u not in indexed}, **indexed})
    summary.seconds = time.perf_counter() - t_pipe
    if stats.first_result_at is not None and stats.last_result_at and stats.last_result_at > stats.first_result_at:
        # from the first finished shard on: no Ray or model start-up (needs >= 2 shards)
        summary.steady_images_per_second = (sum(counts.values()) - first_count) / (
            stats.last_result_at - stats.first_result_at
        )
    return summary
