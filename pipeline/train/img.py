"""L-CAM-Img: a Ray Train ``TorchTrainer`` of N data-parallel workers (DDP over the
attention mechanism; gloo on CPU, NCCL on GPUs), fed by a Ray Data pipeline streaming the
WebDataset shards (read -> decode -> resize, plus the cached feature maps of the clean
centre crop when a matching cache is given). The random 224 crop and flip are drawn in the
worker from a generator seeded by (seed, epoch, key), so the augmentation of every image is
reproducible."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from typing import Any, Mapping, Sequence

import torch

from ..configs import TrainConfig  # torch-free, no loop with pipeline.train.run
from ..decoders import resolve_decoder
from ..device import autocast_dtype
from ..errors import UserError
from ..fs import StorageOptions, absolute, get_fs, join
from ..progress import say
from .checkpoints import load_checkpoint
from .img_data import build_image_dataset, crop_seed, image_batches
from .run_folder import (
    CHECKPOINT,
    CURVES,
    METRICS,
    RunFolder,
    StepWindow,
    best_epoch,
    epoch_record,
    format_epoch,
    history_until,
    trainer_state_from_checkpoint,
    validation_fields,
)
from .setup import TrainStart, TrainSummary, export_fill, initial_attention
from .split import split_held_back

# Ray Train's dataset names: the training shards, and the held-back ones that pick best.pt
TRAIN, VAL = "train", "val"


# ---------------------------------------------------------------- L-CAM-Img: the Ray Train worker loop
def _img_worker_loop(config: dict[str, Any]) -> None:
    import itertools

    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from lcam import LCAM, build_backbone
    from lcam.recipe import Recipe
    from lcam.training import LCAMTrainer, MetricSums

    start: TrainStart = config["start"]
    cfg, plan = start.cfg, config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    backbone = build_backbone(plan["backbone"], plan["weights"])
    if backbone.weights_digest() != plan["identity"]["weights_digest"]:
        raise RuntimeError(f"worker {rank} built other weights for {plan['backbone']} than the driver")
    recipe = Recipe(**plan["run"]["recipe"])
    attention, inherited = initial_attention(backbone, plan["run"], cfg.storage_options)
    fill = export_fill(plan["run"], attention)  # copies the start before training moves it
    decay_start = {k: v.detach().clone() for k, v in attention.state_dict().items()}  # recipe.decay_to "start"
    model = LCAM(backbone, attention)

    def ddp(module: torch.nn.Module) -> torch.nn.Module:
        # The backbone's BatchNorm statistics never change: no buffer sync at every forward
        # (torch >= 2.14 names it forward_sync_buffers; broadcast_buffers is deprecated there).
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        key = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={key: False})

    trainer = LCAMTrainer(
        model,
        "img",
        recipe,
        plan["steps_per_epoch"],
        device=device,
        autocast_dtype=autocast_dtype(cfg.precision, device, allow_fp16=False),
        wrap=ddp,
        top_k=int(plan["run"].get("top_k", 1)),
        start=decay_start,
    )
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
    elif start.ckpt is not None:  # the checkpoint the driver read, shipped with the start
        ckpt = start.ckpt
    if ckpt is not None:
        trainer.load_state_dict(trainer_state_from_checkpoint(ckpt))
        history = history_until(ckpt["metrics"], trainer.global_step)
        if rank != 0:  # the saved partial-epoch sums are global: count them once in the all-reduce
            trainer.running = MetricSums()
    progress = config.get("progress_queue")
    shard = ray.train.get_dataset_shard(TRAIN)
    held_back = ray.train.get_dataset_shard(VAL) if plan["validate"] else None

    def validate() -> torch.Tensor | None:
        """The exported attention (untrained rows filled, row prior applied) on this worker's part
        of the held-back images, summed over the workers; every worker takes part (a collective)."""
        if held_back is None:
            return None
        state = trainer.state_dict()
        exported = fill(state["attention"], trainer.coverage).state if fill is not None else state["attention"]
        rows = held_back.iter_batches(batch_size=plan["worker_batch"], batch_format="numpy", prefetch_batches=2)
        batches = image_batches(
            rows,
            augment="center",
            crop=backbone.preprocessing.crop,
            seed=plan["run"]["seed"],
            epoch=0,
            target=plan["run"]["target"],
            skipped=[],
            top_k=trainer.top_k,
        )
        total = trainer.evaluate(batches, exported).to_tensor()
        if world > 1:
            dist.all_reduce(total)
        return total

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
                progress.put_nowait(
                    {
                        "epoch": tr.epoch,
                        "batch": tr.batch_in_epoch,
                        "steps": tr.steps_per_epoch,
                        "loss": stats.loss,
                        "t": last_sent - t_epoch,
                        "global_batch": stats.n * world,
                    }
                )

        rows = shard.iter_batches(
            batch_size=plan["worker_batch"],
            batch_format="numpy",
            prefetch_batches=2,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=crop_seed(plan["run"]["seed"], epoch, f"rank{rank}") % (2**31)
            if cfg.shuffle_buffer
            else None,
        )
        batches = image_batches(
            rows,
            augment=plan["run"]["augment"],
            crop=backbone.preprocessing.crop,
            seed=plan["run"]["seed"],
            epoch=epoch,
            target=plan["run"]["target"],
            skipped=skipped,
            top_k=trainer.top_k,
        )
        # A mid-epoch checkpoint (max steps) resumes with the epoch's remaining number of steps;
        # which images those are is up to Ray Data's streaming split (not reproducible).
        batches = itertools.islice(batches, trainer.steps_per_epoch - trainer.batch_in_epoch)
        sums = trainer.train_epoch(batches, max_steps=cfg.max_steps, on_step=on_step)
        stopped = sums is None
        total = (trainer.running if stopped else sums).to_tensor()
        seconds = time.perf_counter() - t_epoch  # the training's, as L-CAM-Fm's records give it
        val_total = None if stopped else validate()
        n_skipped = torch.tensor([float(len(skipped))], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(n_skipped)
        metrics: dict[str, Any] = {
            "epoch": trainer.epoch,
            "step": trainer.global_step,
            "stopped": stopped,
            "skipped": int(n_skipped.item()),
        }
        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                if not stopped:
                    rec = epoch_record(
                        trainer.epoch,
                        trainer.global_step,
                        MetricSums.from_tensor(total),
                        lr_used[0],
                        seconds,
                        workers=world,
                        skipped=int(n_skipped.item()),
                        **(validation_fields(MetricSums.from_tensor(val_total)) if val_total is not None else {}),
                    )
                    history.append(rec)
                    metrics.update(rec)
                state = trainer.state_dict()
                if stopped:
                    state["running"] = MetricSums.from_tensor(total).to_dict()
                kw = dict(
                    method="img",
                    backbone=plan["identity"],
                    cache_fingerprint=plan["cache_fingerprint"],
                    config=plan["run"],
                    history=history,
                    fill=fill,
                )
                chosen = best_epoch(history)  # without a held-back part: None, best.pt is the last epoch
                best = not stopped and (chosen is None or chosen == trainer.epoch)
                run_dir.save(state, epoch_end=not stopped, best=best, keep=cfg.keep, **kw)
                run_dir.write_metrics(history)
                RunFolder(tmp).save(state, epoch_end=False, **kw)  # the same file for Ray Train's own restarts
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if progress is not None:
                    progress.put_nowait({"epoch_done": metrics})
            ray.train.report(metrics, checkpoint=checkpoint)  # every worker: it is a barrier
        if stopped:
            break


# ---------------------------------------------------------------- L-CAM-Img: the driver
def held_back_data_config() -> Any:
    """Ray Train's dataset split: the training stream as Ray Train splits it (``equal``: every
    worker the same number of steps, the remainder dropped), the held-back images split
    unequally, so that the validation loss counts every one of them."""
    from ray.train import DataConfig

    class HeldBackSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[override]
            rest = {k: v for k, v in datasets.items() if k != VAL}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if VAL in datasets:
                for i, split in enumerate(datasets[VAL].streaming_split(world_size, equal=False)):
                    out[i][VAL] = split
            return out

    return HeldBackSplit(datasets_to_split=[TRAIN])


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


def shards_named(shards: str | Sequence[str]) -> str:
    """The training shards as errors name them: the pattern given, or a resumed run's list by its size."""
    return f"the shards {shards}" if isinstance(shards, str) else f"the run's {len(shards)} shards"


