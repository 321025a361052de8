"""Bulk CAMs with real components: EfficientNet-Lite0, a real feature cache, Ray, Zarr, PNGs.

The checkpoint's attention is set without training: its 1x1 convolution takes the
classifier's own fc weights (and fc bias / (h*w)), so Z[t] is the classic CAM of class
t. Deterministic, and its maps are meaningful enough to look at.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
import zarr
from PIL import Image

from lcam import LCAM, build_backbone
from pipeline.cams.explainer import Explainer
from pipeline.cams.run import generate_cams
from pipeline.classes import ClassSelection
from pipeline.configs import CamsConfig, ExtractConfig
from pipeline.errors import UserError
from pipeline.extract.run import extract
from pipeline.fs import get_fs, read_json, write_json_atomic
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards, read_shard
from pipeline.store.cam_store import CamStore, CamStoreMismatch
from pipeline.store.feature_cache import FeatureCache
from pipeline.store.identity import shard_id_for
from pipeline.train.checkpoints import CheckpointMismatch, save_checkpoint
from tests.helpers import skimage_photos

SIDE = 256  # photos cut to 256 x 256: Resize(256) is then the identity and the centre crop is [16:240]
C0 = (SIDE - 224) // 2
F16_EPS = 2.0**-11  # float16 relative rounding


def classic_cam_lcam(backbone) -> LCAM:
    model = LCAM(backbone)
    fc = backbone.head[-1]
    h, w = backbone.feature_shape[1:]
    with torch.no_grad():
        model.attention.conv.weight.copy_(fc.weight[:, :, None, None])
        model.attention.conv.bias.copy_(fc.bias / (h * w))
    return model


def make_images(root):
    """2 classes x 3 photos, 256 x 256 crops of scikit-image's photos (one grayscale)."""
    photos = skimage_photos(("chelsea", "coffee", "astronaut", "rocket", "camera"))
    cuts = [
        ("chelsea", 20, 100),
        ("coffee", 60, 150),
        ("astronaut", 0, 120),
        ("rocket", 100, 300),
        ("camera", 128, 128),
        ("astronaut", 250, 200),
    ]
    expected = {}
    for i, (name, y, x) in enumerate(cuts):
        rgb = photos[name][y : y + SIDE, x : x + SIDE]
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(d / f"{name}{i}.png")
        rgb3 = np.repeat(rgb[:, :, None], 3, axis=2) if rgb.ndim == 2 else rgb
        expected[f"{name}{i}"] = rgb3[C0 : C0 + 224, C0 : C0 + 224]
    return expected


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("cams")
    crops = make_images(root / "images")
    pack_folder(root / "images", str(root / "shards"), samples_per_shard=2, progress=False)
    extract(ExtractConfig(shards=str(root / "shards"), cache=str(root / "cache"), batch_size=6, progress=False))
    backbone = build_backbone("efficientnet_lite0")
    model = classic_cam_lcam(backbone)
    ckpt = str(root / "ckpt.pt")
    save_checkpoint(ckpt, attention_state=model.attention.state_dict(), method="fm", backbone=backbone.describe())
    return {
        "root": root,
        "crops": crops,
        "shards": str(root / "shards"),
        "cache": str(root / "cache"),
        "ckpt": ckpt,
        "model": model,
    }


def run(setup, out, **kw) -> object:
    kw.setdefault("cache", setup["cache"])
    return generate_cams(CamsConfig(checkpoint=setup["ckpt"], out=str(out), progress=False, **kw))


def by_key(store: CamStore, fields=None) -> dict[str, dict]:
    """key -> that row of every array."""
    out = {}
    for _, data in store.iter_shards(fields):
        for i, k in enumerate(data["keys"]):
            out[k] = {n: v[i] for n, v in data.items() if n != "keys"}
    return out


@pytest.fixture(scope="module")
def cache_store(setup):
    out = setup["root"] / "cams-cache"
    summary = run(setup, out, upsample=True)
    assert summary.shards_written == 3 and summary.samples == 6 and summary.maps == 6
    return CamStore.open(str(out))


