"""pipeline.shards: packing layouts, index integrity, damaged shards, foreign shards, S3."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from skimage import data as skdata

from pipeline.errors import UserError
from pipeline.images import decode_image
from pipeline.shards.format import ShardCountMismatch, ShardInfo, ShardReadError
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import iter_samples, list_shards, read_shard, register_fsspec_opener

SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def encode(arr_or_im, fmt: str, **kw) -> bytes:
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# Small but real photos keep the suite fast; sizes stay above the 224 crop.
PHOTOS = [
    skdata.chelsea(),
    skdata.coffee()[::2, ::2][:240],
    skdata.astronaut()[::2, ::2],
    skdata.rocket()[::2, ::2][:230],
]


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def jpeg(i: int) -> bytes:
    return encode(PHOTOS[i % len(PHOTOS)], "JPEG", quality=85)


def read_all(out: Path | str, storage_options=None) -> dict[str, object]:
    return {s.key: s for info in list_shards(str(out), storage_options) for s in read_shard(info, storage_options)}


def check_index(out: Path) -> dict:
    """index.json agrees with the files on disk; nothing half-written is left."""
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "lcam-webdataset-shards/1"
    for e in index["shards"]:
        raw = (out / e["name"]).read_bytes()
        assert e["bytes"] == len(raw)
        assert e["sha256"] == hashlib.sha256(raw).hexdigest()
        with tarfile.open(out / e["name"]) as t:
            assert e["count"] == len({m.name.split(".")[0] for m in t.getmembers()})
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", "pack_report.json", *(e["name"] for e in index["shards"])]
    )
    return index


def test_imagefolder_layout(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    originals = {}
    for cls in ("zebra", "cat", "dog"):
        for i in range(2):
            originals[f"{cls}/img.{i}.jpg"] = write(src / cls / f"img.{i}.jpg", jpeg(i))  # stems clash across classes
    write(src / "dog" / "deep" / "x.png", encode(PHOTOS[0], "PNG"))
    originals["dog/deep/x.png"] = (src / "dog" / "deep" / "x.png").read_bytes()

    report = pack_folder(src, str(out), samples_per_shard=3, progress=False)
    assert report.layout == "imagefolder" and report.packed == 7 and not report.skipped
    assert "packed 7 images" in report.summary()
    index = check_index(out)
    assert [e["name"] for e in index["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [e["count"] for e in index["shards"]] == [3, 3, 1]
    assert index["labels"]["names"] == ["cat", "dog", "zebra"]

    samples = read_all(out)
    assert len(samples) == 7 and all(SAFE_KEY.match(k) for k in samples)
    by_file = {s.meta["file"]: s for s in samples.values()}
    assert set(by_file) == set(originals)
    for rel, raw in originals.items():
        s = by_file[rel]
        assert s.image == raw  # original bytes, never re-encoded
        assert s.label == {"cat": 0, "dog": 1, "zebra": 2}[rel.split("/")[0]]
        assert s.ext == ("png" if rel.endswith(".png") else "jpg")
        h, w = PHOTOS[0 if rel.endswith(".png") else int(rel[-5])].shape[:2]
        assert (s.meta["width"], s.meta["height"], s.meta["mode"]) == (w, h, "RGB")
    assert by_file["dog/deep/x.png"].key == "x"
    assert by_file["cat/img.0.jpg"].key == "cat_img_0"


def test_imagefolder_wordnet_ids_use_standard_imagenet_index(tmp_path):
    src = tmp_path / "src"
    write(src / "n01484850" / "a.JPEG", jpeg(0))  # great white shark = 2
    write(src / "n01443537" / "b.JPEG", jpeg(1))  # goldfish = 1
    pack_folder(src, str(tmp_path / "out"), progress=False)
    labels = {k: s.label for k, s in read_all(tmp_path / "out").items()}
    assert labels == {"a": 2, "b": 1}
    assert json.loads((tmp_path / "out" / "index.json").read_text())["labels"]["scheme"] == "imagenet"


@pytest.mark.parametrize(
    "name, text",
    [
        (
            "labels.tsv",
            "file\tclass_index\twnid\tname\nf0.jpg\t5\tn01491361\tx\nf1.jpg\t7\tn01494475\ty\nf2.png\t9\tz\tz\n",
        ),
        ("labels.csv", "f0.jpg,5\nf1.jpg,7\nf2.png,9\n"),  # no header
        ("classes.txt", "f0 n01514668\nf1 n01518878\nf2.png n01530575\n"),  # stems and WordNet ids
    ],
)
def test_flat_folder_with_labels_file(tmp_path, name, text):
    src = tmp_path / "src"
    for i, fname in enumerate(["f0.jpg", "f1.jpg", "f2.png", "unlisted.jpg"]):
        write(src / fname, encode(PHOTOS[i], "PNG") if fname.endswith("png") else jpeg(i))
    write(src / name, text.encode())
    report = pack_folder(src, str(tmp_path / "out"), progress=False)  # labels file found by itself
    assert report.layout == "labels" and report.packed == 4
    assert not report.skipped  # the labels file itself is not a skipped input
    labels = {k: s.label for k, s in read_all(tmp_path / "out").items()}
    expect = [7, 9, 10] if name == "classes.txt" else [5, 7, 9]  # cock, ostrich, brambling
    assert labels == {"f0": expect[0], "f1": expect[1], "f2": expect[2], "unlisted": -1}
    assert [n["file"] for n in report.notes if n["kind"] == "unlabeled"] == ["unlisted.jpg"]


def test_imagenet_val_layout(tmp_path):
    src = tmp_path / "val"
    for n in (2, 3, 5):  # a subset: labels come from the number in the name, not the position
        write(src / f"ILSVRC2012_val_{n:08d}.JPEG", jpeg(n))
    write(src / "val_ground_truth.txt", b"65\n970\n230\n809\n516\n")
    report = pack_folder(src, str(tmp_path / "out"), progress=False)
    assert report.layout == "imagenet-val" and report.labels_scheme == "imagenet"
    labels = {k: s.label for k, s in read_all(tmp_path / "out").items()}
    assert labels == {"ILSVRC2012_val_00000002": 970, "ILSVRC2012_val_00000003": 230, "ILSVRC2012_val_00000005": 516}

    # Kaggle's LOC_val_solution.csv (ImageId, "wnid x y x y ..."), output folder inside the source
    (src / "val_ground_truth.txt").unlink()
    write(
        src / "LOC_val_solution.csv",
        b"ImageId,PredictionString\nILSVRC2012_val_00000003,n01443537 1 2 3 4 n01443537 5 6 7 8\n",
    )
    report = pack_folder(src, str(src / "shards"), layout="imagenet-val", progress=False)
    assert report.packed == 3 and not report.skipped and report.labels_scheme == "imagenet"
    labels = {k: s.label for k, s in read_all(src / "shards").items()}
    assert labels == {"ILSVRC2012_val_00000002": -1, "ILSVRC2012_val_00000003": 1, "ILSVRC2012_val_00000005": -1}

    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n361\n171\n822\n297\n")
    with pytest.raises(UserError, match="devkit"):
        pack_folder(src, str(tmp_path / "out2"), layout="imagenet-val", labels_file=devkit, progress=False)


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        pack_folder(tmp_path / "missing", str(tmp_path / "o"), progress=False)
    mixed = tmp_path / "mixed"
    write(mixed / "cat" / "a.jpg", jpeg(0))
    write(mixed / "b.jpg", jpeg(1))
    with pytest.raises(UserError, match="cannot tell the layout"):
        pack_folder(mixed, str(tmp_path / "o"), progress=False)
    flat = tmp_path / "flat"
    write(flat / "a.jpg", jpeg(0))
    with pytest.raises(UserError, match="no labels file"):
        pack_folder(flat, str(tmp_path / "o"), progress=False)
    write(flat / "labels.tsv", b"a.jpg\tcat\n")
    with pytest.raises(UserError, match="line 1"):
        pack_folder(flat, str(tmp_path / "o"), progress=False)
    with pytest.raises(UserError, match="labels file .* does not exist"):
        pack_folder(flat, str(tmp_path / "o"), labels_file=tmp_path / "nope.tsv", progress=False)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_inputs_skipped_and_odd_images_packed(tmp_path):
    src = tmp_path / "src" / "c"
    chelsea = jpeg(0)
    write(src / "zero.jpg", b"")
    write(src / "corrupt.jpg", b"\xff\xd8 this is no jpeg " * 50)
    write(src / "truncated.jpg", chelsea[: len(chelsea) // 2])
    write(src / "picture.bmp", encode(PHOTOS[0], "BMP"))
    write(src / "notes.txt", b"hello")
    write(src / "gray.png", encode(np.full((240, 250), 77, np.uint8), "PNG"))
    write(src / "cmyk.jpg", encode(Image.new("CMYK", (256, 256), (0, 255, 255, 0)), "JPEG", quality=95))
    rgba = np.zeros((230, 230, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)
    write(src / "rgba.png", encode(rgba, "PNG"))
    write(src / "deep.png", encode(np.full((230, 240), 65535, np.uint16), "PNG"))
    write(src / "small.jpg", encode(PHOTOS[1][:80, :100], "JPEG", quality=95))
    write(src / "pal.png", encode(Image.fromarray(PHOTOS[0]).convert("P"), "PNG"))
    write(src / "actually_png.jpg", encode(PHOTOS[2], "PNG"))

    report = pack_folder(tmp_path / "src", str(tmp_path / "out"), progress=False)
    skipped = {s["file"].split("/")[-1]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"zero.jpg", "corrupt.jpg", "truncated.jpg", "picture.bmp", "notes.txt"}
    assert skipped["zero.jpg"] == "zero-byte file"
    assert skipped["truncated.jpg"].startswith("corrupt or truncated image") and "truncated" in skipped["truncated.jpg"]
    assert skipped["corrupt.jpg"].startswith("corrupt or truncated image")
    assert skipped["picture.bmp"] == "unknown extension: .bmp"
    notes = {(n["file"].split("/")[-1], n["kind"]) for n in report.notes}
    assert {
        ("gray.png", "mode"),
        ("cmyk.jpg", "mode"),
        ("rgba.png", "mode"),
        ("deep.png", "mode"),
        ("pal.png", "mode"),
    } <= notes
    assert ("small.jpg", "small") in notes and ("actually_png.jpg", "format") in notes
    assert report.packed == 7
    on_disk = json.loads((tmp_path / "out" / "pack_report.json").read_text())
    assert on_disk["skipped"] == report.skipped and on_disk["packed"] == 7
    check_index(tmp_path / "out")

    samples = read_all(tmp_path / "out")
    rgb = {k: decode_image(s.image) for k, s in samples.items()}
    assert all(a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8 for a in rgb.values())
    assert (rgb["gray"] == 77).all()
    assert (rgb["deep"] == 255).all()
    assert (rgb["rgba"] == (10, 20, 30)).all()
    assert np.abs(rgb["cmyk"].astype(int) - (255, 0, 0)).max() <= 3
    assert rgb["small"].shape == (80, 100, 3)
    assert samples["actually_png"].ext == "png" and samples["pal"].meta["mode"] == "P"
    assert samples["deep"].image == (src / "deep.png").read_bytes()


def test_max_shard_bytes_and_reproducible_bytes(tmp_path):
    src = tmp_path / "src"
    sizes = [len(write(src / "c" / f"{i}.jpg", jpeg(i))) for i in range(6)]
    limit = 2 * max(sizes) + 16 * 1024
    pack_folder(src, str(tmp_path / "a"), max_shard_bytes=limit, progress=False)
    index = check_index(tmp_path / "a")
    assert len(index["shards"]) >= 3 and sum(e["count"] for e in index["shards"]) == 6
    assert all(e["bytes"] <= limit for e in index["shards"])
    pack_folder(src, str(tmp_path / "b"), max_shard_bytes=limit, progress=False)
    again = json.loads((tmp_path / "b" / "index.json").read_text())
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in index["shards"]]


def test_existing_output_needs_overwrite(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        write(src / "c" / f"{i}.jpg", jpeg(i))
    out = tmp_path / "out"
    pack_folder(src, str(out), samples_per_shard=1, progress=False)
    with pytest.raises(UserError, match="overwrite"):
        pack_folder(src, str(out), samples_per_shard=2, progress=False)
    pack_folder(src, str(out), samples_per_shard=2, overwrite=True, progress=False)
    assert [e["count"] for e in check_index(out)["shards"]] == [2, 2]  # stale shard-000002/3 removed


@pytest.fixture
def packed(tmp_path):
    src = tmp_path / "src"
    for i in range(5):
        write(src / "c" / f"s{i}.jpg", jpeg(i))
    out = tmp_path / "out"
    pack_folder(src, str(out), progress=False)
    return out / "shard-000000.tar"


def member_offsets(path: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path) as t:
        return [(m.name, m.offset, m.offset_data + m.size) for m in t.getmembers()]


def test_tar_cut_at_member_boundary_is_a_count_mismatch(packed):
    members = member_offsets(packed)
    last_sample_start = next(off for name, off, _ in members if name.startswith("s4."))
    raw = packed.read_bytes()
    packed.write_bytes(raw[:last_sample_start])  # a valid, shorter tar
    assert len(list(iter_samples(str(packed)))) == 4  # webdataset itself sees nothing wrong
    info = list_shards(str(packed.parent))[0]
    assert info.count == 5
    with pytest.raises(ShardCountMismatch) as err:
        read_shard(info)
    msg = str(err.value)
    assert str(packed) in msg and "5" in msg and "4" in msg and "re-pack" in msg
    assert (err.value.expected, err.value.actual) == (5, 4)
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.shard, again.expected, again.actual) == (str(packed), 5, 4)


def test_tar_cut_between_members_of_a_sample_is_reported(packed):
    image_member_start = next(off for name, off, _ in member_offsets(packed) if name == "s4.jpg")
    packed.write_bytes(packed.read_bytes()[:image_member_start])  # s4 keeps cls+json, loses its image
    with pytest.raises(ShardReadError, match="s4.*no image"):
        read_shard(list_shards(str(packed.parent))[0])


def test_tar_cut_mid_member_is_a_clear_error(packed):
    name, start, end = member_offsets(packed)[-1]
    packed.write_bytes(packed.read_bytes()[: (start + 512 + end) // 2])
    with pytest.raises(ShardReadError, match=re.escape(str(packed)) + r".*damaged.*re-download"):
        read_shard(list_shards(str(packed.parent))[0])
    with pytest.raises(ShardReadError):
        list(iter_samples(str(packed)))
    assert isinstance(ShardReadError("x"), UserError)


def test_checksum_verification(packed):
    raw = bytearray(packed.read_bytes())
    raw[-20000] ^= 0xFF  # flip a byte inside image data: same count, different content
    packed.write_bytes(bytes(raw))
    info = list_shards(str(packed.parent))[0]
    assert len(read_shard(info, verify_sha256=False)) == 5  # the tar itself reads: only the checksum tells
    with pytest.raises(UserError, match=f"shard {info.url}: its bytes changed since packing .*sha256"):
        read_shard(info)  # checked by default, while the tar streams


def test_foreign_shards_without_index(tmp_path):
    a, b = jpeg(0), encode(PHOTOS[1], "WEBP", quality=80)
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as w:
        w.write({"__key__": "dir/one", "jpeg": a, "cls": b"3"})
        w.write({"__key__": "two", "jpeg": a, "cls": b"11"})
    with wds.TarWriter(str(tmp_path / "train-000001.tar")) as w:
        w.write({"__key__": "three", "webp": b, "json": json.dumps({"label": 7, "src": "x"}).encode()})
        w.write({"__key__": "four", "webp": b, "json": json.dumps({"class_index": "8"}).encode()})
        w.write({"__key__": "five", "txt": b"caption only"})  # no image: yielded, not dropped
    infos = list_shards(str(tmp_path / "train-{000000..000001}.tar"))
    assert [(i.name, i.count, i.sha256) for i in infos] == [
        ("train-000000.tar", None, None),
        ("train-000001.tar", None, None),
    ]
    got = [s for i in infos for s in read_shard(i)]
    assert [(s.key, s.ext, s.label) for s in got] == [
        ("dir/one", "jpeg", 3),
        ("two", "jpeg", 11),
        ("three", "webp", 7),
        ("four", "webp", 8),
        ("five", "", -1),
    ]
    assert got[0].image == a and got[2].image == b and got[4].image == b"" and got[2].meta["src"] == "x"
    assert decode_image(got[2].image).shape == PHOTOS[1].shape


def test_brace_glob_folder_and_index_url(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        write(src / "c" / f"{i}.jpg", jpeg(i))
    out = tmp_path / "out"
    pack_folder(src, str(out), samples_per_shard=1, prefix="train", progress=False)
    d = str(out)
    names = lambda infos: [i.url for i in infos]  # noqa: E731
    assert names(list_shards(f"{d}/train-{{000000..000002}}.tar")) == [f"{d}/train-00000{i}.tar" for i in range(3)]
    assert names(list_shards(f"{d}/train-00000[13].tar")) == [f"{d}/train-000001.tar", f"{d}/train-000003.tar"]
    assert names(list_shards([f"{d}/train-000003.tar", f"{d}/train-*0.tar"])) == [
        f"{d}/train-000003.tar",
        f"{d}/train-000000.tar",
    ]
    assert names(list_shards(d)) == names(list_shards(d + "/")) == [f"{d}/train-00000{i}.tar" for i in range(4)]
    assert all(i.count == 1 and len(i.sha256) == 64 for i in list_shards(f"{d}/*.tar"))
    with pytest.raises(FileNotFoundError, match="nothing"):
        list_shards(f"{d}/nothing-*.tar")
    # shards moved away from their index: counts come from an explicit index_url
    moved = tmp_path / "moved"
    moved.mkdir()
    (out / "train-000002.tar").rename(moved / "train-000002.tar")
    (info,) = list_shards(str(moved / "train-000002.tar"))
    assert info.count is None
    (info,) = list_shards(str(moved / "train-000002.tar"), index_url=str(out / "index.json"))
    assert info.count == 1 and len(read_shard(info)) == 1


def test_cli_module(tmp_path, capsys):
    from jobs import shards as job

    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    src = tmp_path / "src"
    write(src / "a" / "x.jpg", jpeg(0))
    args = parser.parse_args(
        [str(src), str(tmp_path / "out"), "--samples-per-shard", "5", "--prefix", "p", "--no-progress"]
    )
    assert job.run(args) == 0
    assert (tmp_path / "out" / "p-000000.tar").exists()
    assert "packed 1 images" in capsys.readouterr().out
    with pytest.raises(UserError):
        job.run(parser.parse_args([str(tmp_path / "missing"), str(tmp_path / "o2")]))


def test_pack_to_s3_and_read_back(tmp_path, s3):
    import fsspec

    bucket, opts = s3
    # fsspec's instance cache on (as in production): each fresh s3fs instance costs ~1 s of session setup here
    opts = {k: v for k, v in opts.items() if k != "skip_instance_cache"}
    src = tmp_path / "src"
    originals = {f"s{i}": write(src / "n01440764" / f"s{i}.jpg", jpeg(i)) for i in range(5)}
    url = f"{bucket}/data/shards"
    report = pack_folder(src, url, samples_per_shard=2, storage_options=opts, progress=False)
    assert report.packed == 5 and len(report.shards) == 3
    fs = fsspec.filesystem("s3", **opts)
    listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url.removeprefix("s3://"), refresh=True))
    assert listed == ["index.json", "pack_report.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for e in report.shards:  # index agrees with the uploaded objects
        raw = fs.cat_file(f"{url}/{e['name']}")
        assert (len(raw), hashlib.sha256(raw).hexdigest()) == (e["bytes"], e["sha256"])

    infos = list_shards(url, storage_options=opts)
    assert [(i.url, i.count) for i in infos] == [(f"{url}/shard-00000{i}.tar", c) for i, c in enumerate([2, 2, 1])]
    assert [i.url for i in list_shards(f"{url}/shard-{{000001..000002}}.tar", opts)] == [i.url for i in infos[1:]]
    assert [i.url for i in list_shards(f"{url}/shard-*.tar", opts)] == [i.url for i in infos]
    samples = [s for i in infos for s in read_shard(i, opts, verify_sha256=True)]
    assert {s.key: s.image for s in samples} == originals and {s.label for s in samples} == {0}

    register_fsspec_opener(opts)
    ds = wds.WebDataset(f"{url}/shard-{{000000..000002}}.tar", shardshuffle=False)
    got = {d["__key__"]: d["jpg"] for d in ds}
    assert got == originals


def test_shard_info_is_plain_data():
    info = ShardInfo("s3://b/x.tar", "x.tar", 3, "ab")
    assert pickle.loads(pickle.dumps(info)) == info


def test_require_shards_names_the_pattern(tmp_path):
    from pipeline.errors import UserError
    from pipeline.shards.read import require_shards

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no shards match \[\].*lcam shards"):  # nothing given
        require_shards([])
    for empty in (tmp_path / "empty", tmp_path / "empty" / "*.tar"):  # a folder without tars, a glob matching nothing
        with pytest.raises(UserError, match=r"shards .*empty.*no file matches"):
            require_shards(str(empty))
    with pytest.raises(UserError, match=r"shards .*missing.*no such shard folder"):
        require_shards(str(tmp_path / "missing"))


def test_skipped_summary_is_written_in_one_place():
    """Extraction, CAMs and packing summarise what they skipped with the same lines."""
    from pipeline.progress import skipped_lines

    skipped = [
        {"shard": "s0", "key": f"k{i}", "reason": "decode: bad" if i % 3 else "empty: no bytes"} for i in range(7)
    ]
    assert skipped_lines([], "images", "see x") == []
    assert skipped_lines(skipped, "images", "see the cache manifest", shown=2) == [
        "skipped 7 images: decode x4, empty x3",
        "  s0/k0: empty: no bytes",
        "  s0/k1: decode: bad",
        "  ... and 5 more (see the cache manifest)",
    ]
