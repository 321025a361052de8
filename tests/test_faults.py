"""Fault injection: nothing ends with exit 0 and wrong or missing data (issues #14 and #30).

Damaged feature caches and CAM stores (a lost chunk, group or manifest; a truncated chunk
object), cut tars with and without an index, killed and concurrent runs, and the user
mistakes that must be one line with exit 2. For each: the exit status, the message, and
that every later reader (verify, info, train, cams, eval) gives exactly the right data or
refuses clearly. One small cache and CAM store (4 shards x 2 tiny images) are built once
per module; tests damage copies. CLI jobs run in-process through ``jobs.cli.main``, except
where a real process must die (SIGKILL) or run beside another. Round 2 (issue #30): damaged
checkpoints and manifests, labels outside the classifier, shard bytes changed since packing,
flipped bits in chunks (crc32c), NaN read back, duplicate keys at extraction, CAM store damage
re-made, a full disk, second writers and Ctrl-C during Ray's start.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from lcam import LCAM, build_backbone
from pipeline.fs import read_json
from pipeline.shards.format import ShardCountMismatch, ShardError, ShardInfo, ShardReadError
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards, read_shard
from pipeline.store.cam_store import CamStore
from pipeline.store.feature_cache import FeatureCache
from pipeline.store.identity import shard_id_for
from pipeline.store.integrity import StoreDamaged
from pipeline.store.manifest import MANIFEST
from pipeline.train.checkpoints import save_checkpoint
from tests.helpers import manifest_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F16 = 6 * 2.0**-11  # float16 rounding of features up to 6 (ReLU6)


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def make_images(root, n=8):
    """n tiny JPEGs (smooth random colours) in two class folders that are not WordNet ids."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("cats" if i % 2 else "dogs")
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40, 40), Image.BILINEAR).save(d / f"img{i}.jpg", quality=90)


def features_by_key(cache_url: str) -> dict[str, np.ndarray]:
    cache = FeatureCache.open(cache_url)
    return {k: f for keys, feats, _, _ in cache.iter_rows(batch_size=4, view=0) for k, f in zip(keys, feats)}


def cams_by_key(store_url: str) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for _, data in CamStore.open(store_url).iter_shards():
        for i, k in enumerate(data["keys"]):
            out[k] = {n: v[i] for n, v in data.items() if n != "keys"}
    return out


