"""The notebook-facing API: one import place, a short Explanation repr and overlay, brace patterns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.fs import expand_braces, expand_urls

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "pattern, expected",
    [
        (
            "{train,val}-{000000..000002}.tar",
            [
                "train-000000.tar",
                "train-000001.tar",
                "train-000002.tar",
                "val-000000.tar",
                "val-000001.tar",
                "val-000002.tar",
            ],
        ),
        ("s-{8..11}.tar", ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]),  # no padding asked
        ("s-{08..11}.tar", ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]),
        ("{0..10..5}", ["0", "5", "10"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{a..c}", ["a", "b", "c"]),
        ("x{a,b{1..2}}y", ["xay", "xb1y", "xb2y"]),  # nested
        ("s3://bucket/{a,b}/shard.tar", ["s3://bucket/a/shard.tar", "s3://bucket/b/shard.tar"]),
        ("{x}-{,s}", ["{x}-", "{x}-s"]),  # a group with no comma or range stays literal; empty alternatives count
        ("plain.tar", ["plain.tar"]),
        ("open{a,b", ["open{a,b"]),  # unmatched: literal
    ],
)
def test_brace_expansion(pattern, expected):
    assert expand_braces(pattern) == expected


def test_brace_then_glob_on_files(tmp_path):
    for split in ("train", "val"):
        for i in range(3):
            (tmp_path / f"{split}-{i:03d}.tar").write_bytes(b"")
    got = expand_urls(str(tmp_path / "{train,val}-00[02].tar"))
    assert [Path(u).name for u in got] == ["train-000.tar", "train-002.tar", "val-000.tar", "val-002.tar"]


def test_lcam_reexports_pipeline_names_lazily():
    code = (
        "import sys, lcam; before = 'pipeline.cams' in sys.modules;"
        "from lcam import Explainer, FeatureCache, CamStore, build_backbone, LCAM, TrainConfig, train;"
        "import pipeline.cams.explainer, pipeline.store.cam_store, pipeline.store.feature_cache;"
        "print(before, Explainer is pipeline.cams.explainer.Explainer, CamStore is pipeline.store.cam_store.CamStore,"
        " FeatureCache is pipeline.store.feature_cache.FeatureCache)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.stdout.split() == ["False", "True", "True", "True"], proc.stderr
    import lcam

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lcam.Nope  # noqa: B018


def explanation():
    from lcam import LCAM, build_backbone

    torch.manual_seed(0)
    model = LCAM(build_backbone("resnet18", weights="random"))
    return model.explain(torch.rand(5, 3, 64, 64), top_k=2)


def test_explanation_repr_is_short_and_informative():
    e = explanation()
    text = repr(e)
    assert len(text) < 400 and "\n" not in text
    assert text.startswith("Explanation(images=5, targets=2, classes=1000, maps=2x2")
    assert str(e.class_ids[0].tolist()) in text and "2 more" in text


def test_overlay_blends_the_upsampled_map():
    e = explanation()
    image = torch.rand(3, 64, 64)
    out = e.overlay(image, index=1, target=1, alpha=0.0)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())  # alpha 0: the image
    from matplotlib import colormaps

    from lcam import upsample

    heat = e.overlay(np.zeros((64, 64, 3), np.uint8), index=1, target=1, alpha=1.0)
    cam = upsample(e.maps[1, 1], (64, 64)).numpy()
    expected = (colormaps["jet"](cam)[..., :3] * 255).round().astype(np.uint8)
    assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="alpha"):
        e.overlay(image, alpha=2)

    import matplotlib

    matplotlib.use("Agg")
    ax = e.show(image, index=2, class_names={int(e.class_ids[2, 0]): "the class"})
    assert ax.get_title().startswith("the class: p = ")
