"""The classifier audit: map statistics by hand, a CAM store with known mistakes, the page in Chromium.

The store is made by the real `lcam cams --classes predicted,label` from a real feature
cache whose contents are chosen: a ResNet-18 (random weights: nothing is downloaded) whose
attention is a one-hot 1x1 convolution, so class c's map IS feature channel c. Channels of
classes 0 and 1 hold a centred blob, those of classes 5 and 7 a ring in the border band; the
cache's top-5 (the classifier's predictions) make three labelled samples wrong, with chosen
confidences. Every figure of the audit is then known in advance.
"""

from __future__ import annotations

import csv
import functools
import http.server
import json
import math
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.audit.stats import (
    area_above_half_max,
    average_ranks,
    border_mask,
    border_share,
    centre_of_mass,
    entropy,
    map_statistics,
    spearman,
    spread,
    top_region_iou,
)
from pipeline.classes import ClassSelection
from pipeline.errors import UserError


def ring(n: int = 10) -> np.ndarray:
    m = np.zeros((n, n))
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 1.0
    return m


def blob(n: int = 10) -> np.ndarray:
    m = np.zeros((n, n))
    c = n // 2
    m[c - 1 : c + 1, c - 1 : c + 1] = 1.0
    return m


# ---------------------------------------------------------------- statistics by hand
def test_border_band_and_border_share_of_hand_made_maps():
    # 10 x 10, band 0.1: pixel centres at 0.05, 0.15, ...: exactly the outer ring is in the band
    assert border_mask(10, 10).sum() == 36 and not border_mask(10, 10)[1:-1, 1:-1].any()
    assert border_share(ring()) == pytest.approx(1.0)
    assert border_share(blob()) == pytest.approx(0.0)
    # an even map scores the band's share of the pixels; a zero map counts as even
    assert border_share(np.ones((10, 10))) == pytest.approx(0.36)
    assert border_share(np.zeros((10, 10))) == pytest.approx(0.36)
    # half the mass on the ring, half in the blob (both total 1 after weighting)
    assert border_share(ring() / 36 + blob() / 4) == pytest.approx(0.5)


def test_area_entropy_centre_and_spread_of_hand_made_maps():
    m = np.zeros((4, 4))
    m[1, 2] = 1.0
    m[3, 0] = 0.5  # exactly half the max: counts
    m[0, 0] = 0.49  # below half the max: does not
    assert area_above_half_max(m) == pytest.approx(2 / 16)
    # k equal pixels out of N: entropy log(k) / log(N)
    assert entropy(blob()) == pytest.approx(math.log(4) / math.log(100))
    assert entropy(np.ones((10, 10))) == pytest.approx(1.0)
    one = np.zeros((5, 5))
    one[1, 3] = 1
    assert entropy(one) == pytest.approx(0.0) and spread(one) == pytest.approx(0.0)
    cy, cx = centre_of_mass(one)
    assert (cy, cx) == (pytest.approx(1.5 / 5), pytest.approx(3.5 / 5))
    assert np.allclose(centre_of_mass(blob()), 0.5) and np.allclose(centre_of_mass(ring()), 0.5)
    # two pixels of equal mass 0.4 of the side apart (same row): spread = 0.2
    two = np.zeros((5, 5))
    two[2, 0] = two[2, 2] = 1
    assert spread(two) == pytest.approx(0.2)
    assert spread(ring()) > 2 * spread(blob())
    stats = map_statistics(np.stack([ring(), blob()]))
    assert stats["border"][0] > 0.99 and stats["border"][1] < 0.01
    assert stats["area"].tolist() == pytest.approx([0.36, 0.04])


def test_top_region_iou_and_rank_correlation():
    # top 15% of 100 pixels = 15: the ring's first 15 in row-major order (ties: smaller index first) vs the blob's 4 (zeros are no region)
    assert top_region_iou(ring(), ring()) == pytest.approx(1.0)
    assert top_region_iou(ring(), blob()) == pytest.approx(0.0)
    top = ring()
    top[0] = 2.0  # a: the first row (10), then 5 side pixels of rows 1-3; flipped: the last row, then row 0's first 5
    assert top_region_iou(top, top[::-1]) == pytest.approx(5 / 25)
    a = np.arange(16.0).reshape(4, 4)
    assert top_region_iou(a, a[::-1]) == pytest.approx(0.0)  # top 3 of 16: the last row vs the first row
    assert average_ranks(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.zeros((4, 4))))
    # against an independent implementation, with ties
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, (7, 7)).astype(float), rng.random((7, 7))
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x.ravel(), y.ravel()).statistic)