def member_offsets(path) -> list[tuple[str, int, int]]:
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data + m.size) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The shards alone (no Ray): 4 shards of 2 images, and the same images one per shard."""
    root = tmp_path_factory.mktemp("faults")
    make_images(root / "images")
    pack_folder(root / "images", str(root / "shards"), samples_per_shard=2, progress=False)
    pack_folder(root / "images", str(root / "single"), samples_per_shard=1, progress=False)  # 8 shards: room for a kill
    return {"root": root, "shards": str(root / "shards"), "single": str(root / "single")}


@pytest.fixture(scope="module")
def base(packed, ray_local):
    root = packed["root"]
    assert main(["extract", str(root / "shards"), str(root / "cache"), "--batch-size", "8"]) == 0
    backbone = build_backbone("efficientnet_lite0")
    torch_state = LCAM(backbone).attention.state_dict()
    save_checkpoint(str(root / "ckpt.pt"), attention_state=torch_state, method="fm", backbone=backbone.describe())
    assert main(["cams", str(root / "ckpt.pt"), str(root / "cams"), "--cache", str(root / "cache"), "--quiet"]) == 0
    urls = [s.url for s in list_shards(str(root / "shards"))]
    return {
        "root": root,
        "shards": str(root / "shards"),
        "single": str(root / "single"),
        "cache": str(root / "cache"),
        "ckpt": str(root / "ckpt.pt"),
        "cams": str(root / "cams"),
        "urls": urls,
        "features": features_by_key(str(root / "cache")),
        "maps": cams_by_key(str(root / "cams")),
    }


def copy_cache(base, tmp_path) -> str:
    dst = tmp_path / "cache"
    shutil.copytree(base["cache"], dst)
    return str(dst)


def train_args(cache: str, out) -> list[str]:
    return [
        "train",
        "--method",
        "fm",
        "--cache",
        cache,
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--target",
        "predicted",
        "--no-progress",
    ]


def assert_readers_refuse(capsys, base, cache: str, tmp_path, *phrases: str) -> None:
    """train and cams --cache: exit 2, one line naming the damage (and no traceback)."""
    for argv in (
        train_args(cache, tmp_path / "run"),
        ["cams", base["ckpt"], tmp_path / "cams-out", "--cache", cache, "--quiet"],
    ):
        code, _, err = cli(capsys, *argv)
        assert code == 2, (argv[0], err)
        assert "Traceback" not in err
        for p in phrases:
            assert p in err, (argv[0], p, err)


# ---------------------------------------------------------------- the feature cache
def test_lost_chunk_every_reader_refuses_then_repair_and_reextract(base, tmp_path, capsys):
    cache = copy_cache(base, tmp_path)
    url = base["urls"][1]
    sid = shard_id_for(url)
    os.remove(f"{cache}/shards/{sid}/features/c/0/0/0/0/0")

    code, out, _ = cli(capsys, "cache", "verify", cache)
    assert code == 1 and f"shard {url}: features has 1 of 1 chunk objects missing" in out
    code, out, _ = cli(capsys, "cache", "info", cache)
    assert code == 0 and f"DAMAGED      {url}: 1 chunk objects missing" in out
    assert_readers_refuse(
        capsys,
        base,
        cache,
        tmp_path,
        f"shard {url}",
        "is damaged",
        f"lcam cache repair {cache}",
        f"lcam extract {url} {cache}",
    )
    with pytest.raises(StoreDamaged, match="chunk objects of features are missing"):
        list(FeatureCache.open(cache).iter_rows())

    code, out, _ = cli(capsys, "cache", "repair", cache)
    assert code == 0 and f"forgot   {url}" in out and "1 damaged shard(s) forgotten" in out
    code, out, _ = cli(capsys, "cache", "verify", cache)
    assert (
        code == 1 and f"missing shard {url}: not in the cache (expected 2 samples)" in out
    )  # counts were recorded as planned
    # the command the message names re-makes the shard; then the cache holds exactly the right data
    code, out, _ = cli(capsys, "extract", url, cache, "--batch-size", "8")
    assert code == 0 and "0 already cached, 1 extracted now" in out
    assert cli(capsys, "cache", "verify", cache)[0] == 0
    got = features_by_key(cache)
    assert sorted(got) == sorted(base["features"])
    for k, f in got.items():
        np.testing.assert_allclose(f, base["features"][k], atol=F16, rtol=0)


def test_lost_group_and_lost_manifest(base, tmp_path, capsys):
    cache = copy_cache(base, tmp_path)
    url = base["urls"][0]
    shutil.rmtree(f"{cache}/shards/{shard_id_for(url)}")
    code, out, _ = cli(capsys, "cache", "verify", cache)
    assert code == 1 and f"shard {url}: group shards/{shard_id_for(url)} missing or unreadable" in out
    assert_readers_refuse(capsys, base, cache, tmp_path, f"shard {url}", "its group is missing")

    shutil.rmtree(cache)
    cache = copy_cache(base, tmp_path)
    shutil.rmtree(f"{cache}/manifest")
    code, out, _ = cli(capsys, "cache", "verify", cache)
    assert code == 1 and f"the manifest ({MANIFEST}) is missing but 4 shard groups exist" in out
    code, out, _ = cli(capsys, "cache", "info", cache)
    assert code == 0 and f"PROBLEM      the manifest ({MANIFEST}) is missing" in out
    code, _, err = cli(capsys, *train_args(cache, tmp_path / "run"))
    assert code == 2 and "holds no finished shards" in err
    code, _, err = cli(capsys, "cams", base["ckpt"], tmp_path / "cams-out", "--cache", cache, "--quiet")
    assert code == 2 and "holds no samples" in err


def test_truncated_chunk_objects(base, tmp_path, capsys):
    cache = copy_cache(base, tmp_path)
    url = base["urls"][2]
    obj = f"{cache}/shards/{shard_id_for(url)}/top5_classes/c/0/0"
    data = open(obj, "rb").read()
    open(obj, "wb").write(data[: len(data) // 2])
    code, out, _ = cli(capsys, "cache", "verify", cache)
    assert code == 1 and f"shard {url}: a chunk object is unreadable" in out
    # train reads the top-1 class, cams the top-5: both decode this object
    assert_readers_refuse(capsys, base, cache, tmp_path, f"shard {url}", "chunk object is unreadable")


# ---------------------------------------------------------------- the CAM store
def test_cam_store_lost_chunk_refused_repaired_and_resumed(base, tmp_path, capsys):
    store_url = str(tmp_path / "cams")
    shutil.copytree(base["cams"], store_url)
    url = base["urls"][3]
    sid = shard_id_for(url)
    os.remove(f"{store_url}/shards/{sid}/raw/c/0/0/0/0")
    store = CamStore.open(store_url)
    with pytest.raises(
        StoreDamaged, match=f"shard {url}.*chunk objects of raw are missing.*lcam cache repair {store_url}"
    ):
        store.read_shard(sid)
    # the gallery reads the store: refused, naming the shard
    from pipeline.cams.gallery import write_gallery

    with pytest.raises(StoreDamaged, match=f"shard {url}"):
        write_gallery(store, 8, out_url=str(tmp_path / "gallery"), progress=False)

    code, out, _ = cli(capsys, "cache", "repair", store_url)
    assert code == 0 and f"forgot   {url}" in out
    code, out, _ = cli(capsys, "cams", base["ckpt"], store_url, "--cache", base["cache"], "--quiet")
    assert code == 0
    got = cams_by_key(store_url)
    assert sorted(got) == sorted(base["maps"])
    for k, row in got.items():
        for name, v in row.items():
            np.testing.assert_array_equal(v, base["maps"][k][name])


# ---------------------------------------------------------------- shards
def cut_copies(src, folder):
    """(boundary-cut, mid-member-cut) copies of a packed shard: the second sample's image lost."""
    offsets = member_offsets(src)
    image = [o for o in offsets if o[0].endswith(".jpg")][-1]  # the last image member
    data = open(src, "rb").read()
    boundary, mid = folder / "cut-boundary.tar", folder / "cut-mid.tar"
    # before the last sample's members: a shorter valid-looking tar with no end blocks
    last_key = image[0].rsplit(".", 1)[0]
    first_of_last = min(o[1] for o in offsets if o[0].rsplit(".", 1)[0] == last_key)
    boundary.write_bytes(data[:first_of_last])
    mid.write_bytes(data[: image[1] + 512 + 100])
    return boundary, mid


def test_cut_tars_with_and_without_index(base, tmp_path, capsys):
    src = base["urls"][0]
    boundary, mid = cut_copies(src, tmp_path)
    assert len(read_shard(src)) == 2  # the intact tar reads whole without an index
    with pytest.raises(ShardReadError, match="end-of-archive"):
        read_shard(str(boundary))  # no index: only the missing end blocks tell
    with pytest.raises(ShardReadError, match="damaged"):
        read_shard(str(mid))
    with pytest.raises(ShardCountMismatch, match=r"the index says 2 samples but the tar holds 1 \(1 with an image\)"):
        read_shard(ShardInfo(str(boundary), boundary.name, 2))
    with pytest.raises(ShardError):
        read_shard(ShardInfo(str(mid), mid.name, 2))
    # a sample whose image member was lost: "holds 1 (0 with an image)", not "holds 1"
    only_meta = tmp_path / "meta-only.tar"
    first_image = next(o for o in member_offsets(src) if o[0].endswith(".jpg"))
    only_meta.write_bytes(open(src, "rb").read()[: first_image[1]])
    with pytest.raises(ShardCountMismatch, match=r"holds 1 \(0 with an image\)"):
        read_shard(ShardInfo(str(only_meta), only_meta.name, 2))

    # eval reads the shards: a cut one (its index says 2) is refused in one line
    folder = tmp_path / "evalshards"
    shutil.copytree(base["shards"], folder)
    shutil.copy(boundary, folder / os.path.basename(src))
    code, _, err = cli(
        capsys,
        "eval",
        folder / os.path.basename(src),
        tmp_path / "eval-out",
        "--checkpoint",
        base["ckpt"],
        "--methods",
        "none",
    )
    assert code == 2 and os.path.basename(src) in err and "Traceback" not in err


