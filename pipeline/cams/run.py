"""Bulk CAMs: a trained L-CAM over a whole dataset, into a Zarr v3 CAM store.

Two sources, one store format:

* a **feature cache** (:mod:`pipeline.store.feature_cache`): no image is read; per chunk of cached F
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

Modules: :mod:`pipeline.cams.explainer` (the Python API, the class selection),
:mod:`pipeline.store.cam_store` (the store), :mod:`pipeline.cams.from_cache` and
:mod:`pipeline.cams.from_shards` (the two sources); this one holds the job's configuration, its
summary and the dispatcher (:func:`generate_cams`).

The fingerprint covers the checkpoint's weights, the source's features (the cache's
fingerprint, or the backbone and preprocessing for images), the class selection and
the stored arrays: a re-run with the same settings resumes (done shards are skipped),
one with other settings is refused rather than mixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..classes import ClassSelection
from ..device import resolve_device
from ..errors import UserError
from ..progress import skipped_lines
from ..raykit import shard_stage_decoding
from ..store.cam_store import CamStore
from ..store.leases import announce_writers
from .explainer import checkpoint_fingerprint
from .from_cache import cams_from_cache, cams_from_cache_on_ray
from .from_shards import cams_from_shards

# ---------------------------------------------------------------- bulk generation
log = logging.getLogger(__name__)

from ..configs import CamsConfig  # noqa: E402


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
    remade_damaged: list[str] = field(default_factory=list)  # done shards found damaged at the start: re-made
    notices: list[str] = field(default_factory=list)  # e.g. another writer into the same store
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

    def commit(self, store: CamStore, entry: dict[str, Any]) -> None:
        """The driver's half of a written group: its manifest entry in, then the counts."""
        store.mark_done([entry])
        self.shards_written += 1
        self.samples += int(entry["count"])
        self.maps += int(entry["count"]) * store.width
        self.skipped += entry["skipped"]

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
            + (
                f"; {self.steady_maps_per_second:.1f} maps/s after the {self.actors_ready_seconds:.0f}s start-up)"
                if self.actors_ready_seconds
                else ")"
            ),
        ]
        if self.ran_on:
            nodes = Counter(n[:12] for n in self.ran_on)
            out.append(
                f"model actors: {len(self.ran_on)} on Ray node(s) " + ", ".join(f"{n} (x{c})" for n, c in nodes.items())
            )
        out += skipped_lines(self.skipped, "samples", "see the store's manifest (manifest/zarr.json)")
        for url in self.remade_damaged:
            out.append(f"re-made damaged shard {url} (objects were missing)")
        out += [f"notice: {n}" for n in self.notices]
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
    from ..options import validate
    from ..placement import resolve_where
    from ..train.checkpoints import check_backbone, checkpoint_file, load_checkpoint, load_lcam

    cfg = dataclasses.replace(
        cfg, checkpoint=checkpoint_file(cfg.checkpoint, cfg.checkpoint_storage_options)
    )  # a run folder: its checkpoint.pt

    validate(cfg)  # the declared choices and ranges, one source, a class selection that parses (CamsConfig.check)
    selection = ClassSelection.parse(cfg.classes, cfg.top_k, cfg.class_ids)
    _check_colormap(cfg.colormap)
    on_ray = cfg.cache is not None and resolve_where(cfg.where) == "ray"
    # The model is built where it runs: here for a cache without Ray; otherwise the actors
    # build it, and the driver (on a cluster, the CPU-only head) reads only the checkpoint's
    # small dict. Weights given by --weights are still checked here against the checkpoint's
    # digest, before anything is written.
    model = None
    ckpt = load_checkpoint(cfg.checkpoint, cfg.checkpoint_storage_options)
    selection.validate(
        int(ckpt["backbone"]["num_classes"])
    )  # a class id out of range answers before the model is built
    if (cfg.cache is not None and not on_ray) or cfg.weights:
        device = resolve_device(cfg.device) if cfg.cache is not None and not on_ray else "cpu"
        model, ckpt = load_lcam(cfg.checkpoint, cfg.checkpoint_storage_options, weights=cfg.weights, device=device)
    backbone = ckpt["backbone"]
    if cfg.class_names is not None or cfg.overlays:  # a bad names file fails now, not after the work
        from ..classes import class_names_options, load_class_names

        load_class_names(
            cfg.class_names,
            class_names_options(cfg.class_names, cfg.source_storage_options),
            int(backbone["num_classes"]),
        )
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
        from ..store.feature_cache import FeatureCache

        cache = FeatureCache.open(cfg.cache, cfg.source_storage_options)
        check_backbone(ckpt, cache.identity, f"the feature cache {cfg.cache}")
        if cfg.view not in cache.views:
            raise UserError(
                f"view {cfg.view!r} is not in the feature cache {cfg.cache} (it holds {', '.join(cache.views)}); pick one of those"
            )
        if len(cache) == 0:
            raise UserError(
                f"the feature cache {cfg.cache} holds no samples (no shard is done); run `lcam extract` into it first"
            )
        if selection.mode == "label":
            _require_labels(cache)
        identity["source"] = {"kind": "cache", "fingerprint": cache.fingerprint, "view": cfg.view}
        store = CamStore.create_or_open(
            cfg.out,
            identity,
            checkpoint_url=cfg.checkpoint,
            source_url=cfg.cache,
            storage_options=cfg.out_storage_options,
            class_coverage=None if coverage is None else coverage.tolist(),
        )
        entries = [cache.manifest["shards"][u] for u in sorted(cache.done_sources())]  # the cache's own order
        todo, summary = _resume(store, entries, lambda e: e["url"], f"feature cache {cache.url}")
        with _writing(store, summary, todo):
            if on_ray:
                if todo:
                    cams_from_cache_on_ray(cfg, cache, store, selection, todo, summary)
            elif todo:
                cams_from_cache(cfg, model, cache, store, selection, todo, summary)
    else:
        shards = _list_existing_shards(cfg)
        identity["source"] = {"kind": "images", "preprocessing": backbone["preprocessing"], "view": "center"}
        decoder, in_actor, ray_seconds = shard_stage_decoding(cfg.decoder, cfg.decode_on, cfg.num_actors)
        decoded_by = decoder.identity()
        if decoded_by is not None:  # only then: stores made with pil keep their fingerprint
            identity["source"]["decoder"] = decoded_by
        store = CamStore.create_or_open(
            cfg.out,
            identity,
            checkpoint_url=cfg.checkpoint,
            source_url=str(cfg.shards),
            storage_options=cfg.out_storage_options,
            class_coverage=None if coverage is None else coverage.tolist(),
        )
        todo, summary = _resume(store, shards, lambda s: s.url, f"shards {cfg.shards}")
        summary.ray_startup_seconds += ray_seconds
        with _writing(store, summary, todo):
            if todo:
                cams_from_shards(cfg, ckpt, store, selection, todo, summary, (decoder, in_actor))

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


