"""Planning an evaluation into fixed batches, reading the shards and decoding the images.

Work is planned on the driver as a fixed list of batches (a batch never straddles a
shard); every engine reads and decodes those batches with these functions.
"""

from __future__ import annotations

import concurrent.futures
import json
import pickle
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from ..fs import StorageOptions


@dataclass(frozen=True)
class PlannedBatch:
    """Images ``positions`` of one shard, with their ranks in the seeded ordering."""

    batch_id: int
    shard_url: str
    shard_name: str
    shard_count: int | None
    positions: tuple[int, ...]
    ranks: tuple[int, ...]


@dataclass
class Plan:
    batches: list[PlannedBatch]
    available: int  # images in the shards
    selected: int  # images planned


def count_samples(url: str, storage_options: StorageOptions) -> int:
    from ..shards.read import iter_samples

    return sum(1 for _ in iter_samples(url, storage_options))


def plan_batches(
    shards: Sequence[Any], batch_size: int, limit: int | None, seed: int, storage_options: StorageOptions = None
) -> Plan:
    """Fixed batches for any engine: a seeded random subset of ``limit`` images (all if None), in
    shard order, cut into batches of ``batch_size`` that never straddle a shard.

    Each selected image also gets a rank in a seeded random permutation; a method limited
    to M images evaluates the images of rank < M (a uniform random subset, nested: the
    images of a smaller limit are among those of a larger one).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    # shards packed elsewhere have no index count: read them once to count
    counts = [s.count if s.count is not None else count_samples(s.url, storage_options) for s in shards]
    total = int(sum(counts))
    if total == 0:
        raise UserError("the shards hold no images")
    rng = np.random.default_rng(seed)
    if limit is None:
        chosen = np.arange(total)
    else:
        if limit < 1:
            raise UserError(lambda flag: f"{flag('limit')} must be at least 1, got {limit}")
        if limit > total:
            raise UserError(
                lambda flag: (
                    f"{flag('limit')} {limit} asks for more images than the shards hold ({total}); pass {flag('limit')} {total} or less, or leave it out"
                )
            )
        chosen = np.sort(rng.choice(total, size=limit, replace=False))
    ranks = rng.permutation(len(chosen))
    starts = np.cumsum([0, *counts])
    batches: list[PlannedBatch] = []
    for si, s in enumerate(shards):
        lo, hi = np.searchsorted(chosen, [starts[si], starts[si + 1]])
        pos = (chosen[lo:hi] - starts[si]).tolist()
        rk = ranks[lo:hi].tolist()
        for b in range(0, len(pos), batch_size):
            batches.append(
                PlannedBatch(
                    len(batches), s.url, s.name, s.count, tuple(pos[b : b + batch_size]), tuple(rk[b : b + batch_size])
                )
            )
    return Plan(batches, total, len(chosen))


@dataclass
class DecodedBatch:
    """A planned batch's decodable images as uint8 pixels (exactly what ``preprocess`` gives x 255)."""

    batch_id: int
    shard: str
    keys: list[str]
    labels: np.ndarray  # (n,) int64, -1 when unlabelled
    ranks: np.ndarray  # (n,) int64
    pixels: np.ndarray  # (n, 3, H, W) uint8
    skipped: list[dict[str, str]]  # {"key", "shard", "reason"} of images that did not decode
    boxes: list[np.ndarray] | None = None  # per image (k, 4) on the crop's grid; None: no sample carries boxes


def decode_to_uint8(data: bytes, prep: Any) -> np.ndarray:
    """Bytes -> (3, crop, crop) uint8 of the centre crop. Lossless: ``preprocess`` gives k/255,
    and ``u8.float() / 255`` gives back the same float32 values bit for bit."""
    from ..images import crop_pixels, decode_image

    return crop_pixels(decode_image(data), prep)