def test_failed_shards_recorded_listed_and_retried(base, tmp_path, capsys):
    folder = tmp_path / "shards"
    shutil.copytree(base["shards"], folder)
    src = base["urls"][0]
    # two third-party shards (no index entry) holding the samples of shard 0 under other keys
    wholes = {}
    for prefix in ("x", "y"):
        wholes[prefix] = tmp_path / f"whole-{prefix}.tar"
        with tarfile.open(src) as tin, tarfile.open(wholes[prefix], "w") as tout:
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                m.name = prefix + m.name
                tout.addfile(m, io.BytesIO(data))
    boundary, _ = cut_copies(wholes["x"], tmp_path)
    shutil.copy(boundary, folder / "extra-a.tar")
    (tmp_path / "y").mkdir()
    _, mid = cut_copies(wholes["y"], tmp_path / "y")
    shutil.copy(mid, folder / "extra-b.tar")
    cache = str(tmp_path / "cache")
    pattern = str(folder / "*.tar")

    code, out, _ = cli(capsys, "extract", pattern, cache, "--batch-size", "8")
    assert code == 1
    assert f"FAILED shard {folder / 'extra-a.tar'}" in out and "end-of-archive" in out
    assert f"FAILED shard {folder / 'extra-b.tar'}" in out
    failed = manifest_of(cache)["failed"]
    assert sorted(failed) == [str(folder / "extra-a.tar"), str(folder / "extra-b.tar")]
    code, out, _ = cli(capsys, "cache", "verify", cache)
    assert (
        code == 1
        and f"failed shard {folder / 'extra-a.tar'}" in out
        and f"failed shard {folder / 'extra-b.tar'}" in out
    )
    code, out, _ = cli(capsys, "cache", "info", cache)
    assert f"FAILED       {folder / 'extra-a.tar'}" in out

    # the whole files arrive: the next run retries exactly the failed ones
    shutil.copy(wholes["x"], folder / "extra-a.tar")
    shutil.copy(wholes["y"], folder / "extra-b.tar")
    code, out, _ = cli(capsys, "extract", pattern, cache, "--batch-size", "8")
    assert code == 0 and "4 already cached, 2 extracted now" in out
    manifest = manifest_of(cache)
    assert manifest.get("failed") == {} and manifest["expected_counts"][str(folder / "extra-a.tar")] == 2
    assert cli(capsys, "cache", "verify", cache)[0] == 0
    got = features_by_key(cache)
    assert len(got) == 8 + 4  # extra-a and extra-b: shard 0's two images under keys x... and y...
    for k, f in got.items():
        np.testing.assert_allclose(f, base["features"][k if k in base["features"] else k[1:]], atol=F16, rtol=0)


# ---------------------------------------------------------------- killed and concurrent runs
def lease_names(store: str) -> list[str]:
    """The leases, written whole, in a store's ``leases/`` group: a lease group with its
    zarr.json (its folder appears first), or a leases/<id>.json of before."""
    folder = f"{store}/leases"
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(
        n for n in names if (n.endswith(".json") and n != "zarr.json") or os.path.exists(f"{folder}/{n}/zarr.json")
    )


def _poll_kill(proc, store: str, at_least: int = 1, timeout: float = 300) -> int:
    done = 0
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = len(manifest_of(store).get("shards", {}))
        if done >= at_least:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    return done


def test_killed_extraction_verify_is_right_and_resume_completes(base, ray_local, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "extract", base["single"], cache, "--batch-size", "1"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = _poll_kill(proc, cache, at_least=2)  # a resume with more than one shard done
    assert 2 <= done < 8, f"the kill did not land mid-run ({done} shards done)"
    code, out, _ = cli(capsys, "cache", "verify", cache)
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    done = len(manifest_of(cache)["shards"])
    assert code == 1 and len(problems) == 8 - done and all("missing shard" in p for p in problems), out
    code, out, _ = cli(capsys, "extract", base["single"], cache, "--batch-size", "8")
    assert code == 0 and f"{done} already cached, {8 - done} extracted now" in out
    assert "notice: another extraction" not in out  # the killed run's lease was its own, on this host: gone
    code, out, _ = cli(capsys, "cache", "verify", cache, "--index", base["single"])
    assert code == 0, out
    assert len(FeatureCache.open(cache)) == 8
    got = features_by_key(cache)
    assert sorted(got) == sorted(base["features"])
    for k, f in got.items():
        np.testing.assert_allclose(f, base["features"][k], atol=F16, rtol=0)


def test_two_extractions_at_once_notice_and_consistent(base, ray_local, tmp_path):
    cache = str(tmp_path / "cache")
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "jobs.cli", "extract", base["single"], cache, "--batch-size", "8"]
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The first has planned its work and taken its lease: pause it there, before its Ray
    # pipeline holds CPUs (two pipelines on the session's 2-CPU Ray could starve each other).
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not lease_names(cache):
        time.sleep(0.02)
    assert first.poll() is None, "the first extraction ended before the second started"
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        first.send_signal(signal.SIGCONT)
    first_out, _ = first.communicate(timeout=600)
    assert second.returncode == 0 and first.returncode == 0, (second.stdout, second.stderr, first_out)
    assert "notice: another extraction into this cache started" in second.stdout
    assert (
        "8 extracted now" in first_out and "8 extracted now" in second.stdout
    )  # both did all the work (no shard lock yet)
    assert os.listdir(f"{cache}/leases") == ["zarr.json"]  # both gave their lease back, folder and all
    assert FeatureCache.open(cache).verify(expected={s.url: s.count for s in list_shards(base["single"])}).ok
    got = features_by_key(cache)
    assert sorted(got) == sorted(base["features"])
    for k, f in got.items():
        np.testing.assert_allclose(f, base["features"][k], atol=F16, rtol=0)


