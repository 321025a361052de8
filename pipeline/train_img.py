"""L-CAM-Img: a Ray Train ``TorchTrainer`` of N data-parallel workers (DDP over the
attention mechanism; gloo on CPU, NCCL on GPUs), fed by a Ray Data pipeline streaming the
WebDataset shards (read -> decode -> resize, plus the cached feature maps of the clean
centre crop when a matching cache is given). The random 224 crop and flip are drawn in the
worker from a generator seeded by (seed, epoch, key), so the augmentation of every image is
reproducible."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import json
import os
import tempfile
import time
import uuid
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .checkpoints import CheckpointMismatch, check_backbone, check_cache, load_checkpoint
from .device import autocast_dtype
from .errors import UserError
from .fs import StorageOptions, absolute, get_fs, join
from .progress import say
from .run_folder import CHECKPOINT, CURVES, METRICS, RunFolder, StepWindow, epoch_record, format_epoch, history_until, trainer_state_from_checkpoint
from .train_setup import TrainSummary, check_config, export_changed, export_fill, export_start, initial_attention, resolve_recipe

from .configs import TrainConfig  # torch-free, no loop with pipeline.training

# ---------------------------------------------------------------- L-CAM-Img: Ray Data stages
def crop_seed(seed: int, epoch: int, key: str) -> int:
    """Seed of one image's random crop and flip in one epoch: independent of workers and order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def crop_flip(resized: np.ndarray, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random ``crop`` x ``crop`` window of an already resized (H, W, 3) uint8 image,
    flipped with p=0.5: (3, crop, crop) in [0, 1]. Draws top, left, flip in the order of
    :func:`pipeline.images.random_crop_flip`, so both give the same view for the same generator."""
    h, w = resized.shape[:2]
    top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    out = torch.from_numpy(np.ascontiguousarray(resized[top : top + crop, left : left + crop])).permute(2, 0, 1).float().div_(255)
    return out.flip(-1) if flip else out


def read_training_rows(item: dict[str, Any], storage_options: StorageOptions = None, cache: Any = None, view_index: int = 0) -> list[dict[str, Any]]:
    """One shard -> one row per sample; with a cache, each row carries its cached F (clean centre crop)."""
    from .shards import ShardInfo, read_shard

    info = ShardInfo(url=item["url"], name=item["name"], count=item["count"] if item["count"] >= 0 else None)
    samples = read_shard(info, storage_options=storage_options)  # a damaged shard fails the run, loudly
    cached: dict[str, tuple[np.ndarray, int]] = {}
    if cache is not None:
        from .cache import shard_id_for

        sid = shard_id_for(item["url"])
        for ci in range(cache.num_chunks(sid)):
            chunk = cache.read_chunk(sid, ci, fields=["features", "top5_classes"])
            for k, f, t5 in zip(chunk["keys"], chunk["features"][:, view_index], chunk["top5_classes"]):
                cached[k] = (f, int(t5[0]))
    rows = []
    for s in samples:
        row = {"key": s.key, "label": int(s.label), "image": s.image, "top1": -1, "error": ""}
        if cache is not None:
            f, top1 = cached.get(s.key, (None, -1))
            if f is None:  # skipped at extraction (undecodable): it fails decoding here too
                f = np.zeros(cache.feature_shape, dtype=np.float16)
                row["error"] = "not in the feature cache (skipped at extraction)"
            row["features"], row["top1"] = f, top1
        rows.append(row)
    return rows


def decode_for_training(batch: dict[str, np.ndarray], preprocessing: Any, augment: str) -> dict[str, Any]:
    """CPU stage: bytes -> RGB -> the 256 resize (``random``: the worker crops) or centre crop 224, uint8."""
    from PIL import Image

    from .images import decode_pil, preprocess, resized_size

    n = len(batch["key"])
    errors = [str(e) for e in batch["error"]]
    pixels: list[np.ndarray] = []
    for i in range(n):
        out = None
        if not errors[i]:
            try:
                im = decode_pil(batch["image"][i])
                if augment == "center":
                    out = (preprocess(im, preprocessing, "center") * 255).round().byte().permute(1, 2, 0).numpy()
                else:
                    size = resized_size(im.width, im.height, preprocessing.resize)
                    out = np.asarray(im.resize(size, Image.BILINEAR))  # the resize of random_crop_flip
            except Exception as exc:  # DecodeError and whatever PIL raises on odd files
                errors[i] = f"decode: {exc}"
        pixels.append(out if out is not None else np.zeros((preprocessing.crop, preprocessing.crop, 3), dtype=np.uint8))
    res: dict[str, Any] = {k: batch[k] for k in batch if k not in ("image", "error")}
    if augment == "center":
        res["pixels"] = np.stack(pixels)
    else:  # variable sizes: an object array becomes a variable-shaped tensor column
        arr = np.empty(n, dtype=object)
        arr[:] = pixels
        res["pixels"] = arr
    res["error"] = np.array(errors, dtype=object).astype(str)
    return res


def build_image_dataset(shards: Sequence[Any], preprocessing: Any, augment: str, *, cache: Any = None, view_index: int = 0,
                        storage_options: StorageOptions = None, decode_batch_size: int = 16, data_cpus: float = 1.0):
    """Ray Dataset of training rows: shards in a new random order each epoch, read, decoded."""
    import ray

    items = [{"url": s.url, "name": s.name, "count": s.count if s.count is not None else -1} for s in shards]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .randomize_block_order()
        .flat_map(read_training_rows, fn_kwargs={"storage_options": storage_options, "cache": cache, "view_index": view_index}, num_cpus=data_cpus)
        .map_batches(decode_for_training, fn_kwargs={"preprocessing": preprocessing, "augment": augment},
                     batch_size=decode_batch_size, batch_format="numpy", num_cpus=data_cpus)
    )


def image_batches(rows: Iterable[Mapping[str, np.ndarray]], *, augment: str, crop: int, seed: int, epoch: int, target: str,
                  skipped: list[str], top_k: int = 1) -> Iterator[Any]:
    """Worker side: numpy row batches -> :class:`lcam.training.TrainBatch` (undecodable rows dropped and listed)."""
    from lcam.training import TrainBatch

    for b in rows:
        ok = np.array([not e for e in b["error"]], dtype=bool)
        keys = [str(k) for k in b["key"]]
        skipped.extend(k for k, good in zip(keys, ok) if not good)
        if not ok.any():  # skipping the step on one worker only would hang the others' gradient all-reduce
            raise UserError(f"every image of a training batch failed to decode ({', '.join(keys[:3])}, ...: {b['error'][0]}); "
                            "re-pack the shards (lcam shards) so that undecodable files are left out")
        if augment == "center":
            images = torch.from_numpy(np.ascontiguousarray(b["pixels"][ok])).permute(0, 3, 1, 2).float().div_(255)
        else:
            images = torch.stack([
                crop_flip(np.asarray(p), crop, torch.Generator().manual_seed(crop_seed(seed, epoch, k)))
                for p, k, good in zip(b["pixels"], keys, ok) if good
            ])
        feats = torch.from_numpy(np.asarray(b["features"][ok], dtype=np.float32)) if "features" in b else None
        if target == "label":
            labels = np.asarray(b["label"])[ok]
            if (labels < 0).any():
                bad = [k for k, good, lab in zip(keys, ok, b["label"]) if good and lab < 0][:3]
                raise UserError(lambda flag: f"sample {bad[0]!r} has no label; train with {flag('target')} predicted (the backbone's top-1) or give the data labels")
            targets = torch.from_numpy(labels.astype(np.int64))
        elif feats is not None and top_k == 1:
            targets = torch.from_numpy(np.asarray(b["top1"])[ok].astype(np.int64))  # the cache's top-1, as for L-CAM-Fm
        else:
            targets = None  # the trainer takes the top-1 (top-K) from its first pass
        yield TrainBatch(targets=targets, feats=feats, images=images)


# ---------------------------------------------------------------- L-CAM-Img: the Ray Train worker loop
def _img_worker_loop(config: dict[str, Any]) -> None:
    import itertools

    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from lcam import LCAM, build_backbone
    from lcam.recipe import Recipe
    from lcam.training import LCAMTrainer, MetricSums

    cfg: TrainConfig = config["cfg"]
    plan: dict[str, Any] = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    backbone = build_backbone(plan["backbone"], plan["weights"])
    if backbone.weights_digest() != plan["identity"]["weights_digest"]:
        raise RuntimeError(f"worker {rank} built other weights for {plan['backbone']} than the driver")
    recipe = Recipe(**plan["run"]["recipe"])
    attention, inherited = initial_attention(backbone, plan["run"], cfg.storage_options)
    fill = export_fill(plan["run"], attention)  # copies the start before training moves it
    start = {k: v.detach().clone() for k, v in attention.state_dict().items()}  # for recipe.decay_to "start"
    model = LCAM(backbone, attention)

    def ddp(module: torch.nn.Module) -> torch.nn.Module:
        # The backbone's BatchNorm statistics never change: no buffer sync at every forward
        # (torch >= 2.14 names it forward_sync_buffers; broadcast_buffers is deprecated there).
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={key: False})

    trainer = LCAMTrainer(model, "img", recipe, plan["steps_per_epoch"], device=device,
                          autocast_dtype=autocast_dtype(cfg.precision, device, allow_fp16=False), wrap=ddp, top_k=int(plan["run"].get("top_k", 1)),
                          start=start)
    if inherited is not None:
        trainer.max_counts = inherited.long().clone()
    if world > 1:
        def all_reduce_counts(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            dist.all_reduce(t)
            return t.cpu()

        trainer.reduce_counts = all_reduce_counts
    run_dir = RunFolder(cfg.out, cfg.storage_options)
    history: list[dict[str, Any]] = []
    ckpt = None
    ray_ckpt = ray.train.get_checkpoint()  # set when Ray Train restarted the workers after a failure
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            ckpt = load_checkpoint(os.path.join(d, CHECKPOINT))
    elif plan["resume"]:
        ckpt = load_checkpoint(run_dir.path(CHECKPOINT), cfg.storage_options)
    if ckpt is not None:
        trainer.load_state_dict(trainer_state_from_checkpoint(ckpt))
        history = history_until(ckpt["metrics"], trainer.global_step)
        if rank != 0:  # the saved partial-epoch sums are global: count them once in the all-reduce
            trainer.running = MetricSums()
    progress = config.get("progress_queue")
    shard = ray.train.get_dataset_shard("train")
    skipped: list[str] = []
    while trainer.epoch < recipe.epochs:
        window, t_epoch, last_sent, lr_used = StepWindow(), time.perf_counter(), 0.0, [trainer.lr]
        epoch = trainer.epoch

        def on_step(tr: LCAMTrainer, stats: Any) -> None:
            nonlocal last_sent
            window.add(stats)
            lr_used[0] = stats.lr
            if rank == 0 and cfg.log_every and tr.global_step % cfg.log_every == 0:
                history.append(window.record(tr.epoch, tr.global_step, tr.steps_per_epoch, stats.lr))
            if rank == 0 and progress is not None and time.perf_counter() - last_sent > 2.0:
                last_sent = time.perf_counter()
                progress.put_nowait({"epoch": tr.epoch, "batch": tr.batch_in_epoch, "steps": tr.steps_per_epoch,
                                     "loss": stats.loss, "t": last_sent - t_epoch, "global_batch": stats.n * world})

        rows = shard.iter_batches(batch_size=plan["worker_batch"], batch_format="numpy", prefetch_batches=2,
                                  local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                  local_shuffle_seed=crop_seed(plan["run"]["seed"], epoch, f"rank{rank}") % (2**31) if cfg.shuffle_buffer else None)
        batches = image_batches(rows, augment=plan["run"]["augment"], crop=backbone.preprocessing.crop, seed=plan["run"]["seed"],
                                epoch=epoch, target=plan["run"]["target"], skipped=skipped, top_k=trainer.top_k)
        # A mid-epoch checkpoint (max steps) resumes with the epoch's remaining number of steps;
        # which images those are is up to Ray Data's streaming split (not reproducible).
        batches = itertools.islice(batches, trainer.steps_per_epoch - trainer.batch_in_epoch)
        sums = trainer.train_epoch(batches, max_steps=cfg.max_steps, on_step=on_step)
        stopped = sums is None
        total = (trainer.running if stopped else sums).to_tensor()
        n_skipped = torch.tensor([float(len(skipped))], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(n_skipped)
        metrics: dict[str, Any] = {"epoch": trainer.epoch, "step": trainer.global_step, "stopped": stopped, "skipped": int(n_skipped.item())}
        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                if not stopped:
                    rec = epoch_record(trainer.epoch, trainer.global_step, MetricSums.from_tensor(total), lr_used[0],
                                       time.perf_counter() - t_epoch, workers=world, skipped=int(n_skipped.item()))
                    history.append(rec)
                    metrics.update(rec)
                state = trainer.state_dict()
                if stopped:
                    state["running"] = MetricSums.from_tensor(total).to_dict()
                kw = dict(method="img", backbone=plan["identity"], cache_fingerprint=plan["cache_fingerprint"], config=plan["run"], history=history, fill=fill)
                # no validation part here: best.pt is the last epoch
                run_dir.save(state, epoch_end=not stopped, best=not stopped, keep=cfg.keep, **kw)
                run_dir.write_metrics(history)
                RunFolder(tmp).save(state, epoch_end=False, **kw)  # the same file for Ray Train's own restarts
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if progress is not None:
                    progress.put_nowait({"epoch_done": metrics})
            ray.train.report(metrics, checkpoint=checkpoint)  # every worker: it is a barrier
        if stopped:
            break


# ---------------------------------------------------------------- L-CAM-Img: the driver
RAY_TRAIN_FOLDER = "ray-train"


def ray_train_storage(cfg: TrainConfig) -> tuple[str, Any]:
    """Ray Train's ``(storage_path, storage_filesystem)``: ``cfg.ray_storage``, by default
    ``<out>/ray-train``, the run's own URL.

    On a multi-node cluster Ray Train's checkpoints must land where every worker and the
    driver can reach them; the run folder is that place by construction (S3, GCS, or a
    local path on one machine or shared mount). Object stores get a pyarrow filesystem
    over the run's fsspec filesystem, so the run's storage options (endpoint, region,
    anonymous access) apply (tests/test_placement.py: nothing Ray Train writes there
    holds them).
    """
    import pyarrow.fs

    url = absolute(cfg.ray_storage or join(cfg.out, RAY_TRAIN_FOLDER))
    fs, path = get_fs(url, cfg.storage_options)
    if "://" not in url:
        return path, None  # local: Ray Train's own local filesystem
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _shard_counts(shards: Sequence[Any], storage_options: StorageOptions) -> list[Any]:
    """Counts from the index; shards without one are read once to count (reported)."""
    from concurrent.futures import ThreadPoolExecutor

    from .shards import ShardInfo, read_shard

    unknown = [s for s in shards if s.count is None]
    if not unknown:
        return list(shards)
    say(f"train: {len(unknown)} shard(s) have no index entry; reading them once to count their samples")
    with ThreadPoolExecutor(4) as pool:
        counts = dict(zip([s.url for s in unknown], pool.map(lambda s: len(read_shard(s, storage_options)), unknown)))
    return [s if s.count is not None else ShardInfo(s.url, s.name, counts[s.url], s.sha256) for s in shards]


def _img_cache(cfg: TrainConfig, augment: str, backbone: Any, shards: Sequence[Any]):
    """The feature cache that gives pass 1, checked to hold exactly these features; else None."""
    from .cache import FeatureCache

    if not cfg.cache:
        return None, 0
    assert augment == "center", "check_config refuses a cache with random crops"
    cache = FeatureCache.open(cfg.cache, cfg.cache_storage_options)
    ident, mine = cache.identity, backbone.describe()
    for fld in ("backbone", "weights_digest", "preprocessing", "feature_shape"):
        if json.dumps(ident.get(fld), sort_keys=True) != json.dumps(mine.get(fld), sort_keys=True):
            raise UserError(lambda flag: f"the feature cache {cache.url} was made for other features ({fld}: cache {ident.get(fld)}, "
                            f"training {mine.get(fld)}); use a cache of this backbone and preprocessing, or drop {flag('cache')}")
    if "center" not in cache.views:
        raise UserError(lambda flag: f"the feature cache {cache.url} holds views {list(cache.views)}, not the centre crop; drop {flag('cache')}")
    done = cache.done_sources()
    missing = [s.url for s in shards if s.url not in done]
    if missing:
        raise UserError(lambda flag: f"{len(missing)} of {len(shards)} shards are not in the feature cache {cache.url} (e.g. {missing[0]}); "
                        f"extract them first (`lcam extract` with the same shard URLs), or drop {flag('cache')}")
    return cache, cache.views.index("center")


def progress_line(msg: Mapping[str, Any], epochs: int) -> str | None:
    """The driver's line for one message rank 0 sends: step progress with rate and ETA, or
    the epoch's summary (None for an epoch without a loss: a stopped one)."""
    if "epoch_done" in msg:
        m = msg["epoch_done"]
        return format_epoch(m) if "loss" in m else None
    rate = msg["batch"] / max(msg["t"], 1e-9)
    eta = (msg["steps"] - msg["batch"]) / rate if rate > 0 else float("nan")
    return (f"train: epoch {msg['epoch'] + 1}/{epochs} step {msg['batch']}/{msg['steps']}, loss {msg['loss']:.3f}, "
            f"{rate * msg['global_batch']:.1f} images/s, ETA {eta:.0f}s")


