"""Localisation against bounding boxes: the metrics (by hand and against Quantus), the boxes'
way through ``lcam shards`` and the model's resize/crop, and ``lcam eval``'s columns."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lcam.backbones.base import Preprocessing
from lcam.metrics.adic import prepare_cams
from lcam.metrics.localisation import box_iou, box_masks, energy_pointing_game, pointing_game
from pipeline.errors import UserError
from pipeline.images import boxes_in_crop, preprocess
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards, read_shard

H = W = 8
TINY = "tests.custom_backbones:tiny,size=32"  # random weights: the maps need not be good, only scored right


def peak_map(y: int, x: int) -> torch.Tensor:
    m = torch.zeros(1, H, W)
    m[0, y, x] = 1.0
    return m


def test_box_masks_union_and_pixel_centres():
    masks = box_masks([np.array([[1, 2, 3, 4]]), np.array([[0, 0, 1.4, 1], [6.6, 7, 8, 8]]), np.zeros((0, 4))], (H, W))
    assert masks[0].nonzero().tolist() == [[y, x] for y in (2, 3) for x in (1, 2)]
    # a pixel belongs when its centre does: x < 1.4 holds pixel 0 (centre 0.5), not pixel 1 (1.5)
    assert masks[1].nonzero().tolist() == [[0, 0], [7, 7]]
    assert not masks[2].any()


def test_pointing_game_peak_inside_outside_and_ties():
    box = [np.array([[2, 2, 5, 5]])]
    masks = box_masks(box * 4, (H, W))
    maps = torch.cat([peak_map(3, 3), peak_map(6, 6), torch.zeros(1, H, W), peak_map(2, 4)])
    maps[3, 2, 5] = 1.0  # a tie: (2, 4) inside the box, (2, 5) outside
    got = pointing_game(maps, masks)
    # an all-zero map ties everywhere: the box's share of the pixels, 9/64
    assert got.tolist() == [1.0, 0.0, 9 / 64, 0.5]
    assert math.isnan(pointing_game(peak_map(3, 3), box_masks([np.zeros((0, 4))], (H, W)))[0])


def test_energy_pointing_game_and_box_iou_by_hand():
    m = torch.zeros(1, H, W)
    m[0, 0, :] = torch.arange(1, 9, dtype=torch.float32) / 8  # row 0: 1/8 .. 8/8
    m[0, 5, 5] = 0.5
    mask = box_masks([np.array([[4, 0, 8, 1], [5, 5, 6, 6]])], (H, W))  # row 0, x 4..7, and pixel (5, 5)
    energy = energy_pointing_game(m, mask)
    assert energy.item() == pytest.approx((5 + 6 + 7 + 8 + 4) / (36 + 4))
    # top 10 of 64 pixels (ceil(0.15 * 64)): row 0's eight and (5, 5), then the first zero in row-major order, (1, 0)
    assert box_iou(m, mask, 0.15).item() == pytest.approx(5 / (10 + 5 - 5))
    assert energy_pointing_game(torch.zeros(1, H, W), mask).item() == pytest.approx(5 / 64)  # uniform
    with pytest.raises(ValueError, match="non-negative"):
        energy_pointing_game(-m, mask)


def test_agrees_with_quantus():
    """Quantus' PointingGame, RelevanceMassAccuracy (the energy-based pointing game) and
    TopKIntersection (|top k ∩ box| / k, from which IoU follows) on random maps and boxes."""
    quantus = pytest.importorskip("quantus")  # in the test extra; skipped only where it is not installed
    rng = np.random.default_rng(0)
    b, h, w = 6, 16, 16
    a = rng.random((b, 1, h, w)).astype(np.float32)
    boxes = [
        np.array(x, dtype=np.float32)
        for x in (
            [[2, 3, 9, 12]],
            [[0, 0, 4, 4], [10, 10, 16, 16]],
            [[5, 5, 6, 6]],
            [[8, 0, 16, 8]],
            [[0, 0, 16, 16]],
            [[3.5, 1, 12.2, 9.7]],
        )
    ]
    masks = box_masks(boxes, (h, w))
    s = masks.numpy()[:, None].astype(np.float32)
    kw = dict(
        model=None, x_batch=rng.random((b, 3, h, w)).astype(np.float32), y_batch=np.zeros(b, int), a_batch=a, s_batch=s
    )
    k = math.ceil(0.15 * h * w)
    q_pg = np.asarray(quantus.PointingGame(normalise=False, disable_warnings=True)(**kw), dtype=np.float64)
    q_energy = np.asarray(quantus.RelevanceMassAccuracy(normalise=False, disable_warnings=True)(**kw), dtype=np.float64)
    q_topk = np.asarray(quantus.TopKIntersection(k=k, normalise=False, disable_warnings=True)(**kw), dtype=np.float64)
    maps = torch.from_numpy(a[:, 0])
    assert pointing_game(maps, masks).numpy().tolist() == q_pg.tolist()
    assert q_pg.sum() not in (0, b)  # the maps both hit and miss
    np.testing.assert_allclose(energy_pointing_game(maps, masks).numpy(), q_energy, rtol=1e-5)
    inter = q_topk * k
    np.testing.assert_allclose(box_iou(maps, masks, 0.15).numpy(), inter / (k + s.sum((1, 2, 3)) - inter), rtol=1e-9)


def test_boxes_follow_the_resize_and_centre_crop():
    """A white rectangle drawn at a box in a non-square image lands inside the mapped box
    after the model's transform, and nothing bright outside it."""
    prep = Preprocessing(resize=64, crop=56)
    img = np.zeros((60, 100, 3), np.uint8)
    box = [30, 10, 69, 39]  # inclusive pixel indices
    img[box[1] : box[3] + 1, box[0] : box[2] + 1] = 255
    crop = preprocess(img, prep)[0]
    mapped = boxes_in_crop([box], 100, 60, prep)
    # by hand: resize to 106x64 (scale 1.06, 1.0667), centre crop at left 25, top 4
    np.testing.assert_allclose(
        mapped, [[30 * 1.06 - 25, 10 * 64 / 60 - 4, 70 * 1.06 - 25, 40 * 64 / 60 - 4]], rtol=1e-6
    )
    mask = box_masks([mapped], (56, 56))[0]
    assert bool((crop > 0.75)[~mask].sum() == 0) and bool((crop[mask] > 0.25).all())
    # a box the crop cuts away is dropped; one cut by it is clipped
    assert boxes_in_crop([[0, 0, 5, 5]], 100, 60, prep).shape == (0, 4)
    assert boxes_in_crop([[0, 0, 99, 59]], 100, 60, prep).tolist() == [[0, 0, 56, 56]]


