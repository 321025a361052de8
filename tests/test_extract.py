"""Extraction with real components: WebDataset shards -> local Ray (2 CPUs) -> Zarr cache."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lcam import build_backbone
from pipeline.configs import ExtractConfig
from pipeline.extract.run import extract
from pipeline.images import decode_image, preprocess
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards, read_shard
from pipeline.store.feature_cache import CacheMismatch, FeatureCache
from tests.helpers import skimage_photos


def make_folder(root, n_per_class=4, corrupt=True):
    """ImageFolder layout with real photos (random crops), plus one corrupt file."""
    rng = np.random.default_rng(0)
    photos = list(skimage_photos().values())
    for c in range(2):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(n_per_class):
            p = photos[(c * n_per_class + i) % len(photos)]
            h, w = p.shape[:2]
            y, x = rng.integers(0, h // 3), rng.integers(0, w // 3)
            Image.fromarray(p[y : y + 2 * h // 3, x : x + 2 * w // 3]).save(d / f"img{i}.jpg", quality=90)
    if corrupt:
        (root / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_folder(root / "images")
    # pack-time validation would skip the corrupt file; put it in the shard by hand to test decode
    report = pack_folder(root / "images", str(root / "shards"), samples_per_shard=3, progress=False)
    assert report.packed == 8
    return root / "shards"


def add_corrupt_shard(folder):
    """A shard packed elsewhere (no index entry) holding one undecodable image and one good one."""
    good = next(iter(read_shard(list_shards(str(folder))[0])))
    path = folder / "extra-corrupt.tar"
    with tarfile.open(path, "w") as tar:
        for key, ext, data in [
            ("bad0", "jpg", b"\xff\xd8\xff garbage"),
            ("bad0", "cls", b"1"),
            ("good0", "jpg", good.image),
            ("good0", "cls", b"0"),
        ]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def expected_features(backbone, shard_folder):
    out = {}
    for info in list_shards(str(shard_folder)):
        for s in read_shard(info):
            x = preprocess(decode_image(s.image), backbone.preprocessing)[None]
            with torch.no_grad():
                out[s.key] = backbone.extract(x)[0][0].numpy()
    return out


def test_extract_local_equals_direct_features_and_is_idempotent(ray_local, shards, backbone, tmp_path):
    cache_url = str(tmp_path / "cache")
    cfg = ExtractConfig(shards=str(shards), cache=cache_url, batch_size=4, progress=False)
    summary = extract(cfg)
    assert summary.failed_shards == [] and summary.shards_extracted == 3 and summary.images == 8

    cache = FeatureCache.open(cache_url)
    assert cache.verify(expected={s.url: s.count for s in list_shards(str(shards))}).ok
    want = expected_features(backbone, shards)
    seen = {}
    for keys, feats, labels, top1 in cache.iter_rows(batch_size=5, view=0):
        for k, f in zip(keys, feats):
            seen[k] = f
    assert sorted(seen) == sorted(want)  # every sample exactly once
    for k, f in seen.items():
        # float16 storage: relative rounding 2^-11 on values up to 6 (ReLU6)
        np.testing.assert_allclose(f, want[k], atol=6 * 2**-11, rtol=0)
    chunk = cache.read_chunk(cache.shard_ids()[0], 0)
    assert chunk["top5_classes"].shape[1] == 5 and np.all(np.diff(chunk["top5_probs"], axis=1) <= 0)

    again = extract(cfg)
    assert again.shards_extracted == 0 and again.shards_done_before == 3
    # no Ray pipeline at all (not a re-extraction): nothing decoded, Ray never even connected to
    # (ray_startup_seconds is measured only on the way into the pipeline); no wall-clock bound
    assert again.images == 0 and again.ray_startup_seconds == 0.0


def test_new_shards_only_and_corrupt_images_reported(ray_local, shards, tmp_path):
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    cache_url = str(tmp_path / "cache")
    cfg = ExtractConfig(shards=str(folder / "*.tar"), cache=cache_url, batch_size=4, progress=False)
    assert extract(cfg).shards_extracted == 3
    add_corrupt_shard(folder)
    summary = extract(cfg)
    assert summary.shards_extracted == 1 and summary.shards_done_before == 3
    assert [s["key"] for s in summary.skipped] == ["bad0"] and summary.skipped[0]["reason"].startswith("decode")
    cache = FeatureCache.open(cache_url)
    entry = cache.manifest["shards"][str(folder / "extra-corrupt.tar")]
    assert entry["count"] == 1 and entry["skipped"][0]["key"] == "bad0"
    # the foreign shard's count was recorded on this first pass and is checked from now on
    assert cache.manifest["expected_counts"][str(folder / "extra-corrupt.tar")] == 2
    assert cache.verify().ok


def test_truncated_shard_is_reported_and_not_cached(ray_local, shards, tmp_path):
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    first = sorted(folder.glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    # cut at a member boundary: the first sample's members only (webdataset and Ray accept it)
    cut = members[3].offset
    first.write_bytes(first.read_bytes()[:cut] + b"\0" * 1024)
    summary = extract(ExtractConfig(shards=str(folder), cache=str(tmp_path / "cache"), batch_size=4, progress=False))
    assert [f["url"] for f in summary.failed_shards] == [str(first)]
    assert "ShardCountMismatch" in summary.failed_shards[0]["reason"]
    assert summary.shards_extracted == 2
    assert str(first) not in FeatureCache.open(str(tmp_path / "cache")).done_sources()


def test_other_backbone_or_views_refused(ray_local, shards, tmp_path):
    cache_url = str(tmp_path / "cache")
    extract(ExtractConfig(shards=str(shards), cache=cache_url, batch_size=4, progress=False))
    with pytest.raises(CacheMismatch, match="views"):
        extract(ExtractConfig(shards=str(shards), cache=cache_url, views=("center", "hflip"), progress=False))
    with pytest.raises(CacheMismatch, match="backbone"):
        extract(
            ExtractConfig(shards=str(shards), cache=cache_url, backbone="resnet18", weights="random", progress=False)
        )


def test_two_views_store_the_mirror(ray_local, shards, backbone, tmp_path):
    cache_url = str(tmp_path / "cache")
    extract(ExtractConfig(shards=str(shards), cache=cache_url, views=("center", "hflip"), batch_size=4, progress=False))
    cache = FeatureCache.open(cache_url)
    keys, feats, _, _ = next(cache.iter_rows(batch_size=2))
    assert feats.shape[1] == 2
    s = next(s for i in list_shards(str(shards)) for s in read_shard(i) if s.key == keys[0])
    x = preprocess(decode_image(s.image), backbone.preprocessing, "hflip")[None]
    with torch.no_grad():
        np.testing.assert_allclose(feats[0, 1], backbone.extract(x)[0][0].numpy(), atol=6 * 2**-11, rtol=0)


def test_s3_shards_to_s3_cache(ray_local, shards, s3, tmp_path):
    bucket, options = s3
    import fsspec

    fs = fsspec.filesystem("s3", **options)
    fs.put(str(shards) + "/", f"{bucket}/shards/", recursive=True)
    cache_url = f"{bucket}/cache"
    summary = extract(
        ExtractConfig(
            shards=f"{bucket}/shards/shard-{{000000..000002}}.tar",
            cache=cache_url,
            batch_size=4,
            shard_storage_options=options,
            cache_storage_options=options,
            progress=False,
        )
    )
    assert summary.failed_shards == [] and summary.images == 8
    cache = FeatureCache.open(cache_url, storage_options=options)
    assert len(cache) == 8 and cache.verify().ok
    assert fs.exists(f"{bucket}/cache/manifest/zarr.json") and not fs.exists(f"{bucket}/cache/manifest.json")


# A killed `lcam extract` resuming with only the unfinished shards: tests/test_faults.py
# (test_killed_extraction_verify_is_right_and_resume_completes, on the module's shards there).


def test_decoding_in_the_actor_gives_the_same_cache(ray_local, shards, tmp_path):
    """--decode-on actor (how a GPU actor decodes with nvJPEG; here its CPU form): the read tasks
    ship the compressed bytes as RawParts and the actor decodes them. The same crops as the
    decode tasks', so the same identity, features bit for bit and the same skipped images."""
    import shutil

    import ray

    from pipeline.decoders import Decoder
    from pipeline.shard_tasks import RawPart, shard_parts

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    add_corrupt_shard(folder)
    caches, summaries = {}, {}
    for site in ("tasks", "actor"):
        caches[site] = str(tmp_path / f"cache-{site}")
        summaries[site] = extract(
            ExtractConfig(
                shards=str(folder / "*.tar"),
                cache=caches[site],
                views=("center", "hflip"),
                decoder="torchvision",  # on a CPU: pil's crops exactly (test_decoders)
                decode_on=site,
                batch_size=4,
                progress=False,
            )
        )
    tasks, actor = (FeatureCache.open(caches[s]) for s in ("tasks", "actor"))
    assert actor.fingerprint == tasks.fingerprint
    assert summaries["actor"].images == summaries["tasks"].images == 9
    assert [s["key"] for s in summaries["actor"].skipped] == [s["key"] for s in summaries["tasks"].skipped] == ["bad0"]
    got = {k: f for keys, feats, _, _ in actor.iter_rows(batch_size=4) for k, f in zip(keys, feats)}
    want = {k: f for keys, feats, _, _ in tasks.iter_rows(batch_size=4) for k, f in zip(keys, feats)}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])

    info = list_shards(str(folder))[0]
    item = {"url": info.url, "name": info.name, "count": info.count, "sha256": info.sha256 or ""}
    parts = shard_parts(
        item, storage_options=None, preprocessing=None, views=("center",), decoder=Decoder(), in_actor=True
    )
    assert parts and all(isinstance(p, RawPart) for p in parts)
    rows = ray.get(parts[0].rows)
    assert rows[0]["image"][:3] == b"\xff\xd8\xff"  # what crosses to the actor: the JPEG's bytes
