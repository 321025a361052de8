"""The whole pipeline (extract -> L-CAM-Fm and L-CAM-Img -> CAMs -> evaluation with Grad-CAM
-> report) with a timm backbone and a user's ``module.path:factory`` backbone: the spec
string travels to the Ray actors and Ray Train workers and is recorded everywhere.
Tiny inputs (size=64 / size=32), random weights, 6 images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lcam import Preprocessing, build_backbone
from pipeline.images import decode_image, preprocess
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards, read_shard
from pipeline.store.feature_cache import FeatureCache
from pipeline.train.checkpoints import load_checkpoint
from tests.helpers import skimage_photos


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("specdata")
    folder = root / "images"
    folder.mkdir()
    names = []
    for i, (name, rgb) in enumerate(skimage_photos().items()):
        for j, size in enumerate((96, 80)[: 2 if i < 2 else 1]):  # 6 small images
            im = Image.fromarray(rgb).convert("RGB").resize((size + 8 * j, size))
            im.save(folder / f"{name}{j}.png")
            names.append(f"{name}{j}.png")
    (folder / "labels.tsv").write_text("file\tclass_index\n" + "".join(f"{n}\t-1\n" for n in names))
    pack_folder(folder, str(root / "shards"), samples_per_shard=3, progress=False)
    return root / "shards"


@pytest.mark.parametrize(
    "spec,layer", [("timm:resnet18,size=64", None), ("tests.custom_backbones:tiny,size=32", "features")]
)
def test_pipeline_end_to_end_with_a_spec(ray_local, shards, tmp_path, spec, layer, capsys):
    from jobs.cli import main

    wd = tmp_path / "wd"
    argv = [
        "pipeline",
        "--train-shards",
        str(shards),
        "--workdir",
        str(wd),
        "--backbone",
        spec,
        "--weights",
        "random",
        "--method",
        "both",
        "--target",
        "predicted",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "3",
        "--schedule",
        "onecycle",
        "--lr",
        "0.05",
        "--views",
        "center",
        "--img-augment",
        "center",
        "--eval-methods",
        "gradcam",
        "--overlays",
        "2",
        "--gallery-images",
        "2",
        "--extract-batch-size",
        "3",
    ]
    if layer:  # --layer folds into the spec: the recorded name says where the split is
        argv += ["--layer", layer]
    assert main(argv) == 0, capsys.readouterr().err
    name = build_backbone(spec, "random", layer=layer).name
    backbone = build_backbone(name, "random")

    cache = FeatureCache.open(str(wd / "cache"))
    ident = cache.identity
    assert ident["backbone"] == name and ident["weights_digest"] == backbone.weights_digest()
    assert Preprocessing.from_dict(ident["preprocessing"]) == backbone.preprocessing  # interpolation included
    assert tuple(cache.feature_shape) == backbone.feature_shape
    # the Ray actor rebuilt the same model from the spec: its features equal ours on the images
    want = {}
    for info in list_shards(str(shards)):
        for s in read_shard(info):
            with torch.no_grad():
                want[s.key] = backbone.extract(preprocess(decode_image(s.image), backbone.preprocessing)[None])[0][
                    0
                ].numpy()
    seen = {k: f for keys, feats, _, _ in cache.iter_rows(batch_size=4, view=0) for k, f in zip(keys, feats)}
    assert sorted(seen) == sorted(want)
    for k, f in seen.items():
        np.testing.assert_allclose(f.astype(np.float32), want[k], rtol=2e-3, atol=2e-3 * np.abs(want[k]).max())

    for method in ("fm", "img"):
        ck = load_checkpoint(str(wd / f"lcam-{method}" / "checkpoint.pt"))
        assert ck["method"] == method and ck["backbone"]["backbone"] == name
        assert ck["backbone"]["weights_digest"] == backbone.weights_digest()
    results = json.loads((wd / "eval" / "results.json").read_text())
    assert results["backbone"]["backbone"] == name and results["data"]["evaluated"] == 6
    assert {"lcam-fm", "lcam-img", "gradcam"} <= set(results["methods"])
    assert (wd / "report.html").exists() and (wd / "cams").is_dir()