def _resume(store: CamStore, sources: list[Any], url_of: Any, what: str) -> tuple[list[Any], CamsSummary]:
    """The sources still to do (a re-run skips done shards; damaged ones are forgotten first, so
    re-made) and the run's summary, for either source (feature cache entries or shards)."""
    remade = _forget_damaged(store)
    done = store.done_sources()
    todo = [src for src in sources if url_of(src) not in done]
    summary = CamsSummary(
        store.url, store.fingerprint, what, len(sources), len(sources) - len(todo), remade_damaged=remade
    )
    return todo, summary


def _forget_damaged(store: CamStore) -> list[str]:
    """Done shards with lost objects (one listing of the store) are forgotten, so this run re-makes them."""
    damaged = store.damage_scan()
    for url, what in sorted(damaged.items()):
        log.warning("CAM store %s: shard %s is damaged (%s); re-making it", store.url, url, what)
    return store.forget(sorted(damaged)) if damaged else []


@contextlib.contextmanager
def _writing(store: CamStore, summary: CamsSummary, todo: list[Any]) -> Iterator[None]:
    """This run's writer lease on the store (another writer is named in the summary), and
    the shards that failed recorded in the manifest (``cams info`` lists them, a re-run retries)."""
    summary.notices += announce_writers(store.leases, "CAM generation", store.url)
    lease = store.leases.take({"what": "CAM generation", "todo": len(todo)}) if todo else None
    try:
        yield
    finally:
        if lease is not None:
            store.leases.drop(lease)
        store.mark_failed({f["url"]: f["reason"] for f in summary.failed_shards})


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
    raise UserError(
        f"classes 'label' was asked for, but no sample of the feature cache {cache.url} has a label; use classes 'predicted', 'top-k' or 'ids'"
    )


def _list_existing_shards(cfg: CamsConfig) -> list[Any]:
    """The source shards, with a clear error for a pattern that matches nothing or a missing shard."""
    from ..fs import get_fs
    from ..shards.read import require_shards

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
        raise UserError(
            f"{len(missing)} of {len(shards)} shards are missing: {', '.join(missing[:10])}{more}; restore them or leave them out of the pattern"
        )
    if sum(s.count or 0 for s in shards) == 0 and all(s.count is not None for s in shards):
        raise UserError(f"the shards {cfg.shards!r} hold no samples (their index says 0)")
    return shards