def _shard_counts(shards: Sequence[Any], storage_options: StorageOptions) -> list[Any]:
    """Counts from the index; shards without one are read once to count (reported)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..shards.format import ShardInfo
    from ..shards.read import read_shard

    unknown = [s for s in shards if s.count is None]
    if not unknown:
        return list(shards)
    say(f"train: {len(unknown)} shard(s) have no index entry; reading them once to count their samples")
    with ThreadPoolExecutor(4) as pool:
        counts = dict(zip([s.url for s in unknown], pool.map(lambda s: len(read_shard(s, storage_options)), unknown)))
    return [s if s.count is not None else ShardInfo(s.url, s.name, counts[s.url], s.sha256) for s in shards]


def _img_cache(cfg: TrainConfig, augment: str, backbone: Any, shards: Sequence[Any]):
    """The feature cache that gives pass 1, checked to hold exactly these features; else None."""
    from ..store.feature_cache import FeatureCache

    if not cfg.cache:
        return None, 0
    assert augment == "center", "check_config refuses a cache with random crops"
    cache = FeatureCache.open(cfg.cache, cfg.cache_storage_options)
    ident, mine = cache.identity, backbone.describe()
    for fld in ("backbone", "weights_digest", "preprocessing", "feature_shape"):
        if json.dumps(ident.get(fld), sort_keys=True) != json.dumps(mine.get(fld), sort_keys=True):
            raise UserError(
                lambda flag: (
                    f"the feature cache {cache.url} was made for other features ({fld}: cache {ident.get(fld)}, "
                    f"training {mine.get(fld)}); use a cache of this backbone and preprocessing, or drop {flag('cache')}"
                )
            )
    if "center" not in cache.views:
        raise UserError(
            lambda flag: (
                f"the feature cache {cache.url} holds views {list(cache.views)}, not the centre crop; drop {flag('cache')}"
            )
        )
    done = cache.done_sources()
    missing = [s.url for s in shards if s.url not in done]
    if missing:
        raise UserError(
            lambda flag: (
                f"{len(missing)} of {len(shards)} shards are not in the feature cache {cache.url} (e.g. {missing[0]}); "
                f"extract them first (`lcam extract` with the same shard URLs), or drop {flag('cache')}"
            )
        )
    return cache, cache.views.index("center")


def progress_line(msg: Mapping[str, Any], epochs: int) -> str | None:
    """The driver's line for one message rank 0 sends: step progress with rate and ETA, or
    the epoch's summary (None for an epoch without a loss: a stopped one)."""
    if "epoch_done" in msg:
        m = msg["epoch_done"]
        return format_epoch(m) if "loss" in m else None
    rate = msg["batch"] / max(msg["t"], 1e-9)
    eta = (msg["steps"] - msg["batch"]) / rate if rate > 0 else float("nan")
    return (
        f"train: epoch {msg['epoch'] + 1}/{epochs} step {msg['batch']}/{msg['steps']}, loss {msg['loss']:.3f}, "
        f"{rate * msg['global_batch']:.1f} images/s, ETA {eta:.0f}s"
    )


