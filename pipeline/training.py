"""Data, run folder and Ray Train plumbing around :class:`lcam.training.LCAMTrainer`.

L-CAM-Fm (:func:`train_fm`) trains from the Zarr feature cache through
:class:`pipeline.loader.CacheLoader` (whole chunks, shuffled, prefetched, bounded
memory). Its order is a function of (seed, epoch), so a checkpoint taken after any
step resumes exactly. :func:`train` runs it in this process or as one Ray task that asks
for a GPU when the cluster has one (``where``, :mod:`pipeline.placement`): the same
function with the same config, so the same losses.

L-CAM-Img (:func:`train_img`) runs a Ray Train ``TorchTrainer``: N data-parallel
workers (DDP over the attention mechanism; gloo on CPU, NCCL on GPUs), fed by a Ray
Data pipeline streaming the WebDataset shards (read -> decode -> resize, plus the
cached feature maps of the clean centre crop when a matching cache is given). The
random 224 crop and flip are drawn in the worker from a generator seeded by
(seed, epoch, key), so the augmentation of every image is reproducible.

Modules: :mod:`pipeline.run_folder` (the run folder, its records and plot),
:mod:`pipeline.train_setup` (config checks, recipe, starting attention, the summary),
:mod:`pipeline.train_fm` and :mod:`pipeline.train_img` (the two methods). This one holds
the job's configuration and :func:`train` (the dispatch), and re-exports the public names.
"""


from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .fs import StorageOptions, absolute
from .run_folder import CHECKPOINT, CURVES, METRICS, RunFolder, StepWindow, epoch_record, history_until, plot_curves, trainer_state_from_checkpoint
from .train_fm import fm_batches, train_fm, train_fm_placed
from .train_img import (
    RAY_TRAIN_FOLDER,
    build_image_dataset,
    crop_flip,
    crop_seed,
    decode_for_training,
    image_batches,
    ray_train_storage,
    read_training_rows,
    train_img,
)
from .train_setup import FIXED_ON_RESUME, TrainSummary, backbone_for_cache, check_config, initial_attention, resolve_recipe


@dataclass
class TrainConfig:
    """Everything ``lcam train`` needs; None means "the per-backbone default" (SPEC 3) or "from the checkpoint"."""

    method: str | None = None  # fm | img (default fm; with --resume: the checkpoint's)
    out: str = "runs/train"  # run folder URL: checkpoints, metrics.jsonl, curves.png
    cache: str | None = None  # feature cache URL (fm: required; img: optional, pass 1 from it)
    shards: str | list[str] | None = None  # img: WebDataset shards (pattern, folder with index.json)
    index: str | None = None  # img: shard index URL (default: index.json beside the shards)
    backbone: str | None = None  # img without cache (default efficientnet_lite0); else from the cache
    weights: str | None = None  # backbone weights (default: what the cache was made with, else "default")
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None  # global batch (split over the img workers)
    # These four and the seed decide the run's trajectory; None: the default for a new run
    # (step, label, random, random, 0), the checkpoint's value on --resume.
    schedule: str | None = None  # step | onecycle
    target: str | None = None  # label | predicted (the backbone's top-1 on the clean image)
    view: str | None = None  # fm: random | first | view index (one of the cached views per sample)
    augment: str | None = None  # img: random (crop 224 of the 256 resize + flip) | center
    seed: int | None = None
    # The attention's start: random (SPEC) | cam (the classifier's weights: untrained rows are CAM);
    # init_from: an L-CAM checkpoint URL whose attention is the start (e.g. L-CAM-Fm for L-CAM-Img).
    init: str | None = None
    init_from: str | None = None
    targets: str | None = None  # single (SPEC: one target per sample) | top-k (the top_k predicted classes)
    top_k: int | None = None  # with targets top-k (default 3)
    recipe_rule: str | None = None  # spec (SPEC section 3 per backbone) | data-size (lcam.recipe.recipe_for_data)
    max_steps: int | None = None  # stop after this many steps in total (quick runs); a checkpoint is kept
    resume: bool = False
    checkpoint_minutes: float = 10.0  # fm: also checkpoint mid-epoch after this long (0: at epoch ends only)
    log_every: int = 20  # steps per metrics record
    device: str = "auto"  # fm: auto | cpu | cuda
    where: str = "auto"  # fm: local (this process) | ray (a Ray task: a GPU when the cluster has one) | auto (pipeline.placement)
    threads: int | None = None  # fm on CPU: torch threads (default half the cores: the rest decode the cache)
    precision: str = "auto"  # auto | fp32 | bf16 (pipeline.device: bf16 autocast on a GPU with bf16, fp32 elsewhere)
    # fm loader
    buffer_rows: int = 2048
    prefetch_chunks: int = 4
    loader_threads: int = 2
    # img / Ray
    workers: int = 1
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: float = 1.0
    data_cpus: float = 1.0  # CPUs per Ray Data read/decode task
    decode_batch_size: int = 16
    shuffle_buffer: int = 256  # img: rows in each worker's local shuffle buffer
    ray_storage: str | None = None  # img: Ray Train's storage URL (default: <out>/ray-train, with the run's storage options)
    storage_options: StorageOptions = None  # for the run folder
    cache_storage_options: StorageOptions = None
    shard_storage_options: StorageOptions = None
    progress: bool = True


def train(cfg: TrainConfig) -> TrainSummary:
    """``lcam train``: L-CAM-Fm or L-CAM-Img; on --resume, what is not given comes from the checkpoint."""
    # Ray Train workers run in their own trial folders: a relative path would land there.
    cfg = dataclasses.replace(
        cfg, out=absolute(cfg.out), cache=cfg.cache and absolute(cfg.cache),
        shards=[absolute(s) for s in cfg.shards] if isinstance(cfg.shards, list) else (cfg.shards and absolute(cfg.shards)),
    )
    if cfg.resume:
        ckpt = RunFolder(cfg.out, cfg.storage_options).checkpoint_for_start(True)
        stored = ckpt["config"]
        cfg = dataclasses.replace(cfg, method=cfg.method or ckpt["method"], cache=cfg.cache or stored.get("cache"),
                                  shards=cfg.shards or stored.get("shards"))
    method = cfg.method or "fm"
    check_config(dataclasses.replace(cfg, method=method))
    return train_img(cfg) if method == "img" else train_fm_placed(cfg)


__all__ = [
    "CHECKPOINT", "CURVES", "FIXED_ON_RESUME", "METRICS", "RAY_TRAIN_FOLDER", "RunFolder", "StepWindow", "TrainConfig", "TrainSummary",
    "backbone_for_cache", "build_image_dataset", "check_config", "crop_flip", "crop_seed", "decode_for_training", "epoch_record",
    "fm_batches", "history_until", "image_batches", "initial_attention", "plot_curves", "ray_train_storage", "read_training_rows",
    "resolve_recipe", "train", "train_fm", "train_fm_placed", "train_img", "trainer_state_from_checkpoint",
]
