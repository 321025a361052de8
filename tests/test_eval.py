"""``lcam eval`` with real components: EfficientNet-Lite0, WebDataset shards, pytorch-grad-cam, local Ray.

The L-CAM checkpoints are made without training: "fm" carries the classifier's own fc
weights (Z[t] is then the classic CAM of class t, a meaningful map), "img" a seeded
random attention. Scores are checked against pytorch-grad-cam's
``CamMultImageConfidenceChange`` and against an independent per-image computation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image

from lcam import LCAM, build_backbone
from lcam.metrics.adic import AD_FORMULA, IC_FORMULA
from pipeline.configs import EvalConfig
from pipeline.errors import UserError
from pipeline.evaluation.config import MethodSpec
from pipeline.evaluation.engine import Evaluator
from pipeline.evaluation.plan import plan_batches
from pipeline.evaluation.run import evaluate
from pipeline.shards.format import ShardInfo
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards, read_shard
from pipeline.train.checkpoints import CheckpointMismatch, save_checkpoint
from tests.helpers import center_crop_tensor, skimage_photos

RATIOS = (1.0, 0.5, 0.15)
METHODS = ("gradcam", "gaussian", "random", "rise")


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0")


def classic_cam_state(backbone) -> dict[str, torch.Tensor]:
    model = LCAM(backbone)
    fc = backbone.head[-1]
    with torch.no_grad():
        model.attention.conv.weight.copy_(fc.weight[:, :, None, None])
        model.attention.conv.bias.copy_(fc.bias / 49)
    return model.attention.state_dict()


def add_foreign_shard(folder, good_image: bytes):
    """A shard packed elsewhere (no index entry): an undecodable image, then a good one."""
    with tarfile.open(folder / "extra.tar", "w") as tar:
        for key, ext, data in [
            ("bad0", "jpg", b"\xff\xd8\xff not a jpeg"),
            ("bad0", "cls", b"1"),
            ("good0", "jpg", good_image),
            ("good0", "cls", b"0"),
        ]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory, backbone):
    root = tmp_path_factory.mktemp("eval")
    photos = skimage_photos(("chelsea", "coffee", "astronaut", "rocket", "camera"))
    cuts = [
        ("chelsea", 0, 0),
        ("coffee", 40, 60),
        ("astronaut", 0, 100),
        ("rocket", 60, 200),
        ("camera", 100, 100),
        ("astronaut", 200, 150),
    ]
    for i, (name, y, x) in enumerate(cuts):
        d = root / "images" / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[name][y : y + 300, x : x + 320]).save(d / f"{name}{i}.jpg", quality=92)
    pack_folder(root / "images", str(root / "shards"), samples_per_shard=4, progress=False)
    first = read_shard(list_shards(str(root / "shards"))[0])[0]
    add_foreign_shard(root / "shards", first.image)
    fm, img = str(root / "fm.pt"), str(root / "img.pt")
    save_checkpoint(
        fm, attention_state=classic_cam_state(backbone), method="fm", backbone=backbone.describe(), epoch=3, step=30
    )
    torch.manual_seed(1)
    save_checkpoint(
        img, attention_state=LCAM(backbone).attention.state_dict(), method="img", backbone=backbone.describe()
    )
    return {"root": root, "shards": str(root / "shards" / "*.tar"), "fm": fm, "img": img}


def config(data, out, **kw) -> EvalConfig:
    base = dict(
        shards=data["shards"],
        out=str(out),
        checkpoints=[data["fm"], data["img"]],
        methods=METHODS,
        method_limits={"rise": 2},
        method_options={"rise": {"num_masks": 8, "mask_batch": 8}},
        batch_size=3,
        progress=False,
    )
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def local_run(data):
    out = data["root"] / "out-local"
    return evaluate(config(data, out, engine="local")), out


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------- planning


def test_metric_contract_does_not_import_the_aggregation():
    """The arrow runs one way: results.py imports the metrics; the metrics' hints name the
    protocols of base.py, whose every member EvalResults and MethodResult have as a field."""
    import ast
    import dataclasses
    import pathlib

    from pipeline.evaluation import metrics
    from pipeline.evaluation.metrics.base import EvalOutcome, MethodOutcome
    from pipeline.evaluation.results import EvalResults, MethodResult

    for path in sorted(pathlib.Path(metrics.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            named = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in getattr(node, "names", [])]
                if isinstance(node, ast.Import)
                else []
            )
            assert not any(n.split(".")[-1] == "results" for n in named), f"{path.name} imports {named}"
    for proto, cls in ((EvalOutcome, EvalResults), (MethodOutcome, MethodResult)):
        members = {n for n, v in vars(proto).items() if isinstance(v, property)}
        missing = members - {f.name for f in dataclasses.fields(cls)}
        assert members and not missing, (cls.__name__, missing)


def test_plan_is_seeded_nested_and_never_straddles_a_shard():
    shards = [ShardInfo(f"s{i}.tar", f"s{i}.tar", n) for i, n in enumerate((5, 3, 4))]
    a = plan_batches(shards, batch_size=2, limit=7, seed=3)
    assert a == plan_batches(shards, batch_size=2, limit=7, seed=3)  # seeded: the same plan
    assert a.available == 12 and a.selected == 7
    assert plan_batches(shards, 2, 7, seed=4).batches != a.batches
    starts = {"s0.tar": 0, "s1.tar": 5, "s2.tar": 8}
    chosen = [starts[b.shard_url] + p for b in a.batches for p in b.positions]
    assert len(set(chosen)) == 7 and chosen == sorted(chosen)  # distinct, in shard order
    assert all(len(b.positions) <= 2 for b in a.batches)
    assert sorted(r for b in a.batches for r in b.ranks) == list(range(7))  # a permutation of the selection
    whole = plan_batches(shards, batch_size=4, limit=None, seed=0)
    assert [len(b.positions) for b in whole.batches] == [4, 1, 3, 4]  # cut at every shard end
    with pytest.raises(UserError, match="holds|hold"):
        plan_batches(shards, 2, limit=13, seed=0)


# ---------------------------------------------------------------------------- cross-checks


def test_all_ratios_agree_with_pytorch_grad_cam_on_the_same_maps(backbone):
    """The issue's cross-check, at 100%, 50% and 15%, on real Grad-CAM maps of real photos:
    CamMultImageConfidenceChange gives O - Y for maps we hand it; AD divides by Y ourselves."""
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from lcam.cam_methods.gradcam import GradCAM
    from lcam.metrics.adic import keep_mask, keep_top, prepare_cams

    images = torch.stack([center_crop_tensor(p) for p in skimage_photos().values()])
    pixels = (images * 255).round().to(torch.uint8).numpy()
    ev = Evaluator(backbone, [MethodSpec("gradcam", "gradcam", "Grad-CAM")], RATIOS)
    res = ev.evaluate_batch(pixels, np.arange(4), batch_id=0)
    ids, Y, O = torch.from_numpy(res["class_ids"]), res["Y"], res["methods"]["gradcam"]["adic"]["O"]
    maps = prepare_cams(GradCAM(backbone)(images, ids), (224, 224))
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in ids]
    with torch.no_grad():
        y_lib = backbone(images).softmax(1)[torch.arange(4), ids].numpy()
    np.testing.assert_allclose(Y, y_lib, atol=1e-5)
    for j, r in enumerate(RATIOS):
        kept = keep_top(maps, r)
        assert (keep_mask(maps, r).flatten(1).sum(1) == math.ceil(r * 224 * 224)).all()
        diff = CamMultImageConfidenceChange()(images, kept.numpy(), targets, backbone)  # O - Y, not divided by Y
        np.testing.assert_allclose(O[j] - Y, diff, atol=2e-5)
        ad_lib = 100 / 4 * np.sum(np.maximum(0, -diff) / y_lib)
        ours = 100 / 4 * np.sum(np.maximum(0, Y - O[j]) / Y)
        assert abs(ours - ad_lib) < 1e-2
        assert 100 / 4 * np.sum(O[j] > Y) == 100 / 4 * np.sum(diff > 0)
    assert res["methods"]["gradcam"]["map_forwards"] == 4 and res["methods"]["gradcam"]["adic_forwards"] == 12
    assert res["clean_forwards"] == 4
    ev.close()
    assert not backbone.features._forward_pre_hooks


def test_costly_methods_report_their_forwards_while_they_run(backbone):
    """RISE reports every masked forward (images x masks) to the progress hook; Grad-CAM, one pass, reports none."""
    from pipeline.evaluation.run import MethodProgress

    seen: list[tuple[str, int]] = []
    specs = [
        MethodSpec("gradcam", "gradcam", "Grad-CAM"),
        MethodSpec("rise", "rise", "RISE", {"num_masks": 6, "mask_batch": 4}),
    ]
    ev = Evaluator(backbone, specs, RATIOS, on_method_forwards=lambda m, n: seen.append((m, n)))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    ev.evaluate_batch(pixels, np.arange(3), batch_id=0)
    ev.close()
    assert {m for m, _ in seen} == {"rise"} and sum(n for _, n in seen) == 3 * 6
    bars = MethodProgress(
        specs + [MethodSpec("rise2", "rise", "RISE", {"num_masks": 5}, limit=2)], backbone, 3, True
    ).bars
    assert {k: b.total for k, b in bars.items()} == {"rise": 3 * 6, "rise2": 2 * 5}
    assert MethodProgress(specs, backbone, 3, False).bars == {}


def reference_scores(backbone, state, image: torch.Tensor) -> tuple[int, float, list[float]]:
    """The reference style, written independently: batch 1, clean pass, then per ratio the
    attention recomputed (all K maps), min-max, upsample, stable-argsort keep, mask, softmax."""
    model = LCAM(backbone)
    model.attention.load_state_dict(state)
    x = image[None]
    with torch.no_grad():
        probs = backbone(x).softmax(1)[0]
        c = int(probs.argmax())
        outs = []
        for r in RATIOS:
            z = model.attention(backbone.features(backbone.normalize(x)))[0, c].double()
            z = (z - z.min()) / (z.max() - z.min())
            up = nnf.interpolate(z[None, None].float(), size=(224, 224), mode="bilinear", align_corners=False)[
                0, 0
            ].numpy()
            k = math.ceil(round(r * 224 * 224, 6))
            order = np.argsort(-up.ravel(), kind="stable")
            mask = np.zeros(224 * 224, np.float32)
            mask[order[:k]] = up.ravel()[order[:k]]
            masked = x * torch.from_numpy(mask.reshape(224, 224))
            outs.append(float(backbone(masked).softmax(1)[0, c]))
    return c, float(probs[c]), outs


def test_lcam_scores_equal_the_reference_style_per_image(data, local_run, backbone):
    summary, out = local_run
    rows = {r["key"]: r for r in read_csv(out / "per_image.csv") if r["method"] == "lcam-fm"}
    state = classic_cam_state(backbone)
    decoded = {}
    for info in list_shards(data["shards"]):
        for s in read_shard(info):
            if s.key != "bad0":
                decoded[s.key] = center_crop_tensor(np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")))
    assert set(rows) == set(decoded)
    for key in sorted(decoded)[:3]:
        c, y, o = reference_scores(backbone, state, decoded[key])
        r = rows[key]
        assert int(r["predicted"]) == c
        assert abs(float(r["Y"]) - y) < 1e-5
        np.testing.assert_allclose([float(r[f"O@{q:g}"]) for q in RATIOS], o, atol=2e-5)


# ---------------------------------------------------------------------------- the job end to end


def test_local_run_rows_subsets_and_numbers(data, local_run):
    summary, out = local_run
    assert summary.images == 7 and summary.skipped == 1  # bad0 does not decode
    rows = read_csv(out / "per_image.csv")
    keys = {"chelsea0", "coffee1", "astronaut2", "rocket3", "camera4", "astronaut5", "good0"}
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    assert set(by_method) == {"lcam-fm", "lcam-img", "gradcam", "gaussian", "random", "rise"}
    for m, rs in by_method.items():
        if m == "rise":  # the two images of rank < 2
            assert sorted(int(r["rank"]) for r in rs) == [0, 1]
        else:
            assert {r["key"] for r in rs} == keys and len(rs) == 7
    # every method explains the same class with the same Y on an image
    for k in keys:
        same = {(r["predicted"], r["Y"]) for r in rows if r["key"] == k}
        assert len(same) == 1
    report = json.loads((out / "results.json").read_text())
    for m, rs in by_method.items():
        Y = np.array([float(r["Y"]) for r in rs])
        entry = report["methods"][m]
        assert entry["n"] == len(rs)
        for j, q in enumerate(RATIOS):
            O = np.array([float(r[f"O@{q:g}"]) for r in rs])
            assert abs(entry["ad"][j] - 100 * np.mean(np.maximum(0, Y - O) / Y)) < 1e-4
            assert entry["ic"][j] == pytest.approx(100 * np.mean(O > Y))
    assert report["methods"]["lcam-fm"]["info"]["epoch"] == 3
    assert report["methods"]["lcam-fm"]["info"]["checkpoint"] == data["fm"]


def test_outputs_record_protocol_and_are_complete(data, local_run):
    summary, out = local_run
    assert sorted(p.name for p in out.iterdir()) == [
        "adic.png",
        "per_image.csv",
        "results.json",
        "results.md",
    ]  # no temp files
    report = json.loads((out / "results.json").read_text())
    p = report["protocol"]
    assert p["num_images"] == 7 and p["ratios"] == [1.0, 0.5, 0.15] and p["target"] == "predicted"
    assert "pixel space" in p["masking"] and "softmax" in p["score"] and "row-major" in p["tie_rule"]
    assert p["ad_formula"] == AD_FORMULA and p["ic_formula"] == IC_FORMULA
    assert report["data"]["skipped"][0]["key"] == "bad0" and report["data"]["available"] == 8
    assert report["seeds"]["rise"] == 0 and report["methods"]["rise"]["config"]["num_masks"] == 8
    assert {"torch", "grad-cam", "numpy"} <= set(report["versions"])
    assert report["backbone"]["backbone"] == "efficientnet_lite0"
    assert report["subsets"]["2"][0]["n"] == 2  # every method on RISE's 2 images
    assert "storage_options" not in json.dumps(report["config"])
    md = (out / "results.md").read_text()
    assert "| L-CAM-Fm | 7 |" in md and "| RISE | 2 |" in md and AD_FORMULA in md and "bad0" in md
    im = Image.open(out / "adic.png")
    assert im.format == "PNG" and im.size[0] > 600


def test_ray_engine_gives_exactly_the_local_numbers(data, local_run, ray_local):
    _, local_out = local_run
    out = data["root"] / "out-ray"
    summary = evaluate(config(data, out, engine="ray", torch_threads=torch.get_num_threads()))
    assert summary.images == 7 and summary.skipped == 1
    assert (out / "per_image.csv").read_bytes() == (local_out / "per_image.csv").read_bytes()
    a, b = json.loads((local_out / "results.json").read_text()), json.loads((out / "results.json").read_text())
    for m in a["methods"]:
        assert a["methods"][m]["ad"] == b["methods"][m]["ad"] and a["methods"][m]["ic"] == b["methods"][m]["ic"]
    assert b["engine"]["name"] == "ray"


# ---------------------------------------------------------------------------- bad input and the CLI


def test_bad_inputs_fail_clearly_and_write_nothing(data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="unknown method 'gradcam2'"):
        evaluate(config(data, out, methods=("gradcam2",)))
    with pytest.raises(UserError, match="more images than the shards hold"):
        evaluate(config(data, out, limit=100))
    with pytest.raises(UserError, match="exceeds"):
        evaluate(config(data, out, limit=3, method_limits={"rise": 5}))
    with pytest.raises(UserError, match="not evaluated"):
        evaluate(config(data, out, method_limits={"scorecam": 5}))
    with pytest.raises(UserError, match="no file matches|no shards"):
        evaluate(config(data, out, shards=str(tmp_path / "none-*.tar")))
    other = build_backbone("resnet18", weights="random")
    wrong = str(tmp_path / "wrong.pt")
    save_checkpoint(wrong, attention_state=LCAM(other).attention.state_dict(), method="fm", backbone=other.describe())
    with pytest.raises(CheckpointMismatch, match="resnet18"):
        evaluate(config(data, out, checkpoints=[data["fm"], wrong]))
    assert not out.exists()


def test_road_option_reports_morf_lerf(data, tmp_path):
    out = tmp_path / "road"
    # percentile 90: only 10% of the pixels imputed, so the sparse solves stay small
    summary = evaluate(
        config(
            data,
            out,
            checkpoints=[],
            methods=("gaussian",),
            method_limits={},
            limit=2,
            metrics=("road",),
            metric_options={"road": {"percentiles": (90,)}},
        )
    )
    road = summary.methods[0].metrics["road"]
    assert road["forwards"] == 2 * (2 * 1 + 1)  # per image: 2P + 1 (clean, MoRF, LeRF at one percentile)
    assert len(road["morf_mean"]) == len(road["lerf_mean"]) == 1
    assert road["combined"] == pytest.approx((road["lerf_mean"][0] - road["morf_mean"][0]) / 2)
    rows = read_csv(out / "per_image.csv")
    assert len(rows) == 2 and all(0 <= float(r["road_morf_mean"]) <= 1 for r in rows)
    assert "## ROAD" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["road"]["percentiles"] == [90]


def test_insertion_deletion_plugin_end_to_end(data, tmp_path, backbone):
    """The proof that a metric is one plug-in: it reaches results.json, results.md and per_image.csv,
    and its per-image AUCs are those of lcam.metrics on the same images and maps."""
    from lcam.cam_methods.base import build_method
    from lcam.metrics.insertion_deletion import insertion_deletion

    out = tmp_path / "insdel"
    summary = evaluate(
        config(
            data,
            out,
            checkpoints=[],
            methods=("gaussian",),
            method_limits={},
            limit=2,
            metrics=("insdel",),
            metric_options={"insdel": {"steps": 2}},
        )
    )
    report = json.loads((out / "results.json").read_text())
    assert report["insdel"]["steps"] == 2 and "blur" in report["insdel"]["insertion_baseline"]
    assert report["metrics"] == ["adic", "insdel"]
    rows = read_csv(out / "per_image.csv")
    assert len(rows) == 2 and {"insertion_auc", "deletion_auc", "O@0.15"} <= set(rows[0])
    for m in summary.methods:
        s = m.metrics["insdel"]
        assert s["forwards"] == 2 * 2 * (2 + 1)  # 2 images x 2 curves x (S + 1) points
        mine = [float(r["insertion_auc"]) for r in rows if r["method"] == m.id]
        assert (
            s["insertion_auc"] == pytest.approx(np.mean(mine))
            and report["methods"][m.id]["insdel"]["insertion_auc"] == s["insertion_auc"]
        )
    # independently: the Gaussian map on the two decoded images, through lcam.metrics directly
    keys = {r["key"] for r in rows}
    images = {
        s.key: center_crop_tensor(np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")))
        for info in list_shards(data["shards"])
        for s in read_shard(info)
        if s.key in keys
    }
    x = torch.stack([images[k] for k in sorted(keys)])
    ids = torch.tensor([int(next(r["predicted"] for r in rows if r["key"] == k)) for k in sorted(keys)])
    cams = build_method("gaussian", backbone)(x, ids)
    ref = insertion_deletion(backbone, x, cams, ids, steps=2)
    got = {r["key"]: (float(r["insertion_auc"]), float(r["deletion_auc"])) for r in rows if r["method"] == "gaussian"}
    for j, k in enumerate(sorted(keys)):
        assert got[k][0] == pytest.approx(ref.insertion_auc()[j].item(), abs=2e-5)
        assert got[k][1] == pytest.approx(ref.deletion_auc()[j].item(), abs=2e-5)
    md = (out / "results.md").read_text()
    assert "## Insertion / deletion AUC" in md and "| Centred Gaussian | 2 |" in md


def test_cli_runs_and_reports_errors(data, tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "cli"
    assert (
        main(
            ["eval", data["shards"], str(out), "--methods", "gaussian", "--limit", "2", "--seed", "5", "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Centred Gaussian" in printed and "evaluated 2 images" in printed
    rows = read_csv(out / "per_image.csv")
    assert len(rows) == 2 and {r["method"] for r in rows} == {"gaussian"}
    assert main(["eval", data["shards"], str(tmp_path / "x"), "--method-limit", "gaussian5"]) == 2
    assert "METHOD=N" in capsys.readouterr().err
    assert main(["eval", data["shards"], str(tmp_path / "x"), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