def train_img(cfg: TrainConfig) -> TrainSummary:
    """Train L-CAM-Img with Ray Train over ``cfg.workers`` data-parallel workers."""
    return run_img(TrainStart.from_config(cfg, "img"))


def run_img(start: TrainStart) -> TrainSummary:
    """The L-CAM-Img run from its :class:`TrainStart`: Ray Train over ``cfg.workers`` data-parallel workers."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lcam import build_backbone

    from ..placement import LogRelay, raise_user_errors
    from ..raykit import ensure_ray
    from ..shards.read import require_shards

    t0 = time.perf_counter()
    cfg, run_dir, ckpt, augment = start.cfg, start.run_dir, start.ckpt, start.augment
    shards = require_shards(cfg.shards, storage_options=cfg.shard_storage_options, index_url=cfg.index)
    name = cfg.backbone or (ckpt["backbone"]["backbone"] if ckpt else None)
    weights = cfg.weights or (ckpt["backbone"].get("weights") if ckpt else None)
    if name is None and cfg.cache:
        from ..store.feature_cache import FeatureCache

        ident = FeatureCache.open(cfg.cache, cfg.cache_storage_options).identity
        name, weights = ident["backbone"], weights or ident.get("weights")
    backbone = build_backbone(name or "efficientnet_lite0", weights or "default")
    ident = backbone.describe()
    cache, view_index = _img_cache(cfg, augment, backbone, shards)
    shards = sorted(_shard_counts(shards, cfg.shard_storage_options), key=lambda s: s.url)
    # the held-back part: the same rule (and, over the same shards, the same images) as L-CAM-Fm's
    split = split_held_back([s.url for s in shards], cfg, ckpt, shards_named(cfg.shards))
    by_url = {s.url: s for s in shards}
    val_part = [by_url[u] for u in split.held]
    shards = [by_url[u] for u in split.train]
    # a bad --init / --init-from / --uncovered fails here, before Ray starts
    run_plan = start.begin(
        backbone,
        sum(s.count for s in shards),
        {
            "shards": sorted(by_url),  # every shard given: a resume splits them again as recorded below
            "cache": cache.url if cache else None,
            "workers": cfg.workers,
            **split.run_fields(),
        },
        cache.fingerprint if cache is not None else None,
    )
    recipe, run_cfg = run_plan.recipe, run_plan.run_cfg
    if recipe.batch_size % cfg.workers:  # a resumed run's batch size (a new run's is checked by check_config)
        raise UserError(
            lambda flag: (
                f"the batch size {recipe.batch_size} is the global batch: it must split evenly over {cfg.workers} workers; "
                f"change {flag('workers')}"
            )
        )
    total = sum(s.count for s in shards)
    worker_batch = recipe.batch_size // cfg.workers
    per_worker = total // cfg.workers  # Ray Train splits with equal=True: the remainder rows are dropped
    if per_worker < 1:
        raise UserError(lambda flag: f"{total} images cannot feed {cfg.workers} workers; lower {flag('workers')}")
    steps_per_epoch = math.ceil(per_worker / worker_batch)
    if run_plan.reexport_only:
        # a finished run resumed with another --uncovered / --row-prior: re-export only, no Ray Train
        run_dir.save(
            trainer_state_from_checkpoint(ckpt),
            method="img",
            backbone=ident,
            cache_fingerprint=ckpt.get("cache_fingerprint"),
            config=run_cfg,
            history=list(ckpt["metrics"]),
            epoch_end=True,
            best=True,
            keep=cfg.keep,
            fill=run_plan.fill,
        )
        pos = ckpt["extra"]["position"]
        say(
            enabled=cfg.progress,
            line=f"L-CAM-Img: {cfg.out} re-exported (--uncovered {run_cfg['uncovered']}, --row-prior {run_cfg['row_prior']:g}), no step",
        )
        return TrainSummary(
            cfg.out,
            "img",
            int(pos["epoch"]),
            recipe.epochs,
            int(pos["global_step"]),
            False,
            None,
            time.perf_counter() - t0,
            run_dir.path(CHECKPOINT),
            run_dir.path(METRICS),
            run_dir.path(CURVES),
            int(pos["global_step"]),
        )

    ensure_ray()
    use_gpu = bool(ray.cluster_resources().get("GPU", 0)) if cfg.use_gpu is None else cfg.use_gpu
    data_kw = dict(
        cache=cache,
        view_index=view_index,
        storage_options=cfg.shard_storage_options,
        decode_batch_size=cfg.decode_batch_size,
        data_cpus=cfg.data_cpus,
        decoder=resolve_decoder(cfg.decoder, device="cpu"),  # Ray Data's decode tasks are CPU tasks
    )
    datasets = {TRAIN: build_image_dataset(shards, backbone.preprocessing, run_cfg["augment"], **data_kw)}
    if val_part:  # the clean centre crop, as explained later; every worker evaluates its part
        datasets[VAL] = build_image_dataset(val_part, backbone.preprocessing, "center", **data_kw)
    del backbone  # the workers build their own
    plan = {
        "backbone": ident["backbone"],
        "weights": ident["weights"],
        "identity": ident,
        "run": run_cfg,
        "steps_per_epoch": steps_per_epoch,
        "worker_batch": worker_batch,
        "cache_fingerprint": cache.fingerprint if cache else None,
        "validate": bool(val_part),
    }
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}

    def show(msg: Mapping[str, Any]) -> None:
        line = progress_line(msg, recipe.epochs)
        if line is not None:
            say(line)

    storage_path, storage_fs = ray_train_storage(cfg)
    relay = LogRelay(cfg.progress, handle=show)  # rank 0's messages (none with --no-progress) as lines
    trainer = TorchTrainer(
        _img_worker_loop,
        train_loop_config={"start": start, "plan": plan, "progress_queue": relay.queue},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"lcam-img-{uuid.uuid4().hex[:8]}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets=datasets,
        dataset_config=held_back_data_config(),
    )
    say(
        enabled=cfg.progress,
        line=f"L-CAM-Img: {total} images in {len(shards)} shards, {cfg.workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), "
        f"{steps_per_epoch} steps/epoch of {recipe.batch_size} ({worker_batch} per worker), lr {recipe.lr:g} ({recipe.schedule}), "
        f"augment {run_cfg['augment']}, pass 1 {'from the cache' if cache else 'by the backbone'}"
        + (
            f"; {sum(s.count for s in val_part)} images in {len(val_part)} held-back shards pick best.pt"
            if val_part
            else ""
        ),
    )
    try:
        with raise_user_errors():  # a worker's UserError: one line, as in-process
            trainer.fit()
    finally:
        relay.close()
    history = run_dir.read_metrics()
    best_path, best_at = run_dir.finish(history, f"L-CAM-Img, {ident['backbone']}, {cfg.workers} worker(s)")
    final = load_checkpoint(run_dir.path(CHECKPOINT), cfg.storage_options)
    pos = final["extra"]["position"]
    epochs_rec = [r for r in history if r["kind"] == "epoch"]
    return TrainSummary(
        cfg.out,
        "img",
        int(pos["epoch"]),
        recipe.epochs,
        int(pos["global_step"]),
        int(pos["batch_in_epoch"]) > 0,
        epochs_rec[-1] if epochs_rec else None,
        time.perf_counter() - t0,
        run_dir.path(CHECKPOINT),
        run_dir.path(METRICS),
        run_dir.path(CURVES),
        ckpt["step"] if ckpt else 0,
        skipped=int(epochs_rec[-1].get("skipped", 0)) if epochs_rec else 0,
        best=best_path,
        best_epoch=best_at,
    )