def tiny_images(src, n: int = 3) -> list[list[int]]:
    """64x64 photos-like images (a bright square on noise) and each one's box."""
    rng = np.random.default_rng(1)
    boxes = []
    for i in range(n):
        img = rng.integers(0, 80, (64, 64, 3), dtype=np.uint8)
        x0, y0 = 8 + 12 * i, 20
        img[y0 : y0 + 24, x0 : x0 + 24] = (220, 40 + 60 * i, 30)
        Image.fromarray(img).save(src / f"val_{i}.JPEG", quality=95)
        boxes.append([x0, y0, x0 + 23, y0 + 23])
    return boxes


def test_shards_keep_boxes(tmp_path):
    src = tmp_path / "val"
    src.mkdir()
    boxes = tiny_images(src)
    rows = [
        f"val_{i}.JPEG\t1\tn01443537\tgoldfish\t{' '.join(map(str, b)).replace(' ', chr(9))}"
        for i, b in enumerate(boxes)
    ]
    rows.append("val_0.JPEG\t1\tn01443537\tgoldfish\t0\t0\t3\t3")  # a second object in val_0
    (src / "labels.tsv").write_text("file\tclass_index\twnid\tname\tx0\ty0\tx1\ty1\n" + "\n".join(rows) + "\n")
    report = pack_folder(src, str(tmp_path / "out"), samples_per_shard=2, progress=False)
    assert report.boxed == 3 and "3 with bounding boxes" in report.summary()
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["boxes"]["samples"] == 3 and index["boxes"]["boxes"] == 4
    shards = list_shards(str(tmp_path / "out"))
    assert [s.boxes for s in shards] == [2, 1]
    got = {s.key: (s.label, s.meta["boxes"]) for sh in shards for s in read_shard(sh)}
    assert got == {"val_0": (1, [boxes[0], [0, 0, 3, 3]]), "val_1": (1, [boxes[1]]), "val_2": (1, [boxes[2]])}

    # ImageNet's LOC_val_solution.csv: several boxes per image in the PredictionString
    (src / "labels.tsv").unlink()
    (src / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nval_0,n01443537 1 2 30 40 n01443537 5 6 7 8 \nval_2,n01530575 0 0 63 63\n"
    )
    pack_folder(src, str(tmp_path / "loc"), progress=False)
    got = {s.key: (s.label, s.meta.get("boxes")) for sh in list_shards(str(tmp_path / "loc")) for s in read_shard(sh)}
    assert got == {"val_0": (1, [[1, 2, 30, 40], [5, 6, 7, 8]]), "val_1": (-1, None), "val_2": (10, [[0, 0, 63, 63]])}
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nval_0,n01443537 1 2 30\n")
    with pytest.raises(UserError, match="groups of 'wnid x0 y0 x1 y1'"):
        pack_folder(src, str(tmp_path / "bad"), progress=False)
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nval_0,n01443537 9 2 3 40\n")
    with pytest.raises(UserError, match="x0 <= x1"):
        pack_folder(src, str(tmp_path / "bad2"), progress=False)


