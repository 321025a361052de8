"""Data, run folder and Ray Train plumbing around :class:`lcam.training.LCAMTrainer`.

L-CAM-Fm (:func:`train_fm`) trains from the Zarr feature cache through
:class:`pipeline.train.loader.CacheLoader` (whole chunks, shuffled, prefetched, bounded
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

Modules: :mod:`pipeline.train.run_folder` (the run folder, its records and plot),
:mod:`pipeline.train.setup` (config checks, recipe, starting attention, the summary),
:mod:`pipeline.train.fm` and :mod:`pipeline.train.img` (the two methods). This one holds
the dispatch, :func:`train`; the job's configuration is :class:`pipeline.configs.TrainConfig`.
"""

from __future__ import annotations

import dataclasses

from ..configs import TrainConfig  # noqa: E402
from ..fs import absolute
from .fm import train_fm_placed
from .img import run_img
from .run_folder import RunFolder
from .setup import TrainStart, TrainSummary


def train(cfg: TrainConfig) -> TrainSummary:
    """``lcam train``: L-CAM-Fm or L-CAM-Img; on --resume, what is not given comes from the checkpoint
    (:class:`TrainStart`)."""
    # Ray Train workers run in their own trial folders: a relative path would land there.
    cfg = dataclasses.replace(
        cfg,
        out=absolute(cfg.out),
        cache=cfg.cache and absolute(cfg.cache),
        shards=[absolute(s) for s in cfg.shards]
        if isinstance(cfg.shards, list)
        else (cfg.shards and absolute(cfg.shards)),
    )
    start = TrainStart.from_config(cfg)  # checked once, the checkpoint read once
    with RunFolder(cfg.out, cfg.storage_options).writing(f"lcam train ({start.method})"):
        return run_img(start) if start.method == "img" else train_fm_placed(start)