def test_class_selection_combinations():
    s = ClassSelection.parse("predicted,label")
    assert (s.mode, s.width, s.columns()) == ("combined", 2, ["predicted", "label"])
    assert ClassSelection.parse("top5,label").columns() == ["predicted", "top-2", "top-3", "top-4", "top-5", "label"]
    assert ClassSelection.parse("top-k,label", top_k=2).width == 3
    # single selections keep their identity (and so the fingerprint of existing stores)
    assert ClassSelection.parse("predicted").identity() == {"mode": "predicted", "k": 1, "ids": []}
    assert ClassSelection.parse("top5") == ClassSelection.parse("top-k", top_k=5)
    for bad in ("predicted,predicted", "predicted,top5", "bogus,label"):
        with pytest.raises(UserError):
            ClassSelection.parse(bad)
    with pytest.raises(UserError, match="no 'top-k' part"):
        ClassSelection.parse("predicted,label", top_k=3)


# ---------------------------------------------------------------- a store with known mistakes
CLASSES = {"blob": (0, 1), "ring": (5, 7)}
# (folder, predicted class, its probability) per image; labels: folder a -> 0, b -> 1
TRAINED = {0: 40, 1: 3, 7: 12}  # the checkpoint's coverage: training samples per class row (5: untrained)
PLAN = [
    ("a", 0, 0.8),
    ("a", 5, 0.9),
    ("a", 5, 0.6),
    ("a", 0, 0.7),
    ("b", 1, 0.8),
    ("b", 7, 0.75),
    ("b", 1, 0.95),
    ("b", 1, 0.85),
]


