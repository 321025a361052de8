"""L-CAM-Img's data: the Ray Data stages that stream the WebDataset shards to the Ray Train
workers (read -> decode -> resize, plus the cached feature maps of the clean centre crop
when a matching cache is given), and the workers' batches, whose random 224 crop and flip
are drawn from a generator seeded by (seed, epoch, key), so the augmentation of every image
is reproducible."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..decoders import Decoder
from ..errors import UserError
from ..fs import StorageOptions

if TYPE_CHECKING:  # torch only where tensors are made: the Ray Data decode workers import none
    import torch


def crop_seed(seed: int, epoch: int, key: str) -> int:
    """Seed of one image's random crop and flip in one epoch: independent of workers and order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def crop_flip(resized: np.ndarray, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random ``crop`` x ``crop`` window of an already resized (H, W, 3) uint8 image,
    flipped with p=0.5: (3, crop, crop) in [0, 1]. Draws top, left, flip in the order of
    :func:`pipeline.images.random_crop_flip`, so both give the same view for the same generator."""
    import torch

    h, w = resized.shape[:2]
    top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    out = (
        torch.from_numpy(np.ascontiguousarray(resized[top : top + crop, left : left + crop]))
        .permute(2, 0, 1)
        .float()
        .div_(255)
    )
    return out.flip(-1) if flip else out


def read_training_rows(
    item: dict[str, Any], storage_options: StorageOptions = None, cache: Any = None, view_index: int = 0
) -> list[dict[str, Any]]:
    """One shard -> one row per sample; with a cache, each row carries its cached F (clean centre crop)."""
    from ..shards.format import ShardInfo
    from ..shards.read import read_shard

    info = ShardInfo(
        url=item["url"],
        name=item["name"],
        count=item["count"] if item["count"] >= 0 else None,
        sha256=item.get("sha256") or None,
    )
    samples = read_shard(info, storage_options=storage_options)  # a damaged shard fails the run, loudly
    cached: dict[str, tuple[np.ndarray, int]] = {}
    if cache is not None:
        from ..store.identity import shard_id_for

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


def decode_for_training(
    batch: dict[str, np.ndarray], preprocessing: Any, augment: str, decoder: Decoder = Decoder()
) -> dict[str, Any]:
    """CPU stage: bytes -> RGB -> the 256 resize (``random``: the worker crops) or centre crop 224, uint8."""
    from PIL import Image

    from ..images import resized_size

    n = len(batch["key"])
    errors = [str(e) for e in batch["error"]]
    pixels: list[np.ndarray | None] = [None] * n
    todo = [i for i in range(n) if not errors[i]]
    if augment == "center":  # the decoder's crops, the part's images as one batch
        for i, t in zip(todo, decoder.pixels([batch["image"][i] for i in todo], preprocessing)):
            if isinstance(t, Exception):  # DecodeError and whatever PIL raises on odd files
                errors[i] = f"decode: {t}"
            else:
                pixels[i] = t.transpose(1, 2, 0)
    else:
        for i in todo:
            try:
                im = decoder.rgb(batch["image"][i], preprocessing)
                size = resized_size(im.width, im.height, preprocessing.resize)
                pixels[i] = np.asarray(im.resize(size, Image.BILINEAR))  # the resize of random_crop_flip
            except Exception as exc:  # DecodeError and whatever PIL raises on odd files
                errors[i] = f"decode: {exc}"
    blank = np.zeros((preprocessing.crop, preprocessing.crop, 3), np.uint8)
    filled = [p if p is not None else blank for p in pixels]
    res: dict[str, Any] = {k: batch[k] for k in batch if k not in ("image", "error")}
    if augment == "center":
        res["pixels"] = np.stack(filled)
    else:  # variable sizes: an object array becomes a variable-shaped tensor column
        arr = np.empty(n, dtype=object)
        arr[:] = filled
        res["pixels"] = arr
    res["error"] = np.array(errors, dtype=object).astype(str)
    return res


def build_image_dataset(
    shards: Sequence[Any],
    preprocessing: Any,
    augment: str,
    *,
    cache: Any = None,
    view_index: int = 0,
    storage_options: StorageOptions = None,
    decode_batch_size: int = 16,
    data_cpus: float = 1.0,
    decoder: Decoder = Decoder(),
):
    """Ray Dataset of training rows: shards in a new random order each epoch, read, decoded."""
    import ray

    items = [
        {"url": s.url, "name": s.name, "count": s.count if s.count is not None else -1, "sha256": s.sha256 or ""}
        for s in shards
    ]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .randomize_block_order()
        .flat_map(
            read_training_rows,
            fn_kwargs={"storage_options": storage_options, "cache": cache, "view_index": view_index},
            num_cpus=data_cpus,
        )
        .map_batches(
            decode_for_training,
            fn_kwargs={"preprocessing": preprocessing, "augment": augment, "decoder": decoder},
            batch_size=decode_batch_size,
            batch_format="numpy",
            num_cpus=data_cpus,
        )
    )


def image_batches(
    rows: Iterable[Mapping[str, np.ndarray]],
    *,
    augment: str,
    crop: int,
    seed: int,
    epoch: int,
    target: str,
    skipped: list[str],
    top_k: int = 1,
) -> Iterator[Any]:
    """Worker side: numpy row batches -> :class:`lcam.training.TrainBatch` (undecodable rows dropped and listed)."""
    import torch

    from lcam.training import TrainBatch

    for b in rows:
        ok = np.array([not e for e in b["error"]], dtype=bool)
        keys = [str(k) for k in b["key"]]
        skipped.extend(k for k, good in zip(keys, ok) if not good)
        if not ok.any():  # skipping the step on one worker only would hang the others' gradient all-reduce
            raise UserError(
                f"every image of a training batch failed to decode ({', '.join(keys[:3])}, ...: {b['error'][0]}); "
                "re-pack the shards (lcam shards) so that undecodable files are left out"
            )
        if augment == "center":
            images = torch.from_numpy(np.ascontiguousarray(b["pixels"][ok])).permute(0, 3, 1, 2).float().div_(255)
        else:
            images = torch.stack(
                [
                    crop_flip(np.asarray(p), crop, torch.Generator().manual_seed(crop_seed(seed, epoch, k)))
                    for p, k, good in zip(b["pixels"], keys, ok)
                    if good
                ]
            )
        feats = torch.from_numpy(np.asarray(b["features"][ok], dtype=np.float32)) if "features" in b else None
        if target == "label":
            labels = np.asarray(b["label"])[ok]
            if (labels < 0).any():
                bad = [k for k, good, lab in zip(keys, ok, b["label"]) if good and lab < 0][:3]
                raise UserError(
                    lambda flag: (
                        f"sample {bad[0]!r} has no label; train with {flag('target')} predicted (the backbone's top-1) or give the data labels"
                    )
                )
            targets = torch.from_numpy(labels.astype(np.int64))
        elif feats is not None and top_k == 1:
            targets = torch.from_numpy(np.asarray(b["top1"])[ok].astype(np.int64))  # the cache's top-1, as for L-CAM-Fm
        else:
            targets = None  # the trainer takes the top-1 (top-K) from its first pass
        yield TrainBatch(targets=targets, feats=feats, images=images)
