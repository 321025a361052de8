"""``Explainer.fit(model, data)``: an L-CAM for any classifier from Python, in memory.

What ``lcam extract`` + ``lcam train --method fm --recipe data-size`` do for a dataset, for
the few hundred or thousand images a notebook holds: the frozen backbone runs once over the
images (their feature maps stay in memory), L-CAM-Fm trains on those with the small-data
recipe (:func:`lcam.recipe.recipe_for_data`), starting from CAM where the head allows it, and
the exported attention fills the rows no image trained as ``lcam train`` does
(:mod:`lcam.uncovered`). Targets: the labels when given (or carried by the data), else the
classifier's own top-1 class (SPEC section 3, ``--target predicted``).

``data`` may be image paths, a folder of images (searched recursively), PIL images, RGB
arrays, encoded bytes, a tensor (N, 3, H, W) in [0, 1] (already the backbone's input size),
a DataLoader (or any iterable) of image tensors or (images, labels) pairs, or WebDataset
shards (a ``.tar`` pattern or a folder with ``index.json``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Sequence

import torch

from lcam import LCAM, Preprocessing
from lcam.backbones.base import Backbone
from lcam.backbones.registry import build_backbone
from lcam.recipe import recipe_for_data
from lcam.training import LCAMTrainer, TrainBatch, init_attention
from lcam.uncovered import fill_uncovered

from ..device import resolve_device
from ..errors import UserError
from ..images import is_one_image, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _folder_images(folder: str) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(out)


def _is_shards(data: str) -> bool:
    return ".tar" in data or (os.path.isdir(data) and os.path.exists(os.path.join(data, "index.json")))


def collect_images(data: Any, prep: Preprocessing) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, 3, crop, crop) in [0, 1] on the CPU, and the labels (N,) when the data carries them (-1: none)."""
    if isinstance(data, (str, os.PathLike)):
        data = os.fspath(data)
        if _is_shards(data):
            from ..images import decode_image, preprocess
            from ..shards.read import iter_samples, require_shards

            images, labels = [], []
            for shard in require_shards(data):
                for s in iter_samples(shard.url):
                    if s.image:
                        images.append(preprocess(decode_image(s.image), prep))
                        labels.append(s.label)
            if not images:
                raise UserError(f"no image in the shards {data}")
            found = torch.tensor(labels)
            return torch.stack(images), found if bool((found >= 0).any()) else None
        if os.path.isdir(data):
            data = _folder_images(data)
            if not data:
                raise UserError("the folder holds no image (.jpg, .jpeg, .png, .webp, .bmp)")
    if is_one_image(data):
        data = [data]
    if isinstance(data, torch.Tensor):
        if data.dim() != 4 or data.shape[1] != 3:
            raise ValueError(f"a tensor of images must be (N, 3, H, W) in [0, 1], got {tuple(data.shape)}")
        return (data.float().div(255.0) if data.dtype == torch.uint8 else data.float()).cpu(), None
    if isinstance(data, Sequence):
        return torch.stack([load_image(x, prep) for x in data]), None
    if isinstance(data, Iterable):  # a DataLoader: batches of images, or (images, labels)
        images, labels = [], []
        for batch in data:
            x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) == 2 else (batch, None)
            x = torch.as_tensor(x)
            images.append(x.float().div(255.0) if x.dtype == torch.uint8 else x.float())
            if y is not None:
                labels.append(torch.as_tensor(y).reshape(-1).long())
        if not images:
            raise ValueError("the DataLoader gave no batch")
        return torch.cat(images).cpu(), torch.cat(labels) if labels else None
    raise TypeError(
        f"cannot read images from {type(data).__name__}: give paths, a folder, PIL images, a tensor, a DataLoader or shards"
    )


def fit_lcam(
    model: Any,
    data: Any,
    *,
    labels: Sequence[int] | torch.Tensor | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    init: str = "auto",
    row_prior: float | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> tuple[LCAM, dict[str, Any]]:
    """Train an L-CAM-Fm for ``model`` on ``data`` (see the module docstring): the trained
    :class:`~lcam.LCAM` and its record (what a checkpoint holds: method, backbone, coverage, config).

    ``epochs``/``batch_size``: override the small-data recipe; ``max_steps`` stops early;
    ``init``: auto (CAM where the head is pooling + linear, else random), cam or random;
    ``row_prior``: as ``lcam train --row-prior`` (default 1 from a CAM start, else 0)."""
    backbone: Backbone = build_backbone(model) if isinstance(model, (str, torch.nn.Module)) else model
    dev = resolve_device(device)
    backbone = backbone.to(dev).eval()
    images, carried = collect_images(data, backbone.preprocessing)
    n = images.shape[0]
    targets = torch.as_tensor(labels).long().reshape(-1) if labels is not None else carried
    if targets is not None and (
        targets.shape[0] != n or bool((targets < 0).any()) or bool((targets >= backbone.num_classes).any())
    ):
        raise ValueError(f"labels must be {n} class ids in 0..{backbone.num_classes - 1}")
    with torch.inference_mode():
        feats = torch.cat([backbone.features(backbone.normalize(images[i : i + 64].to(dev))) for i in range(0, n, 64)])
    recipe = recipe_for_data(backbone.name, "fm", n)
    recipe = recipe.with_overrides(
        **{k: v for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v is not None}
    )
    if init == "auto":
        init = "cam" if backbone.linear_classifier() is not None else "random"
    start = init_attention(backbone, seed, init)
    start_state = {k: v.clone() for k, v in start.state_dict().items()}
    lcam_model = LCAM(backbone, start).to(dev)
    bs = min(recipe.batch_size, n)
    trainer = LCAMTrainer(lcam_model, "fm", recipe, math.ceil(n / bs), device=dev)
    order = torch.Generator().manual_seed(seed)
    for _ in range(recipe.epochs):
        perm = torch.randperm(n, generator=order)
        batches = (
            TrainBatch(targets=None if targets is None else targets[idx].to(dev), feats=feats[idx.to(dev)].clone())
            for idx in perm.split(bs)
        )
        if trainer.train_epoch(batches, max_steps=max_steps) is None:
            break
    prior = row_prior if row_prior is not None else (1.0 if init == "cam" else 0.0)
    filled = fill_uncovered(lcam_model.attention.state_dict(), trainer.coverage, start_state, "init", prior=prior)
    lcam_model.attention.load_state_dict(filled.state)
    checkpoint = {
        "method": "fm",
        "backbone": backbone.describe(),
        "coverage": trainer.coverage.clone(),
        "config": {
            "samples": n,
            "recipe": recipe.to_dict(),
            "init": init,
            "row_prior": prior,
            "steps": trainer.global_step,
        },
    }
    return lcam_model.eval(), checkpoint