def test_killed_cam_generation_resumes_to_the_full_store(base, ray_local, tmp_path, capsys):
    out_url = str(tmp_path / "cams")
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "cams",
            base["ckpt"],
            out_url,
            "--shards",
            base["single"],
            "--batch-size",
            "1",
            "--quiet",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = _poll_kill(proc, out_url)
    assert 1 <= done < 8, f"the kill did not land mid-run ({done} shards done)"
    store = CamStore.open(out_url)
    report, forgotten = store.repair()
    assert report.ok and forgotten == []  # done shards are whole; half-written groups are not in the manifest
    code, _, err = cli(
        capsys, "cams", base["ckpt"], out_url, "--shards", base["single"], "--batch-size", "8", "--quiet"
    )
    assert code == 0, err
    got = cams_by_key(out_url)
    assert sorted(got) == sorted(base["maps"])
    for k, row in got.items():  # images (float32 F) against the cache (float16 F): float16 rounding apart
        want = base["maps"][k]
        np.testing.assert_array_equal(row["class_ids"], want["class_ids"])
        scale = np.abs(want["raw"]).max()
        np.testing.assert_allclose(row["raw"], want["raw"], atol=8 * 2.0**-11 * scale)


# ---------------------------------------------------------------- user mistakes: one line, exit 2, nothing created
def one_line_error(capsys, *argv) -> str:
    code, out, err = cli(capsys, *argv)
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lcam {argv[0]}: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("option", ["foo", "=bar", "a..b=1", ".a=1"])
def test_malformed_storage_option(packed, tmp_path, capsys, option):
    base = packed
    line = one_line_error(capsys, "extract", base["shards"], tmp_path / "cache", "--cache-storage-option", option)
    assert repr(option) in line and "must look like key=value" in line
    assert not (tmp_path / "cache").exists()


def test_extract_mistakes_before_anything_is_made(packed, tmp_path, capsys):
    base = packed
    cache = tmp_path / "cache"
    for bad in ("0", "-3"):
        line = one_line_error(capsys, "extract", base["shards"], cache, "--batch-size", bad)
        assert f"--batch-size must be a positive number of images, got {bad}" in line
    line = one_line_error(capsys, "extract", base["shards"], cache, "--backbone", "no_such_net")
    assert "unknown backbone 'no_such_net'" in line and "efficientnet_lite0" in line
    line = one_line_error(capsys, "extract", base["shards"], "nope://bucket/cache")
    assert "unknown storage protocol 'nope'" in line
    line = one_line_error(capsys, "extract", base["shards"], "abfs://container/cache")  # adlfs is not a dependency
    assert "needs a package that is not installed" in line and "adlfs" in line
    assert not cache.exists()

    if os.geteuid() == 0:  # root may write anywhere a mode bit forbids; /sys refuses even root
        denied = "/sys/lcam-faults-test/cache"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        denied = str(locked / "cache")
    line = one_line_error(capsys, "extract", base["shards"], denied)
    assert "permission denied" in line or "read-only" in line
    assert not os.path.exists(denied)


def test_s3_without_credentials_or_endpoint(packed, s3, s3_server, tmp_path, capsys, monkeypatch):
    base = packed
    bucket, options = s3
    import fsspec

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    line = one_line_error(
        capsys,
        "extract",
        base["shards"],
        f"{bucket}/cache",
        "--cache-storage-option",
        f"client_kwargs.endpoint_url={s3_server}",
    )
    assert "no credentials for the object store" in line
    from tests.conftest import free_port

    line = one_line_error(
        capsys,
        "extract",
        base["shards"],
        f"{bucket}/cache",
        "--cache-storage-option",
        "key=testing",
        "--cache-storage-option",
        "secret=testing-secret",
        "--cache-storage-option",
        f"client_kwargs.endpoint_url=http://127.0.0.1:{free_port()}",
    )
    assert "cannot reach the object store" in line
    assert fsspec.filesystem("s3", **options, skip_instance_cache=True).ls(bucket) == []  # nothing created


# ---------------------------------------------------------------- labels and small things
def test_folder_labels_are_flagged_when_packing_and_training(packed, tmp_path, capsys, caplog):
    index = read_json(f"{packed['shards']}/index.json")
    assert index["labels"]["scheme"] == "folders" and index["labels"]["classifier_classes"] is False
    assert {s.labels_scheme for s in list_shards(packed["shards"])} == {"folders"}
    make_images(tmp_path / "images", n=2)
    code, out, _ = cli(capsys, "shards", tmp_path / "images", tmp_path / "out", "--no-progress")
    assert code == 0 and "not ImageNet WordNet ids" in out and "--target predicted" in out
    wn = tmp_path / "wn" / "n01440764"
    wn.mkdir(parents=True)
    shutil.copy(next((tmp_path / "images" / "dogs").glob("*.jpg")), wn / "a.jpg")
    code, out, _ = cli(capsys, "shards", tmp_path / "wn", tmp_path / "wn-out", "--no-progress")
    assert code == 0 and "WordNet" not in out
    assert read_json(f"{tmp_path}/wn-out/index.json")["labels"]["classifier_classes"] is True

    # a cache whose shards came from such folders (extraction records the scheme per shard)
    from pipeline.train.loader import CacheLoader

    cache = FeatureCache.create_or_open(str(tmp_path / "cache"), {"backbone": "tiny"}, feature_shape=(2, 1, 1))
    for i, scheme in enumerate(["imagenet", "folders"]):
        entry = cache.write_shard(
            f"/data/s{i}.tar",
            keys=[f"k{i}"],
            labels=[i],
            features=np.ones((1, 2, 1, 1)),
            top5_classes=np.zeros((1, 5)),
            top5_probs=np.zeros((1, 5)),
        )
        cache.mark_done([{**entry, "labels_scheme": scheme}])
    cache = FeatureCache.open(str(tmp_path / "cache"))
    assert cache.folder_labelled_shards() == ["/data/s1.tar"]
    with caplog.at_level("WARNING", logger="pipeline.train.loader"):
        CacheLoader(cache, 4, target="predicted")
        assert not caplog.records
        CacheLoader(cache, 4, target="label")
    assert (
        len(caplog.records) == 1
        and "--target predicted" in caplog.records[0].getMessage()
        and "/data/s1.tar" in caplog.records[0].getMessage()
    )


