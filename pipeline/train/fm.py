"""L-CAM-Fm: training from the Zarr feature cache through :class:`pipeline.train.loader.CacheLoader`
(whole chunks, shuffled, prefetched, bounded memory). Its order is a function of (seed,
epoch), so a checkpoint taken after any step resumes exactly. :func:`train_fm_placed` runs
it in this process or as one Ray task that asks for a GPU when the cluster has one
(``where``, :mod:`pipeline.placement`): the same function with the same config, so the
same losses."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

import torch

from ..configs import TrainConfig
from ..device import autocast_dtype, resolve_device
from ..errors import UserError
from ..fs import exists
from ..progress import Progress, say
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
from .setup import RunPlan, TrainStart, TrainSummary, backbone_for_cache
from .split import split_held_back

# a training task lost with its worker or node runs again from its last checkpoint, 3 times in all
LOST_TASK_ATTEMPTS = 3


def fm_batches(loader: Any, start: int, top_k: int = 1) -> Iterator[Any]:
    """CacheLoader batches from ``start`` on, as :class:`lcam.training.TrainBatch`; with
    ``top_k`` > 1 without targets (the trainer takes the top-K of the head on F)."""
    from lcam.training import TrainBatch

    for feats, targets, _keys in loader.iter_from(start):
        yield TrainBatch(targets=targets if top_k == 1 else None, feats=feats)


def train_fm(cfg: TrainConfig) -> TrainSummary:
    """Train L-CAM-Fm from a feature cache (resumable at any step), in this process."""
    return run_fm(TrainStart.from_config(cfg, "fm"))


def run_fm(start: TrainStart) -> TrainSummary:
    """The L-CAM-Fm loop from its :class:`TrainStart`."""
    from ..store.feature_cache import FeatureCache
    from .loader import CacheLoader

    t0 = time.perf_counter()
    cfg = start.cfg
    cache = FeatureCache.open(cfg.cache, cfg.cache_storage_options)
    if len(cache) == 0:
        raise UserError(
            f"the feature cache {cache.url} holds no finished shards yet; run (or finish) `lcam extract` first"
        )
    split = split_held_back(cache.shard_ids(), cfg, start.ckpt, f"the feature cache {cache.url}")
    train_ids, val_ids = split.train, split.held
    backbone = backbone_for_cache(cache, cfg.weights)
    plan = start.begin(
        backbone,
        sum(cache.num_rows(s) for s in train_ids),
        {
            "cache": cache.url,
            "cache_fingerprint": cache.fingerprint,
            "cache_views": list(cache.views),
            **split.run_fields(),
        },
        cache.fingerprint,
        f"the backbone of the cache {cache.url}",
    )
    recipe, run_cfg = plan.recipe, plan.run_cfg
    view: str | int = int(run_cfg["view"]) if str(run_cfg["view"]).isdigit() else run_cfg["view"]
    loader = CacheLoader(
        cache,
        recipe.batch_size,
        seed=run_cfg["seed"],
        target=run_cfg["target"],
        view=view,
        buffer_rows=cfg.buffer_rows,
        prefetch_chunks=cfg.prefetch_chunks,
        num_threads=cfg.loader_threads,
        shard_ids=train_ids,
    )
    # the held-back part: in shard order, its first view (the clean centre crop), no shuffle
    val_loader = (
        CacheLoader(
            cache,
            256,
            shuffle=False,
            target=run_cfg["target"],
            view="first",
            buffer_rows=0,
            prefetch_chunks=cfg.prefetch_chunks,
            num_threads=cfg.loader_threads,
            shard_ids=val_ids,
        )
        if val_ids
        else None
    )
    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        # Per-step work is small: more threads mostly spin, while the loader's threads need cores to decode.
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 2) // 2))
    try:
        return _train_fm_loop(start, plan, cache, backbone, loader, device, t0, val_loader)
    finally:
        torch.set_num_threads(threads_before)


def _train_fm_loop(
    start: TrainStart,
    plan: RunPlan,
    cache: Any,
    backbone: Any,
    loader: Any,
    device: torch.device,
    t0: float,
    val_loader: Any = None,
) -> TrainSummary:
    from lcam import LCAM
    from lcam.training import LCAMTrainer

    cfg, run_dir, ckpt = start.cfg, start.run_dir, start.ckpt
    recipe, run_cfg, attention, inherited = plan.recipe, plan.run_cfg, plan.attention, plan.inherited
    # The exported checkpoint fills rows no sample trained from the start (recomputed on resume).
    fill, decay_start = plan.fill, plan.decay_start
    model = LCAM(backbone, attention)  # resuming: the checkpoint's attention is loaded below
    # Only the head runs per step: full precision unless bf16 is asked for explicitly.
    trainer = LCAMTrainer(
        model,
        "fm",
        recipe,
        len(loader),
        device=device,
        autocast_dtype=autocast_dtype(cfg.precision, device, allow_fp16=False) if cfg.precision != "auto" else None,
        top_k=int(run_cfg.get("top_k", 1)),
        start=decay_start,
    )
    if inherited is not None:
        trainer.max_counts = inherited.long().clone()
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        trainer.load_state_dict(trainer_state_from_checkpoint(ckpt))
        history = history_until(ckpt["metrics"], trainer.global_step)
    resumed_from = trainer.global_step
    ident = backbone.describe()

    last_save = [time.perf_counter()]

    def save(epoch_end: bool, best: bool = False) -> None:
        last_save[0] = time.perf_counter()
        run_dir.save(
            trainer.state_dict(),
            method="fm",
            backbone=ident,
            cache_fingerprint=cache.fingerprint,
            config=run_cfg,
            history=history,
            epoch_end=epoch_end,
            fill=fill,
            best=best,
            keep=cfg.keep,
        )
        run_dir.write_metrics(history)

    def validate() -> dict[str, Any]:
        """The exported attention (untrained rows filled, row prior applied) on the held-back samples."""
        if val_loader is None:
            return {}
        state = trainer.state_dict()
        exported = fill(state["attention"], trainer.coverage).state if fill is not None else state["attention"]
        return validation_fields(trainer.evaluate(fm_batches(val_loader, 0), exported))

    say(
        enabled=cfg.progress,
        line=f"L-CAM-Fm: {len(cache)} cached samples ({backbone.name}, views {list(cache.views)}), {len(loader)} steps/epoch, "
        f"batch {recipe.batch_size}, lr {recipe.lr:g} ({recipe.schedule}), target {run_cfg['target']}"
        + (f" (top-{trainer.top_k})" if trainer.top_k > 1 else "")
        + f", init {run_cfg.get('init', 'random')}, device {device}"
        + (f"; resuming at epoch {trainer.epoch + 1}, step {trainer.global_step}" if ckpt is not None else ""),
    )
    stopped = False
    last: dict[str, Any] | None = next((r for r in reversed(history) if r["kind"] == "epoch"), None)
    if plan.reexport_only:
        save(epoch_end=True)  # a finished run resumed with another --uncovered / --row-prior: re-export only, no step
    while trainer.epoch < recipe.epochs:
        loader.set_epoch(trainer.epoch)
        window, t_epoch, lr_used = StepWindow(), time.perf_counter(), [trainer.lr]
        bar = Progress(
            trainer.steps_per_epoch,
            cfg.progress,
            what=f"epoch {trainer.epoch + 1}/{recipe.epochs}",
            unit="steps",
            every=30.0,
            initial=trainer.batch_in_epoch,
        )

        def on_step(tr: LCAMTrainer, stats: Any) -> None:
            window.add(stats)
            lr_used[0] = stats.lr
            bar.update(1, postfix=f"loss {stats.loss:.3f}")
            if cfg.log_every and tr.global_step % cfg.log_every == 0:
                history.append(window.record(tr.epoch, tr.global_step, tr.steps_per_epoch, stats.lr))
            if (
                cfg.checkpoint_minutes
                and time.perf_counter() - last_save[0] > 60 * cfg.checkpoint_minutes
                and tr.batch_in_epoch < tr.steps_per_epoch
            ):
                save(epoch_end=False)  # exact mid-epoch position: --resume continues from the next batch

        try:
            sums = trainer.train_epoch(
                fm_batches(loader, trainer.batch_in_epoch, trainer.top_k), max_steps=cfg.max_steps, on_step=on_step
            )
        finally:
            bar.close()
        if sums is None:  # max_steps: keep the exact position for --resume
            save(epoch_end=False)
            stopped = True
            break
        last = epoch_record(
            trainer.epoch, trainer.global_step, sums, lr_used[0], time.perf_counter() - t_epoch, **validate()
        )
        history.append(last)
        chosen = best_epoch(history)
        save(epoch_end=True, best=chosen is None or chosen == trainer.epoch)
        say(enabled=cfg.progress, line=format_epoch(last))
    best_path, best_at = run_dir.finish(history, f"L-CAM-Fm, {backbone.name}, cache {cache.fingerprint}")
    return TrainSummary(
        cfg.out,
        "fm",
        trainer.epoch,
        recipe.epochs,
        trainer.global_step,
        stopped,
        last,
        time.perf_counter() - t0,
        run_dir.path(CHECKPOINT),
        run_dir.path(METRICS),
        run_dir.path(CURVES),
        resumed_from,
        best=best_path,
        best_epoch=best_at,
    )


def _fm_task(start: TrainStart | TrainConfig, log_queue: Any) -> TrainSummary:
    """The Ray task of :func:`train_fm_placed`: the same training, its log lines relayed. A
    retry gets the config: the lost attempt's last checkpoint (saved every epoch, or mid-epoch
    at exact positions), if it wrote one, is where it continues: resume is exact (see train_fm)."""
    from ..placement import node_id, relayed_logs

    if not isinstance(start, TrainStart):
        have = exists(RunFolder(start.out, start.storage_options).path(CHECKPOINT), start.storage_options)
        start = TrainStart.from_config(dataclasses.replace(start, resume=have))
    with relayed_logs(log_queue):
        summary = run_fm(start)
    summary.ran_on = node_id()
    return summary


def train_fm_placed(start: TrainStart) -> TrainSummary:
    """L-CAM-Fm where ``cfg.where`` says: in this process, or as one Ray task that asks for a
    GPU when the cluster has one (one CPU elsewhere), so that a job's driver on a CPU-only
    head never trains. The task writes the run folder itself; resume, checkpoints and
    metrics are those of :func:`train_fm`."""
    from ..placement import model_resources, resolve_where, run_task
    from ..raykit import ensure_ray

    cfg = start.cfg
    if resolve_where(cfg.where) == "local":
        return run_fm(start)
    ensure_ray()
    resources = model_resources(cfg.device)
    what = "1 GPU" if resources.get("num_gpus") else f"{resources['num_cpus']:g} CPU"
    say(enabled=cfg.progress, line=f"L-CAM-Fm: training in a Ray task ({what})")

    return run_task(
        _fm_task,
        start,
        resources=resources,
        progress=cfg.progress,
        name="lcam-train-fm",
        attempts=LOST_TASK_ATTEMPTS,
        retry_args=lambda: (cfg,),
    )