def test_cache_cams_equal_hand_computation_and_keys_match_source(setup, cache_store):
    cache = FeatureCache.open(setup["cache"])
    model = setup["model"]
    W = model.attention.conv.weight[:, :, 0, 0].detach().double().numpy()
    b = model.attention.conv.bias.detach().double().numpy()
    assert cache_store.shard_ids() == cache.shard_ids()  # one group per source shard, same ids
    for (entry, data), sid in zip(cache_store.iter_shards(), cache.shard_ids()):
        c = cache.read_chunk(sid, 0)
        assert data["keys"] == c["keys"]  # aligned with the source, row for row
        assert entry["shard_id"] == shard_id_for(entry["url"])
        np.testing.assert_array_equal(data["class_ids"][:, 0], c["top5_classes"][:, 0])
        np.testing.assert_array_equal(data["probs"][:, 0], c["top5_probs"][:, 0])
        np.testing.assert_array_equal(data["labels"], c["labels"])
        F = c["features"][:, 0].astype(np.float64)  # (n, C, h, w), the cached float16 values
        t = data["class_ids"][:, 0]
        Z = np.einsum("nchw,nc->nhw", F, W[t]) + b[t][:, None, None]
        np.testing.assert_allclose(data["raw"][:, 0], Z, rtol=F16_EPS, atol=1e-4)
        # normalised maps: min 0, max 1 per map; uint8 maps at 224: bilinear of those
        maps = data["maps"][:, 0]
        assert np.allclose(maps.reshape(len(maps), -1).min(1), 0) and np.allclose(maps.reshape(len(maps), -1).max(1), 1)
        zn = (Z - Z.min((1, 2), keepdims=True)) / np.ptp(Z, (1, 2), keepdims=True)
        up = nnf.interpolate(torch.from_numpy(zn)[:, None], size=(224, 224), mode="bilinear", align_corners=False)[
            :, 0
        ].numpy()
        assert np.abs(data["upsampled"][:, 0].astype(float) - np.round(up * 255)).max() <= 1
    src_keys = [s.key for info in list_shards(setup["shards"]) for s in read_shard(info)]
    assert sorted(cache_store.keys()) == sorted(src_keys) and len(cache_store) == 6
    assert cache_store.info()["source"]["kind"] == "cache"
    group = zarr.open_group(f"{cache_store.url}/shards/{cache_store.shard_ids()[0]}", mode="r")
    dims = {name: group[name].metadata.dimension_names for name in group.array_keys()}
    assert dims["raw"] == ("sample", "target", "y", "x") and dims["class_ids"] == ("sample", "target")
    assert dims["upsampled"] == ("sample", "target", "Y", "X") and dims["labels"] == ("sample",)