def decode_with_boxes(data: bytes, boxes: Any, prep: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`decode_to_uint8` and the sample's boxes (original pixels, inclusive) on the crop's grid."""
    from ..images import boxes_in_crop, crop_pixels, decode_image

    rgb = decode_image(data)
    return crop_pixels(rgb, prep), boxes_in_crop(boxes, rgb.shape[1], rgb.shape[0], prep)


def read_selected(batches: Sequence[PlannedBatch], storage_options: StorageOptions) -> dict[int, list[Any]]:
    """Read one shard (count checked against its index) and keep the samples the batches need."""
    from ..shards.format import ShardInfo
    from ..shards.read import read_shard

    b0 = batches[0]
    samples = read_shard(ShardInfo(b0.shard_url, b0.shard_name, b0.shard_count), storage_options)
    if b0.shard_count is None and max(max(b.positions) for b in batches) >= len(samples):
        raise UserError(f"shard {b0.shard_url} changed while evaluating (now {len(samples)} samples); rerun")
    return {b.batch_id: [samples[p] for p in b.positions] for b in batches}


def decode_batch(
    batch: PlannedBatch, samples: Sequence[Any], prep: Any, pool: concurrent.futures.Executor | None = None
) -> DecodedBatch:
    def one(s: Any) -> tuple[np.ndarray | None, str]:
        try:
            return decode_to_uint8(s.image, prep), ""
        except Exception as exc:  # DecodeError and whatever PIL raises on odd files
            return None, f"decode: {exc}"

    def one_with_boxes(s: Any) -> tuple[np.ndarray | None, str, np.ndarray | None]:
        if "boxes" not in s.meta:
            return (*one(s), None)
        try:
            pixels, boxes = decode_with_boxes(s.image, s.meta["boxes"], prep)
            return pixels, "", boxes
        except Exception as exc:
            return None, f"decode: {exc}", None

    decoded = list(pool.map(one_with_boxes, samples)) if pool is not None else [one_with_boxes(s) for s in samples]
    ok = [i for i, (px, _, _) in enumerate(decoded) if px is not None]
    skipped = [
        {"key": s.key, "shard": batch.shard_url, "reason": err}
        for s, (px, err, _) in zip(samples, decoded)
        if px is None
    ]
    boxed = any(decoded[i][2] is not None for i in ok)
    boxes = (
        [decoded[i][2] if decoded[i][2] is not None else np.zeros((0, 4), np.float32) for i in ok] if boxed else None
    )
    crop = prep.crop
    pixels = np.stack([decoded[i][0] for i in ok]) if ok else np.zeros((0, 3, crop, crop), np.uint8)
    return DecodedBatch(
        batch.batch_id,
        batch.shard_url,
        [samples[i].key for i in ok],
        np.array([samples[i].label for i in ok], np.int64),
        np.array([batch.ranks[i] for i in ok], np.int64),
        pixels,
        skipped,
        boxes,
    )


def shard_groups(plan: Plan) -> list[list[PlannedBatch]]:
    """The plan's batches grouped by shard (one read per group), in order."""
    groups: list[list[PlannedBatch]] = []
    for b in plan.batches:
        if groups and groups[-1][0].shard_url == b.shard_url:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def ray_read_decode(row: dict[str, Any], prep: Any, storage_options: StorageOptions = None) -> list[dict[str, Any]]:
    """Ray task: one shard -> one row per planned batch (decoded pixels pickled; an error row on failure).
    Here, not beside the actor: this module imports no torch, so a fresh decode worker does not either."""
    batches = [
        PlannedBatch(**{**b, "positions": tuple(b["positions"]), "ranks": tuple(b["ranks"])})
        for b in json.loads(row["batches"])
    ]
    try:
        samples = read_selected(batches, storage_options)
    except Exception as exc:  # count mismatch, cut tar, unreadable object: the driver reports it
        return [{"batch_id": -1, "payload": pickle.dumps({"error": f"{row['url']}: {type(exc).__name__}: {exc}"})}]
    return [
        {"batch_id": b.batch_id, "payload": pickle.dumps(decode_batch(b, samples[b.batch_id], prep))} for b in batches
    ]