def test_skip_reasons_carry_no_object_repr(tmp_path, capsys):
    d = tmp_path / "images" / "cats"
    d.mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(d / "ok.jpg")
    (d / "junk.jpg").write_bytes(b"this is not an image at all")
    report = pack_folder(tmp_path / "images", str(tmp_path / "out"), progress=False)
    assert [s["file"] for s in report.skipped] == ["cats/junk.jpg"]
    reason = report.skipped[0]["reason"]
    assert "0x" not in reason and "<" not in reason and "not a recognised image format" in reason


# ================================================================ round 2 (issue #30)
def damaged_checkpoints(good: str, folder) -> dict[str, tuple[str, str]]:
    """name -> (path, phrase its one line must hold): each way a checkpoint file goes wrong."""
    import torch

    data = open(good, "rb").read()
    payload = torch.load(good, weights_only=True)

    def variant(name: str, **change) -> str:
        q = {k: v for k, v in payload.items() if change.get(k, "") is not None}
        q.update({k: v for k, v in change.items() if v is not None})
        buf = io.BytesIO()
        torch.save(q, buf)
        (folder / name).write_bytes(buf.getvalue())
        return str(folder / name)

    (folder / "empty.pt").write_bytes(b"")
    (folder / "cut.pt").write_bytes(data[: len(data) // 2])
    return {
        "empty": (str(folder / "empty.pt"), "is empty (0 bytes)"),
        "truncated": (str(folder / "cut.pt"), "is truncated or damaged"),
        "wrong shape": (
            variant("shape.pt", attention={"conv.weight": torch.zeros(10, 1280, 1, 1), "conv.bias": torch.zeros(10)}),
            "attention conv.weight has shape (10, 1280, 1, 1), but its backbone efficientnet_lite0 needs (1000, 1280, 1, 1)",
        ),
        "no attention": (variant("noatt.pt", attention=None), "it has no 'attention' entry"),
        "bad metadata": (variant("json.pt", backbone='{"backbone": "eff'), "its 'backbone' entry is not valid JSON"),
    }


def test_damaged_checkpoints_are_one_line_for_cams_eval_and_resume(base, tmp_path, capsys):
    for what, (path, phrase) in damaged_checkpoints(base["ckpt"], tmp_path).items():
        line = one_line_error(capsys, "cams", path, tmp_path / "cams-out", "--cache", base["cache"], "--quiet")
        assert f"checkpoint {path!r}" in line and phrase in line, (what, line)
        assert not (tmp_path / "cams-out").exists()
    empty = str(tmp_path / "empty.pt")
    line = one_line_error(
        capsys, "eval", base["shards"], tmp_path / "eval-out", "--checkpoint", empty, "--methods", "none"
    )
    assert f"checkpoint {empty!r} is empty (0 bytes)" in line
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tmp_path / "cut.pt", run / "checkpoint.pt")
    before = sorted(os.listdir(run))
    line = one_line_error(capsys, *train_args(base["cache"], run), "--resume")
    assert f"checkpoint.pt' ({os.path.getsize(run / 'checkpoint.pt')} bytes) is truncated or damaged" in line
    assert sorted(os.listdir(run)) == before  # nothing written beside it


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous checkpoint whole under its name, and no temporary."""
    from pipeline import fs as fs_module
    from pipeline.train.checkpoints import load_checkpoint

    backbone = build_backbone("efficientnet_lite0")
    state = LCAM(backbone).attention.state_dict()
    url = str(tmp_path / "checkpoint.pt")
    save_checkpoint(url, attention_state=state, method="fm", backbone=backbone.describe(), epoch=1)
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs_module.os, "fsync", full_disk)
    with pytest.raises(Exception, match="No space left|disk full"):
        save_checkpoint(url, attention_state=state, method="fm", backbone=backbone.describe(), epoch=2)
    monkeypatch.setattr(fs_module.os, "fsync", real_fsync)
    assert load_checkpoint(url)["epoch"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_manifest_is_one_line_and_repair_rebuilds_it(base, tmp_path, capsys, damage):
    cache = copy_cache(base, tmp_path)
    manifest = f"{cache}/{MANIFEST}"
    data = open(manifest, "rb").read()
    open(manifest, "wb").write(data[: len(data) // 2] if damage == "truncated" else b"")
    want = f"{MANIFEST} is damaged: " + ("not valid JSON" if damage == "truncated" else "empty (0 bytes)")
    for argv in (
        ("cache", "info", cache),
        ("cache", "verify", cache),
        train_args(cache, tmp_path / "run"),
        ("extract", base["shards"], cache),
        ("cams", base["ckpt"], tmp_path / "cams-out", "--cache", cache, "--quiet"),
    ):
        line = one_line_error(capsys, *argv)
        assert f"feature cache {cache}: {want}" in line and f"lcam cache repair {cache}" in line, line
    code, out, _ = cli(capsys, "cache", "repair", cache)
    assert code == 0 and f"{MANIFEST} rebuilt from 4 complete shard groups" in out
    assert cli(capsys, "cache", "verify", cache)[0] == 0
    got = features_by_key(cache)
    assert sorted(got) == sorted(base["features"])
    for k, f in got.items():
        np.testing.assert_array_equal(f, base["features"][k])

    store = str(tmp_path / "cams")
    shutil.copytree(base["cams"], store)
    open(f"{store}/{MANIFEST}", "wb").write(b"")
    line = one_line_error(capsys, "cams", "info", store)
    assert f"CAM store {store}: {MANIFEST} is damaged: empty (0 bytes)" in line
    code, out, _ = cli(capsys, "cache", "repair", store)
    assert code == 0 and "rebuilt from 4 complete shard groups" in out
    got = cams_by_key(store)
    assert sorted(got) == sorted(base["maps"])
    for k, row in got.items():
        for name, v in row.items():
            np.testing.assert_array_equal(v, base["maps"][k][name])


def labelled_folder(root, rows: list[str]):
    """A flat folder of 3 images and a labels.tsv of ``rows``."""
    make_images(root / "tmp", n=3)
    root.mkdir(exist_ok=True)
    for i, p in enumerate(sorted((root / "tmp").rglob("*.jpg"))):
        shutil.move(p, root / f"im{i}.jpg")
    shutil.rmtree(root / "tmp")
    (root / "labels.tsv").write_text("file\tclass_index\n" + "".join(r + "\n" for r in rows))
    return root


def test_labels_outside_the_classifier_and_rows_without_files(tmp_path, capsys):
    src = labelled_folder(tmp_path / "flat", ["im0.jpg\t3", "im1.jpg\t1000", "im2.jpg\t7", "gone.jpg\t5"])
    line = one_line_error(capsys, "shards", src, tmp_path / "out", "--no-progress")
    assert (
        "labels.tsv, line 3: class 1000 is outside the classifier's classes 0..999" in line
        and "--skip-bad-labels" in line
    )
    assert not (tmp_path / "out" / "index.json").exists()

    code, out, _ = cli(capsys, "shards", src, tmp_path / "out", "--no-progress", "--skip-bad-labels")
    assert code == 0 and "packed 2 images" in out
    assert "im1.jpg: class 1000 outside the classifier's 0..999 (labels.tsv line 3)" in out
    assert "labels file rows naming no image in the folder: 1" in out and "line 5: gone.jpg" in out
    report = read_json(f"{tmp_path}/out/pack_report.json")
    assert report["labels_unmatched"] == [{"line": 5, "file": "gone.jpg"}]
    assert [s["file"] for s in report["skipped"]] == ["im1.jpg"]
    assert sorted((s.key, s.label) for s in read_shard(list_shards(str(tmp_path / "out"))[0])) == [
        ("im0", 3),
        ("im2", 7),
    ]
    # another classifier: --num-classes sets the range
    line = one_line_error(capsys, "shards", src, tmp_path / "out5", "--no-progress", "--num-classes", "2")
    assert "line 2: class 3 is outside the classifier's classes 0..1" in line
    code, out, _ = cli(capsys, "shards", src, tmp_path / "out1001", "--no-progress", "--num-classes", "1001")
    assert code == 0 and "packed 3 images" in out


def third_party_shard(path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, label in samples:
            for ext, data in (("cls", str(label).encode()), ("jpg", image)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_third_party_class_outside_the_classifier_refused_by_train_and_skipped_by_cams(base, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    shutil.copytree(base["cache"], cache)
    # one shard of the cache, its labels rewritten to a class the classifier lacks
    import zarr

    url = base["urls"][0]
    labels = zarr.open_array(f"{cache}/shards/{shard_id_for(url)}/labels", mode="r+")
    labels[:] = np.array([1000, 3], dtype=np.int32)
    keys = zarr.open_group(f"{cache}/shards/{shard_id_for(url)}", mode="r").attrs["keys"]
    argv = [a if a != "predicted" else "label" for a in train_args(cache, tmp_path / "run")]
    line = one_line_error(capsys, *argv)
    assert f"sample {keys[0]!r}" in line and "has class 1000, outside the classifier's classes 0..999" in line
    code, out, _ = cli(
        capsys, "cams", base["ckpt"], tmp_path / "cams", "--cache", cache, "--classes", "label", "--quiet"
    )
    assert code == 0 and f"{keys[0]}: label 1000 is not one of the classifier's classes" in out
    assert sorted(cams_by_key(str(tmp_path / "cams"))) == sorted(k for k in base["maps"] if k != keys[0])


def test_changed_shard_bytes_and_duplicate_keys_fail_their_shards_at_extraction(base, tmp_path, capsys):
    folder = tmp_path / "shards"
    shutil.copytree(base["shards"], folder)
    changed = folder / os.path.basename(base["urls"][1])
    image = next(o for o in member_offsets(changed) if o[0].endswith(".jpg"))
    data = bytearray(changed.read_bytes())
    data[image[2] - 40 : image[2] - 36] = bytes(
        b ^ 0x5A for b in data[image[2] - 40 : image[2] - 36]
    )  # 4 bytes inside one JPEG
    changed.write_bytes(bytes(data))
    # two third-party shards (no index entry) that share a key
    with tarfile.open(base["urls"][0]) as tar:
        jpeg = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".jpg"))).read()
    third_party_shard(folder / "extra-a.tar", [("same", jpeg, 1), ("only-a", jpeg, 2)])
    third_party_shard(folder / "extra-b.tar", [("same", jpeg, 1)])
    cache = str(tmp_path / "cache")
    code, out, _ = cli(capsys, "extract", folder / "*.tar", cache, "--batch-size", "8")
    assert code == 1, out
    assert f"FAILED shard {changed}" in out and "its bytes changed since packing" in out
    dup = [ln for ln in out.splitlines() if "duplicate key 'same'" in ln]
    assert len(dup) == 1 and "already holds it" in dup[0]
    loser = os.path.basename(dup[0].split()[2].rstrip(":"))  # whichever finished second
    winner = {"extra-a.tar": "extra-b.tar", "extra-b.tar": "extra-a.tar"}[loser]
    assert f"shard {folder / winner} already holds it" in dup[0]
    code, out, _ = cli(capsys, "cache", "verify", cache)
    assert (
        code == 1
        and f"failed shard {changed}" in out
        and f"failed shard {folder / loser}" in out
        and "duplicate key" in out
    )
    assert "PROBLEM  duplicate key 'same': appears" not in out  # the cache itself holds no duplicate

    # the shard restored: a re-run makes exactly it, the features equal the original cache's
    shutil.copy(base["urls"][1], changed)
    (folder / loser).unlink()
    code, out, _ = cli(capsys, "extract", folder / "*.tar", cache, "--batch-size", "8")
    assert code == 0 and "extracted now" in out
    got = features_by_key(cache)
    for k, f in base["features"].items():
        np.testing.assert_array_equal(got[k], f)


def test_flipped_bits_in_chunks_are_errors_never_values(base, tmp_path, capsys):
    cache = copy_cache(base, tmp_path)
    assert read_json(f"{cache}/zarr.json")["attributes"]["chunk_checksum"] == "crc32c"
    url = base["urls"][2]
    obj = f"{cache}/shards/{shard_id_for(url)}/features/c/0/0/0/0/0"
    clean = open(obj, "rb").read()
    rng = np.random.default_rng(5)
    for bit in rng.choice(len(clean) * 8, size=6, replace=False):
        data = bytearray(clean)
        data[bit // 8] ^= 1 << (bit % 8)
        open(obj, "wb").write(bytes(data))
        code, out, _ = cli(capsys, "cache", "verify", cache)
        assert code == 1 and f"shard {url}: a chunk object is unreadable" in out, (bit, out)
    assert_readers_refuse(capsys, base, cache, tmp_path, f"shard {url}", "chunk object is unreadable")


def test_non_finite_features_read_back_are_damage_not_a_training_problem(base, tmp_path, capsys):
    import zarr

    cache = copy_cache(base, tmp_path)
    url = base["urls"][3]
    arr = zarr.open_array(f"{cache}/shards/{shard_id_for(url)}/features", mode="r+")  # rewritten with a valid checksum
    feats = arr[:]
    feats[1, 0, 5, 0, 0] = np.nan
    arr[:] = feats
    code, out, _ = cli(capsys, "cache", "verify", cache)
    assert code == 1 and f"shard {url}: 1 rows have NaN/Inf features" in out
    line = one_line_error(capsys, *train_args(cache, tmp_path / "run"))
    assert f"shard {url}" in line and "is damaged" in line and "NaN/Inf" in line and "learning rate" not in line


def test_cam_store_damage_listed_and_remade_by_a_rerun(base, tmp_path, capsys):
    store = str(tmp_path / "cams")
    shutil.copytree(base["cams"], store)
    url = base["urls"][1]
    os.remove(f"{store}/shards/{shard_id_for(url)}/probs/c/0/0")
    code, out, _ = cli(capsys, "cams", "info", store)
    assert (
        code == 0
        and f"DAMAGED      {url}: 1 chunk objects missing (e.g. shards/{shard_id_for(url)}/probs/c/0/0)" in out
    )
    t0 = time.time()
    line = one_line_error(capsys, "audit", store, "--out", tmp_path / "audit")
    assert f"CAM store {store}: 1 shard(s) damaged, e.g. {url}" in line and time.time() - t0 < 20  # before Ray starts
    assert not (tmp_path / "audit").exists()
    code, out, _ = cli(capsys, "cams", base["ckpt"], store, "--cache", base["cache"])
    assert code == 0 and f"re-made damaged shard {url}" in out and "3 already done, 1 written now" in out
    assert "DAMAGED" not in cli(capsys, "cams", "info", store)[1]
    got = cams_by_key(store)
    assert sorted(got) == sorted(base["maps"])
    for k, row in got.items():
        for name, v in row.items():
            np.testing.assert_array_equal(v, base["maps"][k][name])
    assert os.listdir(f"{store}/leases") == ["zarr.json"]  # the run's lease is gone, folder and all


def test_ctrl_c_during_ray_start_leaves_no_ray_process(packed, tmp_path):
    """A local Ray (no RAY_ADDRESS) interrupted while starting: within 10 s of the command's
    end, none of the processes it started lives (Ray's agents used to outlive it by a minute)."""
    from pipeline.processes import descendant_pids, process_alive

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "extract", packed["shards"], str(tmp_path / "cache")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, seen = time.time() + 240, []
    while time.time() < deadline and proc.poll() is None:
        seen = descendant_pids(proc.pid)
        names = [open(f"/proc/{p}/comm").read().strip() if os.path.exists(f"/proc/{p}/comm") else "" for p in seen]
        if any("raylet" in n for n in names):  # mid start-up: the raylet is up, its agents are starting
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the extraction ended before Ray started"
    seen = descendant_pids(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "lcam extract: interrupted" in err and "Traceback" not in err, err
    end = time.time() + 10
    while time.time() < end and any(process_alive(p) for p in seen):
        time.sleep(0.2)
    assert not [p for p in seen if process_alive(p)], "Ray processes outlived the interrupted command by 10 s"
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_finished_command_exits_at_once_and_leaves_no_ray_process(packed, tmp_path):
    """The ``lcam`` command (jobs.cli.console) on a local Ray: the summary, exit 0, a complete
    cache, and within 30 s of its end none of the processes it started lives (it skips the
    interpreter's slow teardown and ends its Ray by signal)."""
    from pipeline.processes import descendant_pids, process_alive

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=tempfile.mkdtemp(prefix="rq-", dir="/tmp"))
    cache = str(tmp_path / "cache")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "extract", packed["shards"], cache, "--no-progress"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[int] = set()
    commands: dict[int, str] = {}
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        for pid in set(descendant_pids(proc.pid)) - seen:
            try:
                commands[pid] = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
            except OSError:  # already gone
                pass
            seen.add(pid)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "extracted now" in out and "Traceback" not in err, out + err
    assert seen, "no Ray process was seen"
    # its Ray runs without the dashboard (LCAM_RAY_DASHBOARD unset): Ray keeps a minimal
    # dashboard.py (usage stats, no frontend) but starts none of the dashboard's module processes
    dashboards = [c[:150] for c in commands.values() if "ray-dashboard-" in c]
    assert not dashboards and any("raylet" in c for c in commands.values()), (dashboards, list(commands.values()))
    assert len(FeatureCache.open(cache)) == 8  # the 8 images of `packed`
    end = time.time() + 30  # SIGTERM'd, each ends by itself: seconds, more on a loaded machine
    while time.time() < end and any(process_alive(p) for p in seen):
        time.sleep(0.2)
    left = [(p, open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:150]) for p in seen if process_alive(p)]
    assert not left, f"Ray processes outlived the finished command by 30 s: {left}"
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


LOCAL_RAY_PROBE = """
import json, os
from pipeline.raykit import ensure_ray, stop_local_ray
from pipeline.processes import descendant_pids
ensure_ray()
from ray._private.state import state
env = {}
for pid in descendant_pids(os.getpid()):
    try:
        if b"log_monitor.py" in open(f"/proc/{pid}/cmdline", "rb").read():
            env = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\\0") if "=" in v)
    except OSError:
        pass
print(json.dumps({"config": state.get_system_config(), "log_monitor_env": env}))
stop_local_ray()
"""


def test_a_local_ray_of_ours_runs_without_metrics_and_polls_less():
    """A Ray that ``ensure_ray`` starts (no dashboard) has Ray's metrics collection off, its log
    monitor rescanning the log folder every 5 s (not every 0.1 s) and its dashboard agent taking
    node stats every 60 s (not 5 s): its daemons' CPU cut by a third on 2 cores (benchmarks/RESULTS.md).
    Its memory monitor (OOM protection) and task events stay on. The Ray processes that ray.init
    starts inherit the environment; the log monitor's is read (the agent retitles itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LCAM_RAY_DASHBOARD")}
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=tempfile.mkdtemp(prefix="rq-", dir="/tmp"))
    for name in ("LOG_NAME_UPDATE_INTERVAL_S", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "REPORTER_UPDATE_INTERVAL_MS"):
        env.pop(name, None)
    try:
        out = subprocess.run(
            [sys.executable, "-c", LOCAL_RAY_PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240
        )
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    config = seen["config"]
    assert config.get("enable_metrics_collection") is False, config
    assert config.get("memory_monitor_refresh_ms", 250) > 0 and "task_events_report_interval_ms" not in config
    assert seen["log_monitor_env"].get("LOG_NAME_UPDATE_INTERVAL_S") == "5", sorted(seen["log_monitor_env"])
    assert seen["log_monitor_env"].get("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD") == "0"
    assert seen["log_monitor_env"].get("REPORTER_UPDATE_INTERVAL_MS") == "60000"


def test_a_running_ray_start_head_is_joined_not_refused(packed, tmp_path):
    """`ray start --head` left running on this machine (RAY_ADDRESS unset): the command joins it
    (Ray refuses a new Ray's settings for a running cluster: that was a ValueError traceback),
    starts no Ray of its own, and leaves the head running when it ends."""
    import socket

    from pipeline.processes import descendant_pids, process_alive
    from tests.helpers import stop_ray_head

    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=temp)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(os.path.join(temp, "ray", "ray_current_cluster")):
            assert head.poll() is None, "ray start --head failed"
            time.sleep(0.5)
        cache = str(tmp_path / "cache")
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "extract", packed["shards"], cache, "--no-progress"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        names: set[str] = set()
        while proc.poll() is None:
            for pid in descendant_pids(proc.pid):
                try:
                    names.add(open(f"/proc/{pid}/comm").read().strip())
                except OSError:
                    pass
            time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "extracted now" in out and "Traceback" not in err, out + err
        assert not names & {"raylet", "gcs_server"}, f"the command started a Ray of its own: {names}"
        assert len(FeatureCache.open(cache)) == 8
        assert head.poll() is None and process_alive(head.pid), "the command stopped a Ray it did not start"
    finally:
        stop_ray_head(head, temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_second_writer_of_a_cam_store_or_a_run_is_told_who_holds_it(base, tmp_path, capsys, caplog):
    store = str(tmp_path / "cams")
    shutil.copytree(base["cams"], store)
    os.makedirs(f"{store}/leases", exist_ok=True)  # a lease as a writer of before left it: still read
    other = {"host": "gpu-node-7", "pid": 4242, "started": "2026-01-01T00:00:00+00:00", "what": "CAM generation"}
    with open(f"{store}/leases/abc.json", "w") as f:
        json.dump(other, f)
    code, out, _ = cli(capsys, "cams", base["ckpt"], store, "--cache", base["cache"])
    assert code == 0 and "notice: another writer (CAM generation)" in out and "host gpu-node-7, pid 4242" in out
    assert sorted(os.listdir(f"{store}/leases")) == ["abc.json", "zarr.json"]  # its own lease dropped, the other's kept

    run = tmp_path / "run"
    os.makedirs(run / "leases")
    with open(run / "leases" / "abc.json", "w") as f:
        json.dump({**other, "what": "lcam train (fm)"}, f)
    with caplog.at_level("WARNING", logger="pipeline.store.leases"):
        assert cli(capsys, *train_args(base["cache"], run))[0] == 0
    assert any(
        "another writer (lcam train (fm))" in r.getMessage() and "gpu-node-7" in r.getMessage() for r in caplog.records
    )
    assert os.listdir(run / "leases") == ["abc.json"]


def test_disk_full_is_one_line_naming_the_file_and_nothing_is_marked_done(base, tmp_path, capsys, monkeypatch):
    """ENOSPC while the manifest is committed (the last write of a shard): one line naming the
    file, exit 2, the shard not marked done; a re-run once there is space makes exactly it."""
    from pipeline import fs as fs_module

    store = str(tmp_path / "cams")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs_module.os, "fsync", full)
    line = one_line_error(capsys, "cams", base["ckpt"], store, "--cache", base["cache"], "--quiet")
    assert f"no space left on the device writing {store}/{MANIFEST}" in line and "a re-run resumes" in line
    monkeypatch.undo()
    assert not manifest_of(store).get("shards")
    assert cli(capsys, "cams", base["ckpt"], store, "--cache", base["cache"], "--quiet")[0] == 0
    got = cams_by_key(store)
    assert sorted(got) == sorted(base["maps"])
    for k, row in got.items():
        for name, v in row.items():
            np.testing.assert_array_equal(v, base["maps"][k][name])