def test_cache_cams_are_bitwise_the_same_with_any_torch_threads(setup, cache_store):
    """The local cache path runs its products on --torch-threads (default half the cores) and
    gives the driver's setting back; the stored arrays do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        run(setup, setup["root"] / "threads-2", upsample=True, torch_threads=2, where="local")
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(before)
    store = CamStore.open(str(setup["root"] / "threads-2"))
    assert store.shard_ids() == cache_store.shard_ids()
    for (_, a), (_, b) in zip(store.iter_shards(), cache_store.iter_shards()):
        assert a["keys"] == b["keys"] and set(a) == set(b)
        for name in a:
            if name != "keys":
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_images_give_the_same_cams_as_the_cache(setup, cache_store):
    out = setup["root"] / "cams-images"
    summary = generate_cams(
        CamsConfig(
            checkpoint=setup["ckpt"], out=str(out), shards=setup["shards"], upsample=True, batch_size=4, progress=False
        )
    )
    assert summary.failed_shards == [] and summary.samples == 6
    store = CamStore.open(str(out))
    assert store.shard_ids() == cache_store.shard_ids()
    for (ea, a), (eb, b) in zip(store.iter_shards(), cache_store.iter_shards()):
        assert ea["url"] == eb["url"] and a["keys"] == b["keys"]
        np.testing.assert_array_equal(a["class_ids"], b["class_ids"])
        np.testing.assert_allclose(a["probs"], b["probs"], rtol=1e-4, atol=1e-6)
        # cache: Z from float16 F, stored as float16; images: Z from float32 F, stored as float16
        scale = np.abs(b["raw"]).max()
        np.testing.assert_allclose(a["raw"], b["raw"], atol=8 * F16_EPS * scale)
        np.testing.assert_allclose(a["maps"], b["maps"], atol=0.01)
        assert np.abs(a["upsampled"].astype(int) - b["upsampled"].astype(int)).max() <= 3
    assert store.info()["source"]["kind"] == "images"


def test_to_xarray_equals_the_shards_rows(cache_store):
    ds = cache_store.to_xarray()
    assert ds["raw"].dims == ("sample", "target", "y", "x") and ds["upsampled"].dims == ("sample", "target", "Y", "X")
    shards = list(cache_store.iter_shards())
    assert list(ds["shard"].values) == [e["shard_id"] for e, d in shards for _ in d["keys"]]
    assert list(ds["key"].values) == [k for _, d in shards for k in d["keys"]]
    for name in ("labels", "class_ids", "probs", "raw", "upsampled", "predicted", "predicted_prob"):
        np.testing.assert_array_equal(ds[name].values, np.concatenate([d[name] for _, d in shards]))


def test_top_k_class_list_and_label_modes(setup, cache_store):
    cache = FeatureCache.open(setup["cache"])
    head = setup["model"].backbone.head
    W = setup["model"].attention.conv.weight[:, :, 0, 0].detach().double().numpy()
    bias = setup["model"].attention.conv.bias.detach().double().numpy()
    run(setup, setup["root"] / "k3", top_k=3)
    topk = CamStore.open(str(setup["root"] / "k3"))
    ids = [281, 0, 999]
    listed_summary = run(setup, setup["root"] / "ids", class_ids="281,0,999")
    listed = CamStore.open(str(setup["root"] / "ids"))
    run(setup, setup["root"] / "label", classes="label")
    labelled = CamStore.open(str(setup["root"] / "label"))
    assert listed_summary.maps == 18
    for sid in cache.shard_ids():
        c = cache.read_chunk(sid, 0)
        k3, li, la = topk.read_shard(sid), listed.read_shard(sid), labelled.read_shard(sid)
        np.testing.assert_array_equal(k3["class_ids"], c["top5_classes"][:, :3])
        np.testing.assert_array_equal(k3["probs"], c["top5_probs"][:, :3])
        assert k3["raw"].shape == (len(c["keys"]), 3, 7, 7)
        np.testing.assert_array_equal(li["class_ids"], np.tile(ids, (len(c["keys"]), 1)))
        with torch.no_grad():
            p = head(torch.from_numpy(c["features"][:, 0].astype(np.float32))).softmax(1).numpy()
        np.testing.assert_allclose(li["probs"], p[:, ids], rtol=1e-5, atol=1e-7)
        F = c["features"][:, 0].astype(np.float64)
        for j, t in enumerate(ids):
            Z = np.einsum("nchw,c->nhw", F, W[t]) + bias[t]
            np.testing.assert_allclose(li["raw"][:, j], Z, rtol=F16_EPS, atol=1e-4)
        np.testing.assert_array_equal(la["class_ids"][:, 0], c["labels"])
        np.testing.assert_allclose(la["probs"][:, 0], p[np.arange(len(p)), c["labels"]], rtol=1e-5, atol=1e-7)
        # the top-1 of every mode is the classifier's, wherever the explained classes come from
        np.testing.assert_array_equal(li["predicted"], c["top5_classes"][:, 0])
    assert ClassSelection.parse("top-k", 3).width == 3


def test_resume_redoes_only_the_unfinished_shard_and_is_idempotent(setup):
    out = setup["root"] / "resume"
    first = run(setup, out, top_k=2)
    before = {sid: CamStore.open(str(out)).read_shard(sid) for sid in CamStore.open(str(out)).shard_ids()}
    # a crash after writing one group but before the manifest recorded it: its arrays half gone
    doc = read_json(str(out / "manifest" / "zarr.json"))  # the manifest group: the manifest is its attributes
    url = sorted(doc["attributes"]["shards"])[1]
    sid = doc["attributes"]["shards"].pop(url)["shard_id"]
    write_json_atomic(str(out / "manifest" / "zarr.json"), doc)
    shutil.rmtree(out / "shards" / sid / "raw")
    assert len(CamStore.open(str(out))) == 4  # readers see done shards only
    second = run(setup, out, top_k=2)
    assert (first.shards_written, second.shards_done_before, second.shards_written) == (3, 2, 1)
    store = CamStore.open(str(out))
    for s, data in before.items():
        again = store.read_shard(s)
        assert again["keys"] == data["keys"]
        for name in data:
            if name != "keys":
                np.testing.assert_array_equal(again[name], data[name])
    third = run(setup, out, top_k=2)
    assert third.shards_written == 0 and third.shards_done_before == 3
    with pytest.raises(CamStoreMismatch, match="classes.k"):
        run(setup, out, top_k=3)


def test_bad_inputs_fail_clearly_and_write_nothing(setup, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="class id 1000 is out of range.*1000 classes"):
        run(setup, out, class_ids="5,1000")
    with pytest.raises(UserError, match="top-k must be at least 1, got 0"):
        run(setup, out, top_k=0)
    other = build_backbone("resnet18", weights="random")
    ckpt = str(tmp_path / "resnet.pt")
    save_checkpoint(ckpt, attention_state=LCAM(other).attention.state_dict(), method="fm", backbone=other.describe())
    with pytest.raises(CheckpointMismatch, match="resnet18.*not for the feature cache"):
        generate_cams(CamsConfig(checkpoint=ckpt, out=str(out), cache=setup["cache"], progress=False))
    empty = FeatureCache.create_or_open(
        str(tmp_path / "empty"), FeatureCache.open(setup["cache"]).identity, feature_shape=(1280, 7, 7)
    )
    with pytest.raises(UserError, match="holds no samples"):
        run(setup, out, cache=empty.url)
    gone = tmp_path / "shards"
    shutil.copytree(setup["shards"], gone)
    (gone / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match="1 of 3 shards are missing: .*shard-000001.tar"):
        run(setup, out, cache=None, shards=str(gone))
    with pytest.raises(UserError, match="no feature cache"):
        run(setup, out, cache=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="exactly one source"):
        run(setup, out, shards=setup["shards"])
    with pytest.raises(UserError, match="colormap"):
        run(setup, out, overlays=2, colormap="no-such-map")
    assert not out.exists()


def test_overlays_show_the_image_and_the_gallery_links_them(setup, cache_store):
    out = setup["root"] / "pics"
    names = setup["root"] / "names.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(1000)))
    summary = run(
        setup, out, upsample=True, overlays=4, opacity=0.0, class_names=str(names), gallery=str(setup["root"] / "g0")
    )
    assert summary.gallery.endswith("g0/index.html")
    run(setup, out, upsample=True, overlays=4, opacity=0.6, colormap="viridis", class_names=str(names))
    store = CamStore.open(str(out))
    rows = by_key(store)
    from matplotlib import colormaps

    for folder, alpha in ((setup["root"] / "g0", 0.0), (out / "gallery", 0.6)):
        page = (folder / "index.html").read_text()
        items = json.loads(page.split("id='items'>")[1].split("</script>")[0])
        assert len(items) == 4 and "sortCards('confdown'" in page
        for it in items:
            key = it["key"]
            assert f"src='{it['original']}'" in page and f"src='{it['overlay']}'" in page
            original = np.asarray(Image.open(folder / it["original"]))
            crop = setup["crops"][key]
            np.testing.assert_array_equal(original, crop)  # exactly the pixels the model saw
            pic = np.asarray(Image.open(folder / it["overlay"]).convert("RGB"))
            assert pic.shape[0] > 224 and pic.shape[1] == 224  # one panel plus its caption band
            cam = rows[key]["upsampled"][0].astype(np.float64) / 255
            heat = colormaps["viridis"](cam)[..., :3] * 255
            expected = (1 - alpha) * crop + alpha * np.round(heat)
            assert np.abs(pic[:224].astype(float) - expected).max() <= 1.0
            cls, prob = int(rows[key]["class_ids"][0]), float(rows[key]["probs"][0])
            assert f"thing {cls} <code>#{cls}</code> {prob:.1%}" in page
    assert store.info()["gallery"].endswith("gallery/index.html")


def test_explainer_api_single_image_batch_and_targets(setup):
    ex = Explainer.from_checkpoint(setup["ckpt"], device="cpu")
    crops = [torch.from_numpy(c.copy()).permute(2, 0, 1).float() / 255 for c in setup["crops"].values()][:3]
    x = torch.stack(crops)
    ref = setup["model"].explain(x, upsample=True)
    e = ex(x, upsample=True)
    assert e.maps.device == ex.device and e.class_ids.shape == (3, 1)
    torch.testing.assert_close(e.raw, ref.raw)
    torch.testing.assert_close(e.upsampled, ref.upsampled)
    one = ex(crops[1], targets=281)
    assert one.class_ids.tolist() == [[281]] and one.maps.shape == (1, 1, 7, 7)
    torch.testing.assert_close(one.raw[0], setup["model"].explain(x[1:2], targets=[281]).raw[0])
    k = ex(x, top_k=2)
    assert torch.equal(k.class_ids, ref.logits.topk(2, dim=1).indices)
    u8 = ex((x * 255).round().to(torch.uint8))
    assert torch.equal(u8.class_ids, e.class_ids)
    with pytest.raises(ValueError, match=r"pixel space \[0, 1\]"):
        ex(x * 255)
    with pytest.raises(ValueError, match="out of range"):
        ex(x, targets=[1, 2, 1000])
    feats = setup["model"].backbone.features(setup["model"].backbone.normalize(x))
    torch.testing.assert_close(ex.explain_features(feats).raw, ref.raw)


def test_cli_generates_describes_and_reports_errors(setup, capsys):
    from jobs.cli import main

    out = str(setup["root"] / "cli")
    assert main(["cams", setup["ckpt"], out, "--cache", setup["cache"], "--top-k", "2", "--quiet"]) == 0
    assert "3 written now" in capsys.readouterr().out
    assert main(["cams", "info", out]) == 0
    text = capsys.readouterr().out
    assert (
        CamStore.open(out).fingerprint in text
        and "top-2 classes: 2 map(s) per sample" in text
        and "6 in 3 shards" in text
    )
    assert (
        main(["cams", setup["ckpt"], str(setup["root"] / "cli2"), "--cache", setup["cache"], "--class-ids", "3,1000"])
        == 2
    )
    err = capsys.readouterr().err
    assert "class id 1000 is out of range" in err and "Traceback" not in err
    assert main(["cams", "info", str(setup["root"] / "nothing")]) == 2
    assert "no CAM store" in capsys.readouterr().err


def test_store_on_s3_equals_local(setup, cache_store, s3):
    bucket, options = s3
    url = f"{bucket}/cams"
    generate_cams(
        CamsConfig(
            checkpoint=setup["ckpt"],
            out=url,
            cache=setup["cache"],
            upsample=True,
            out_storage_options=options,
            progress=False,
        )
    )
    remote = CamStore.open(url, options)
    assert remote.shard_ids() == cache_store.shard_ids()
    for (_, a), (_, b) in zip(remote.iter_shards(), cache_store.iter_shards()):
        assert a["keys"] == b["keys"]
        for name in ("class_ids", "probs", "raw", "upsampled"):
            np.testing.assert_array_equal(a[name], b[name])
    fs, path = get_fs(url, options)
    assert fs.exists(f"{path}/manifest/zarr.json") and not [p for p in fs.find(path) if ".tmp" in p]