def train_img(cfg: TrainConfig) -> TrainSummary:
    """Train L-CAM-Img with Ray Train over ``cfg.workers`` data-parallel workers."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lcam import build_backbone

    from .placement import LogRelay, raise_user_errors
    from .raykit import ensure_ray
    from .shards import require_shards

    t0 = time.perf_counter()
    check_config(dataclasses.replace(cfg, method="img"))
    run_dir = RunFolder(cfg.out, cfg.storage_options)
    ckpt = run_dir.checkpoint_for_start(cfg.resume)
    augment = cfg.augment or (ckpt["config"].get("augment") if ckpt else None) or "random"
    check_config(dataclasses.replace(cfg, method="img", augment=augment))  # a resumed run's augmentation against --cache
    shards = require_shards(cfg.shards, storage_options=cfg.shard_storage_options, index_url=cfg.index)
    name = cfg.backbone or (ckpt["backbone"]["backbone"] if ckpt else None)
    weights = cfg.weights or (ckpt["backbone"].get("weights") if ckpt else None)
    if name is None and cfg.cache:
        from .cache import FeatureCache

        ident = FeatureCache.open(cfg.cache, cfg.cache_storage_options).identity
        name, weights = ident["backbone"], weights or ident.get("weights")
    backbone = build_backbone(name or "efficientnet_lite0", weights or "default")
    ident = backbone.describe()
    cache, view_index = _img_cache(cfg, augment, backbone, shards)
    if ckpt is not None:
        if ckpt["method"] != "img":
            raise CheckpointMismatch(f"the checkpoint in {cfg.out} is an L-CAM-{ckpt['method'].capitalize()} run, not L-CAM-Img")
        check_backbone(ckpt, ident)
        if cache is not None:
            check_cache(ckpt, cache.fingerprint)
    shards = _shard_counts(shards, cfg.shard_storage_options)
    recipe, run_cfg = resolve_recipe(cfg, "img", backbone.name, ckpt, samples=sum(s.count for s in shards))
    if recipe.batch_size % cfg.workers:  # a resumed run's batch size (a new run's is checked by check_config)
        raise UserError(lambda flag: f"the batch size {recipe.batch_size} is the global batch: it must split evenly over {cfg.workers} workers; "
                                     f"change {flag('workers')}")
    total = sum(s.count for s in shards)
    worker_batch = recipe.batch_size // cfg.workers
    per_worker = total // cfg.workers  # Ray Train splits with equal=True: the remainder rows are dropped
    if per_worker < 1:
        raise UserError(lambda flag: f"{total} images cannot feed {cfg.workers} workers; lower {flag('workers')}")
    steps_per_epoch = math.ceil(per_worker / worker_batch)
    run_cfg.update(shards=[s.url for s in shards], cache=cache.url if cache else None, workers=cfg.workers)
    if ckpt is not None and int(ckpt["epoch"]) >= recipe.epochs and export_changed(ckpt["config"], run_cfg):
        # a finished run resumed with another --uncovered / --row-prior: re-export only, no Ray Train
        run_dir.save(trainer_state_from_checkpoint(ckpt), method="img", backbone=ident, cache_fingerprint=ckpt.get("cache_fingerprint"),
                     config=run_cfg, history=list(ckpt["metrics"]), epoch_end=True, best=True, keep=cfg.keep,
                     fill=export_fill(run_cfg, export_start(backbone, run_cfg, cfg.storage_options)))
        pos = ckpt["extra"]["position"]
        say(enabled=cfg.progress, line=f"L-CAM-Img: {cfg.out} re-exported (--uncovered {run_cfg['uncovered']}, --row-prior {run_cfg['row_prior']:g}), no step")
        return TrainSummary(cfg.out, "img", int(pos["epoch"]), recipe.epochs, int(pos["global_step"]), False, None,
                            time.perf_counter() - t0, run_dir.path(CHECKPOINT), run_dir.path(METRICS), run_dir.path(CURVES), int(pos["global_step"]))

    ensure_ray()
    use_gpu = bool(ray.cluster_resources().get("GPU", 0)) if cfg.use_gpu is None else cfg.use_gpu
    ds = build_image_dataset(shards, backbone.preprocessing, run_cfg["augment"], cache=cache, view_index=view_index,
                             storage_options=cfg.shard_storage_options, decode_batch_size=cfg.decode_batch_size, data_cpus=cfg.data_cpus)
    if ckpt is None:
        # a bad --init / --init-from / --uncovered fails here, before Ray starts
        export_fill(run_cfg, initial_attention(backbone, run_cfg, cfg.storage_options)[0])
    del backbone  # the workers build their own
    plan = {"backbone": ident["backbone"], "weights": ident["weights"], "identity": ident, "run": run_cfg, "steps_per_epoch": steps_per_epoch,
            "worker_batch": worker_batch, "resume": ckpt is not None, "cache_fingerprint": cache.fingerprint if cache else None}
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}

    def show(msg: Mapping[str, Any]) -> None:
        line = progress_line(msg, recipe.epochs)
        if line is not None:
            say(line)

    relay = LogRelay(cfg.progress, handle=show)  # rank 0's messages (none with --no-progress) as lines
    storage_path, storage_fs = ray_train_storage(cfg)
    trainer = TorchTrainer(
        _img_worker_loop,
        train_loop_config={"cfg": cfg, "plan": plan, "progress_queue": relay.queue},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"lcam-img-{uuid.uuid4().hex[:8]}", storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=0), checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets={"train": ds},
    )
    say(enabled=cfg.progress, line=f"L-CAM-Img: {total} images in {len(shards)} shards, {cfg.workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), "
         f"{steps_per_epoch} steps/epoch of {recipe.batch_size} ({worker_batch} per worker), lr {recipe.lr:g} ({recipe.schedule}), "
         f"augment {run_cfg['augment']}, pass 1 {'from the cache' if cache else 'by the backbone'}")
    try:
        with raise_user_errors():  # a worker's UserError: one line, as in-process
            trainer.fit()
    finally:
        relay.close()
    history = run_dir.read_metrics()
    run_dir.write_curves(history, f"L-CAM-Img, {ident['backbone']}, {cfg.workers} worker(s)")
    final = load_checkpoint(run_dir.path(CHECKPOINT), cfg.storage_options)
    pos = final["extra"]["position"]
    epochs_rec = [r for r in history if r["kind"] == "epoch"]
    return TrainSummary(cfg.out, "img", int(pos["epoch"]), recipe.epochs, int(pos["global_step"]), int(pos["batch_in_epoch"]) > 0,
                        epochs_rec[-1] if epochs_rec else None, time.perf_counter() - t0, run_dir.path(CHECKPOINT),
                        run_dir.path(METRICS), run_dir.path(CURVES), ckpt["step"] if ckpt else 0,
                        skipped=int(epochs_rec[-1].get("skipped", 0)) if epochs_rec else 0)