def test_eval_reports_localisation_only_with_boxes(tmp_path):
    from pipeline.configs import EvalConfig
    from pipeline.evaluation.run import evaluate

    src = tmp_path / "val"
    src.mkdir()
    boxes = tiny_images(src)
    head = "file\tclass_index\twnid\tname\tx0\ty0\tx1\ty1\n"
    (src / "labels.tsv").write_text(
        head
        + "".join(
            f"val_{i}.JPEG\t1\tn01443537\tgoldfish\t" + "\t".join(map(str, b)) + "\n" for i, b in enumerate(boxes)
        )
    )
    pack_folder(src, str(tmp_path / "boxed"), progress=False)
    out = tmp_path / "eval"
    summary = evaluate(
        EvalConfig(
            shards=str(tmp_path / "boxed"),
            out=str(out),
            methods=("gradcam", "random"),
            backbone=TINY,
            batch_size=2,
            save_maps=3,
            progress=False,
            engine="local",
        )
    )
    assert any("pointing_game" in line for line in summary.lines())
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["boxed"] == 3
    assert {"pointing_game", "energy_pointing_game", "box_iou"} <= set(res["metrics"])
    md = (out / "results.md").read_text()
    assert "## Localisation against boxes" in md and md.count("## Localisation") == 1
    # per image: recomputed from the saved maps and the boxes mapped by hand (64 px -> 36, crop 32 at 2)
    maps = np.load(out / "maps.npz")
    keys = [str(k) for k in maps["keys"]]
    with open(out / "per_image.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "gradcam"]
    for r in rows:
        b = boxes[int(r["key"].split("_")[1])]
        s = 36 / 64
        hand = [[s * b[0] - 2, s * b[1] - 2, s * (b[2] + 1) - 2, s * (b[3] + 1) - 2]]
        m = prepare_cams(torch.from_numpy(maps["map__gradcam"][keys.index(r["key"])][None]), (32, 32))
        mask = box_masks([np.array(hand, np.float32)], (32, 32))
        assert float(r["pointing_game"]) == pytest.approx(pointing_game(m, mask).item())
        assert float(r["energy_pointing_game"]) == pytest.approx(energy_pointing_game(m, mask).item(), rel=1e-6)
        assert float(r["box_iou"]) == pytest.approx(box_iou(m, mask).item())
    g = res["methods"]["gradcam"]["energy_pointing_game"]
    assert g["n"] == 3 and g["mean"] == pytest.approx(100 * np.mean([float(r["energy_pointing_game"]) for r in rows]))

    # the same images without boxes: no localisation anywhere
    (src / "labels.tsv").write_text("file\tclass_index\n" + "".join(f"val_{i}.JPEG\t1\n" for i in range(3)))
    pack_folder(src, str(tmp_path / "plain"), progress=False)
    out2 = tmp_path / "eval-plain"
    evaluate(
        EvalConfig(
            shards=str(tmp_path / "plain"),
            out=str(out2),
            methods=("random",),
            backbone=TINY,
            batch_size=2,
            progress=False,
            engine="local",
        )
    )
    res2 = json.loads((out2 / "results.json").read_text())
    assert "pointing_game" not in res2["metrics"] and "Localisation" not in (out2 / "results.md").read_text()
    assert "pointing_game" not in (out2 / "per_image.csv").read_text().splitlines()[0]


def test_report_shows_localisation_and_training_samples_per_class(tmp_path):
    from pipeline.fs import write_json_atomic
    from pipeline.report.page import save_comparison_maps, write_report

    coverage = [0] * 1000
    coverage[281], coverage[1] = 25, 3  # tabby trained on 25 samples, goldfish on 3; the rest never
    loc = {
        "pointing_game": {"n": 9, "mean": 66.67, "se": 16.67},
        "energy_pointing_game": {"n": 9, "mean": 41.5, "se": 3.2},
        "box_iou": {"n": 9, "mean": 30.25, "se": 2.5},
    }
    per_ratio = {r: {"AD": 10.0, "IC": 20.0} for r in ("1", "0.5", "0.15")}
    results = {
        "protocol": {"ratios": [1.0, 0.5, 0.15]},
        "data": {"evaluated": 10},
        "methods": {
            "lcam-fm": {
                "label": "L-CAM-Fm",
                "n": 10,
                "per_ratio": per_ratio,
                "info": {"coverage": coverage},
                **{k: dict(v, mean=v["mean"] + 1) for k, v in loc.items()},
            },
            "gradcam": {"label": "Grad-CAM", "n": 10, "per_ratio": per_ratio, "info": {}, **loc},
        },
    }
    eval_dir = tmp_path / "eval"
    write_json_atomic(str(eval_dir / "results.json"), results)
    rng = np.random.default_rng(0)
    save_comparison_maps(
        str(eval_dir / "maps.npz"),
        keys=["a", "b"],
        images=(rng.random((2, 32, 32, 3)) * 255).astype(np.uint8),
        class_ids=np.array([281, 1]),
        probs=np.array([0.5, 0.9]),
        maps={m: rng.random((2, 7, 7)) for m in ("lcam-fm", "gradcam")},
        labels={"lcam-fm": "L-CAM-Fm", "gradcam": "Grad-CAM"},
    )
    page_url = write_report(str(tmp_path / "report.html"), eval_dir=str(eval_dir))
    page = open(page_url).read()
    table = page[page.index('id="localisation"') :]
    table = table[: table.index("</table>")]
    assert "<th>pointing game ↑</th><th>energy pointing game ↑</th><th>box IoU ↑</th>" in table
    assert (
        '<td class="best">67.67 ± 16.67</td>' in table and "<td>41.50 ± 3.20</td>" in table
    )  # L-CAM best, Grad-CAM not
    assert "2 of 1000 class rows trained, on 28 samples: per trained row median 14, min 3, max 25" in page
    assert "25 training samples" in page and "class row trained on 3 samples only" in page  # each map's count
    # an evaluation without boxes: no localisation section
    for m in results["methods"].values():
        for k in loc:
            m.pop(k)
    write_json_atomic(str(eval_dir / "results.json"), results)
    assert "Localisation" not in open(write_report(str(tmp_path / "plain.html"), eval_dir=str(eval_dir))).read()
