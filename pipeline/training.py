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

from .fs import absolute
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


from .configs import TrainConfig  # noqa: E402  re-exported: the config lives in the torch-free pipeline.configs


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
    with RunFolder(cfg.out, cfg.storage_options).writing(f"lcam train ({method})"):
        return train_img(cfg) if method == "img" else train_fm_placed(cfg)


__all__ = [
    "CHECKPOINT", "CURVES", "FIXED_ON_RESUME", "METRICS", "RAY_TRAIN_FOLDER", "RunFolder", "StepWindow", "TrainConfig", "TrainSummary",
    "backbone_for_cache", "build_image_dataset", "check_config", "crop_flip", "crop_seed", "decode_for_training", "epoch_record",
    "fm_batches", "history_until", "image_batches", "initial_attention", "plot_curves", "ray_train_storage", "read_training_rows",
    "resolve_recipe", "train", "train_fm", "train_fm_placed", "train_img", "trainer_state_from_checkpoint",
]