def lcam(argv: list[str]) -> int:
    from jobs.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def audited(tmp_path_factory, ray_local):
    from lcam import LCAM, build_backbone
    from pipeline.extract.run import cache_identity
    from pipeline.report.page import save_comparison_maps
    from pipeline.shards.pack import pack_folder
    from pipeline.shards.read import list_shards, read_shard
    from pipeline.store.feature_cache import FeatureCache
    from pipeline.train.checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    for i, (folder, _, _) in enumerate(PLAN):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(root / "images" / folder / f"im{i}.png")
    pack_folder(root / "images", str(root / "shards"), samples_per_shard=3, progress=False)
    shards = list_shards(str(root / "shards"))
    samples = [(info, s) for info in shards for s in read_shard(info)]
    assert len(samples) == len(PLAN)

    backbone = build_backbone("resnet18", "random")
    C, h, w = backbone.feature_shape
    model = LCAM(backbone)
    with torch.no_grad():  # class c's map is feature channel c
        model.attention.conv.weight.zero_()
        model.attention.conv.bias.zero_()
        for c in (0, 1, 5, 7):
            model.attention.conv.weight[c, c] = 1.0
    ckpt = str(root / "ckpt.pt")
    coverage = torch.zeros(backbone.num_classes, dtype=torch.int32)
    for c, n in TRAINED.items():
        coverage[c] = n
    save_checkpoint(
        ckpt, attention_state=model.attention.state_dict(), method="fm", backbone=backbone.describe(), coverage=coverage
    )
    feature = np.zeros((C, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for c in CLASSES["blob"]:
        feature[c] = np.exp(-((yy - 3) ** 2 + (xx - 3) ** 2) / 1.5)
    for c in CLASSES["ring"]:
        feature[c] = ((yy == 0) | (yy == h - 1) | (xx == 0) | (xx == w - 1)).astype(np.float32)
    cache = FeatureCache.create_or_open(
        str(root / "cache"),
        cache_identity(backbone, ["center"], "float16"),
        feature_shape=(C, h, w),
        num_classes=backbone.num_classes,
    )
    truth = {}
    for info in shards:
        rows = [(s, PLAN[int(re.search(r"im(\d)", s.key).group(1))]) for i2, s in samples if i2.url == info.url]
        keys = [s.key for s, _ in rows]
        labels = np.array([s.label for s, _ in rows])
        top5 = np.array([[p] + [c for c in (0, 1, 5, 7, 9, 11) if c != p][:4] for _, (_, p, _) in rows])
        probs = np.array([[q, (1 - q) / 2, (1 - q) / 4, (1 - q) / 8, (1 - q) / 16] for _, (_, _, q) in rows])
        entry = cache.write_shard(info.url, keys, labels, np.repeat(feature[None], len(rows), 0), top5, probs)
        cache.mark_done([entry])
        truth.update(
            {k: (int(lab), int(t[0]), float(p[0]), info.url) for k, lab, t, p in zip(keys, labels, top5, probs)}
        )
    assert sorted({v[0] for v in truth.values()}) == [0, 1]  # folder a -> 0, b -> 1

    cams = str(root / "cams")
    assert lcam(["cams", ckpt, cams, "--cache", str(root / "cache"), "--classes", "predicted,label", "--quiet"]) == 0
    # the second method: "Grad-CAM" maps of two samples, one equal to L-CAM's and one its negative
    wrong = sorted(k for k, (lab, p, _, _) in truth.items() if lab != p)
    right = sorted(k for k, (lab, p, _, _) in truth.items() if lab == p)
    save_comparison_maps(
        str(root / "eval" / "maps.npz"),
        keys=[right[0], wrong[0]],
        images=np.zeros((2, 8, 8, 3), np.uint8),
        class_ids=np.array([truth[right[0]][1], truth[wrong[0]][1]]),
        probs=np.array([0.5, 0.5]),
        maps={"gradcam": np.stack([feature[truth[right[0]][1]], -feature[truth[wrong[0]][1]]])},
        labels={"gradcam": "Grad-CAM"},
    )
    out = root / "audit"
    assert (
        lcam(["audit", cams, "--out", str(out), "--compare", str(root / "eval"), "--max-thumbnails", "60", "--quiet"])
        == 0
    )
    return {"root": root, "cams": cams, "out": out, "truth": truth, "wrong": wrong, "right": right}


def test_store_holds_both_maps_duplicated_when_the_label_is_predicted(audited):
    from pipeline.store.cam_store import CamStore

    store = CamStore.open(audited["cams"])
    assert store.width == 2 and store.identity["classes"]["columns"] == ["predicted", "label"]
    seen = 0
    for _, data in store.iter_shards():
        for i, key in enumerate(data["keys"]):
            label, pred, prob, _ = audited["truth"][key]
            assert data["class_ids"][i].tolist() == [pred, label]
            assert data["probs"][i, 0] == pytest.approx(prob)
            if label == pred:  # stored twice, not de-duplicated
                np.testing.assert_array_equal(data["raw"][i, 0], data["raw"][i, 1])
            seen += 1
    assert seen == len(PLAN)


def test_error_table_and_confusions_are_the_known_mistakes(audited):
    import pyarrow.parquet as pq

    truth, out = audited["truth"], audited["out"]
    table = pq.read_table(str(out / "per_sample.parquet")).to_pylist()
    assert sorted(r["key"] for r in table) == sorted(truth)
    rows = {r["key"]: r for r in table}
    errors = {k for k, r in rows.items() if r["correct"] == 0}
    assert errors == set(audited["wrong"]) and len(errors) == 3
    for k, r in rows.items():
        label, pred, prob, url = truth[k]
        assert (r["label"], r["predicted"], r["shard"]) == (label, pred, url)
        assert r["predicted_prob"] == pytest.approx(prob)
        # predicted ring vs true blob: their top regions do not overlap; no IoU for correct samples
        assert r["pred_label_iou"] == pytest.approx(0.0) if k in errors else math.isnan(r["pred_label_iou"])
        # measured at 56 x 56 (bilinear from 7 x 7, which smears the ring inwards): ring 0.755, blob 0.007, even map 0.383
        assert r["border"] > 0.7 if pred in CLASSES["ring"] else r["border"] < 0.05
    with open(out / "confusions.csv") as f:
        confusions = [(int(r["label"]), int(r["predicted"]), int(r["count"])) for r in csv.DictReader(f)]
    assert confusions == [(0, 5, 2), (1, 7, 1)]
    page = (out / "audit.html").read_text()
    table_html = page[page.index('id="errors"') :]
    shown = re.findall(r"<code>([^<]+)</code></td>", table_html[: table_html.index("</table>")])
    assert shown == sorted(errors, key=lambda k: -truth[k][2])  # most confident mistake first: 0.9, 0.75, 0.6


def test_classes_ranked_by_border_share_and_compared_with_the_second_method(audited):
    out, truth = audited["out"], audited["truth"]
    with open(out / "per_class.csv") as f:
        ranked = list(csv.DictReader(f))
    assert [int(r["class"]) for r in ranked][:2] in ([5, 7], [7, 5]) and {int(r["class"]) for r in ranked[2:]} == {0, 1}
    counts = {int(r["class"]): int(r["n"]) for r in ranked}
    assert counts == {0: 2, 5: 2, 1: 3, 7: 1}
    by_class = {int(r["class"]): r for r in ranked}
    assert {c: int(r["train_samples"]) for c, r in by_class.items()} == {
        0: 40,
        1: 3,
        5: 0,
        7: 12,
    }  # the samples behind each map
    page = (out / "audit.html").read_text()
    classes = page[page.index('id="classes"') :]
    classes = classes[: classes.index("</table>")]
    assert "<th>training samples</th>" in classes and "0 [untrained]" in classes and "3 [3 samples]" in classes
    assert float(by_class[0]["precision"]) == 1.0 and float(by_class[5]["precision"]) == 0.0
    import pyarrow.parquet as pq

    rho = {
        r["key"]: r["compare_rho"]
        for r in pq.read_table(str(out / "per_sample.parquet")).to_pylist()
        if not math.isnan(r["compare_rho"])
    }
    # the store's maps come from float16 features: a few near-equal pixels may swap ranks
    assert rho == {
        audited["right"][0]: pytest.approx(1.0, abs=1e-3),
        audited["wrong"][0]: pytest.approx(-1.0, abs=1e-3),
    }
    assert float(by_class[truth[audited["wrong"][0]][1]]["rho_mean"]) == pytest.approx(-1.0)


HARNESS = """<!doctype html><html><body><iframe id="r" src="audit.html" style="width:1400px;height:4000px"></iframe>
<pre id="out">pending</pre><script>
document.getElementById('r').addEventListener('load', () => {
  const doc = document.getElementById('r').contentDocument;
  const imgs = Array.from(doc.images);
  imgs.forEach(i => i.loading = 'eager');
  const rows = id => doc.querySelectorAll('#' + id + ' tbody tr').length;
  const check = () => {
    if (imgs.some(i => !i.complete)) { setTimeout(check, 50); return; }
    document.getElementById('out').textContent = JSON.stringify({
      images: imgs.length, loaded: imgs.filter(i => i.naturalWidth > 0).length,
      broken: imgs.filter(i => i.naturalWidth === 0).map(i => i.getAttribute('src')),
      errors: rows('errors'), confusions: rows('confusions'), classes: rows('classes'), disagreements: rows('disagreements')});
  };
  check();
});
</script></body></html>"""


def test_audit_page_loads_every_image_in_chromium(audited):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip(
            "no Chromium here: install Debian's 'chromium' package (make test does when it may) to run the browser test"
        )
    out = audited["out"]
    (out / "harness.html").write_text(HARNESS)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        res = subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                f"http://127.0.0.1:{server.server_address[1]}/harness.html",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    m = re.search(r'<pre id="out">(.*?)</pre>', res.stdout, re.S)
    assert m, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads(m.group(1).replace("&quot;", '"'))
    # 3 errors x 3 pictures, 2 compared samples x 3, strips of the 4 classes (at most 3 + 3 each, fewer samples in small classes)
    pictures = sorted(p.name for p in (out / "audit_files").iterdir())
    assert result["images"] >= 3 * 3 + 2 * 3 and result["loaded"] == result["images"], result["broken"]
    assert len(pictures) <= 60
    assert (result["errors"], result["confusions"], result["classes"], result["disagreements"]) == (3, 2, 4, 2)


def test_audit_user_errors_name_the_thing(audited, tmp_path, capsys):
    assert lcam(["audit", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no CAM store" in capsys.readouterr().err
    assert lcam(["audit", audited["cams"], "--out", str(tmp_path / "o"), "--compare", str(tmp_path)]) == 2
    assert "--save-maps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
