"""Beyond the training set: CAM initialisation, top-k targets, coverage, warm start (issue #16)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from jobs.cli import main as cli_main
from lcam import LCAM, LCAMLoss, build_backbone, minmax_normalize
from lcam.backbones.base import Backbone
from lcam.recipe import Recipe, recipe_for_data
from lcam.training import LCAMTrainer, NoLinearClassifier, TrainBatch, expand_targets, init_attention
from pipeline.configs import TrainConfig
from pipeline.errors import UserError
from pipeline.extract.run import cache_identity
from pipeline.store.feature_cache import FeatureCache
from pipeline.train.checkpoints import CheckpointMismatch, load_checkpoint, load_lcam
from pipeline.train.fm import train_fm
from pipeline.train.setup import initial_attention
from tests.helpers import center_crop_tensor, skimage_photos

# A toy dataset of 10 samples in 2 shards: labels chosen so that class rows get 0, 1, 2 and 3 samples.
LABELS = [3, 3, 3, 7, 7, 500, 9, 9, 9, 9]


@pytest.fixture(scope="module")
def effnet():
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, effnet):
    """A float32 feature cache of 10 samples with random non-negative features (what the
    head sees after ReLU6); top-5 classes from the backbone's own head, as extraction does."""
    root = tmp_path_factory.mktemp("heldout")
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(len(LABELS), *effnet.feature_shape, generator=g) * 2
    with torch.no_grad():
        logits = effnet.head(feats)
    url = str(root / "cache")
    cache = FeatureCache.create_or_open(
        url,
        cache_identity(effnet, ("center",), "float32"),
        feature_shape=effnet.feature_shape,
        views=("center",),
        dtype="float32",
        num_classes=effnet.num_classes,
    )
    entries = []
    for s, rows in enumerate((range(0, 6), range(6, 10))):
        idx = list(rows)
        p5, c5 = logits[idx].softmax(1).topk(5)
        entries.append(
            cache.write_shard(
                str(root / f"shard-{s}.tar"),
                [f"k{i:02d}" for i in idx],
                [LABELS[i] for i in idx],
                feats[idx][:, None],
                c5,
                p5,
            )
        )
    cache.mark_done(entries)
    return {"root": root, "cache": url, "feats": feats, "logits": logits}


def config(toy, out, **kw) -> TrainConfig:
    # the SPEC's recipe unless a test names another (recipe_rule None: the default, by data size)
    base = dict(
        method="fm",
        out=str(out),
        cache=toy["cache"],
        batch_size=4,
        view="first",
        seed=0,
        log_every=1,
        checkpoint_minutes=0,
        progress=False,
        epochs=2,
        recipe_rule="spec",
    )
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- --init cam
@pytest.mark.parametrize("name,weights", [("efficientnet_lite0", "default"), ("resnet18", "random")])
def test_untrained_cam_init_explains_exactly_as_cam(name, weights):
    backbone = build_backbone(name, weights)
    model = LCAM(backbone, init_attention(backbone, 0, "cam")).eval()
    x = torch.stack([center_crop_tensor(p) for p in skimage_photos(("chelsea", "coffee")).values()])
    # CAM (Zhou et al.) computed here from the classifier module itself: sum_c w_kc F_c
    fc = backbone.head[-1]
    assert isinstance(fc, nn.Linear)
    with torch.no_grad():
        feats = backbone.features(backbone.normalize(x))
        logits = backbone.head(feats)
        cam = torch.einsum("kc,bchw->bkhw", fc.weight, feats)
    top = logits.topk(5, dim=1).indices
    ex = model.explain(x, top_k=5)
    assert torch.equal(ex.class_ids, top)
    expected = minmax_normalize(cam.gather(1, top[:, :, None, None].expand(-1, -1, *cam.shape[-2:])))
    torch.testing.assert_close(ex.maps, expected, atol=2e-5, rtol=0)
    assert float(expected.amax()) == 1.0 and float(expected.amin()) == 0.0  # not constant: a real comparison
    # every class row, not only the predicted ones
    every = minmax_normalize(model.attention(feats))
    torch.testing.assert_close(every, minmax_normalize(cam), atol=2e-5, rtol=0)
    # with the bias copied too, each raw map's spatial mean is that class's logit
    torch.testing.assert_close(model.attention(feats).mean((-2, -1)), logits, atol=1e-3, rtol=1e-4)


def test_cam_init_refused_for_a_head_that_is_not_pooling_plus_linear():
    mlp = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(8 * 4, 16), nn.ReLU(), nn.Linear(16, 10))
    vgg_like = Backbone("vgg_like", nn.Conv2d(3, 8, 3), mlp, (8, 5, 5), num_classes=10)
    assert vgg_like.linear_classifier() is None
    with pytest.raises(NoLinearClassifier, match="no CAM to start from: use --init random"):
        init_attention(vgg_like, 0, "cam")
    with pytest.raises(UserError, match="--init cam needs a head of global average pooling"):  # the pipeline's one line
        initial_attention(vgg_like, {"seed": 0, "init": "cam"})
    pooled = Backbone(
        "pooled",
        nn.Conv2d(3, 8, 3),
        nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1), nn.Dropout(0.2), nn.Linear(8, 10)),
        (8, 5, 5),
        num_classes=10,
    )
    w, b = pooled.linear_classifier()
    assert torch.equal(w, pooled.head[-1].weight) and torch.equal(b, pooled.head[-1].bias)
    # random init is the SPEC's and unchanged: the seed's draw
    torch.manual_seed(0)
    assert torch.equal(init_attention(pooled, 0).conv.weight, init_attention(pooled, 0, "random").conv.weight)


def test_cam_rows_of_a_model_object_split_automatically():
    """torchvision's ResNet given as a model object: its head is traced (avgpool, torch.flatten,
    fc), and CAM's rows are its fc's, so Explainer.fit and --init cam start from CAM, not random.
    Checked against the model itself: W mean(F) + b is its logits. A traced head that branches
    is not claimed to be pooling + linear."""
    import torchvision

    from lcam import build_backbone

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    backbone = build_backbone(model)
    assert isinstance(backbone.head, torch.fx.GraphModule)
    w, b = backbone.linear_classifier()
    assert torch.equal(w, model.fc.weight) and torch.equal(b, model.fc.bias)
    x = torch.rand(2, 3, 64, 64)
    feats, _ = backbone.extract(x)
    with torch.no_grad():
        torch.testing.assert_close(feats.mean((-2, -1)) @ w.T + b, model(backbone.normalize(x)), atol=1e-4, rtol=1e-4)
    assert init_attention(backbone, 0, "cam").conv.weight.flatten(1).equal(w)

    class TwoPaths(nn.Module):  # pooling + linear plus a shortcut: not CAM's head
        def __init__(self):
            super().__init__()
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 8)

        def forward(self, f):
            p = torch.flatten(self.pool(f), 1)
            return self.fc(p) + p

    branching = Backbone("branching", nn.Conv2d(3, 8, 3), torch.fx.symbolic_trace(TwoPaths()), (8, 5, 5), num_classes=8)
    assert branching.linear_classifier() is None


# ---------------------------------------------------------------- --targets top-k
def test_top_k_loss_is_the_mean_of_k_single_target_losses(effnet, toy):
    feats, logits = toy["feats"][:4], toy["logits"][:4]
    targets = logits.topk(3, dim=1).indices  # (4, 3)
    start = init_attention(effnet, 0)
    # independently: K separate single-target forwards and losses on a copy of the untrained model
    ref = LCAM(effnet, copy.deepcopy(start))
    loss_fn = LCAMLoss()
    singles = []
    with torch.no_grad():
        for k in range(3):
            masked, maps = ref.fm_forward(feats, targets[:, k])
            singles.append(loss_fn(masked, targets[:, k], maps))
    trainer = LCAMTrainer(LCAM(effnet, start), "fm", Recipe(lr=0.01, epochs=1, batch_size=4), 1, top_k=3)
    stats = trainer.step(TrainBatch(targets=targets, feats=feats))
    assert stats.n == 12  # 4 images x 3 targets, each its own map
    for name in ("loss", "ce", "area", "tv"):
        want = float(torch.stack([getattr(t, "total" if name == "loss" else name) for t in singles]).mean())
        assert getattr(stats, name) == pytest.approx(want, rel=1e-5), name
    # without targets the trainer takes the top-3 of the head on F itself
    auto = LCAMTrainer(
        LCAM(effnet, init_attention(effnet, 0)), "fm", Recipe(lr=0.01, epochs=1, batch_size=4), 1, top_k=3
    )
    assert auto.step(TrainBatch(feats=feats)).loss == pytest.approx(stats.loss, rel=1e-6)
    assert torch.equal(auto.coverage, torch.bincount(targets.flatten(), minlength=1000))
    with pytest.raises(ValueError, match="top_k=3 needs"):
        auto.step(TrainBatch(targets=targets[:, 0], feats=feats))
    t, f = expand_targets(targets, feats)
    assert t.tolist() == targets.flatten().tolist() and torch.equal(f[3], feats[1])


def test_single_target_step_is_unchanged_by_top_k_support(effnet, toy):
    """top_k=1 runs exactly the SPEC step: same loss and weights as the plain formulation."""
    feats, targets = toy["feats"][:4], toy["logits"][:4].argmax(1)
    a = LCAMTrainer(LCAM(effnet, init_attention(effnet, 0)), "fm", Recipe(lr=0.1, epochs=1, batch_size=4), 1)
    model = LCAM(effnet, init_attention(effnet, 0))
    opt = torch.optim.SGD(
        [{"params": [model.attention.conv.weight], "lr": 0.1}, {"params": [model.attention.conv.bias], "lr": 0.2}],
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        nesterov=True,
    )
    masked, maps = model.fm_forward(feats, targets)
    terms = LCAMLoss()(masked, targets, maps)
    opt.zero_grad()
    terms.total.backward()
    opt.step()
    stats = a.step(TrainBatch(targets=targets, feats=feats))
    assert stats.loss == float(terms.total.detach())
    assert torch.equal(a.model.attention.conv.weight, model.attention.conv.weight)


# ---------------------------------------------------------------- coverage, checkpoint, CLI
def test_coverage_counts_are_exact_and_the_checkpoint_records_init_and_coverage(toy, tmp_path, capsys):
    train_fm(config(toy, tmp_path / "label", target="label", init="cam"))
    ckpt = load_checkpoint(str(tmp_path / "label" / "checkpoint.pt"))
    want = np.bincount(LABELS, minlength=1000)
    assert ckpt["coverage"].dtype == torch.int32 and ckpt["coverage"].tolist() == want.tolist()
    assert ckpt["config"]["init"] == "cam" and ckpt["config"]["targets"] == "single" and ckpt["config"]["top_k"] == 1
    assert {int(k): int(v) for k, v in enumerate(ckpt["coverage"]) if v} == {3: 3, 7: 2, 500: 1, 9: 4}

    # the CLI: top-3 predicted targets; every sample trains its 3 rows
    out = tmp_path / "top3"
    rc = cli_main(
        [
            "train",
            "--cache",
            toy["cache"],
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--target",
            "predicted",
            "--targets",
            "top-k",
            "--top-k",
            "3",
            "--init",
            "cam",
            "--view",
            "first",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    model, ckpt = load_lcam(str(out / "checkpoint.pt"))
    top3 = toy["logits"].topk(3, dim=1).indices
    assert ckpt["coverage"].tolist() == torch.bincount(top3.flatten(), minlength=1000).tolist()
    assert ckpt["config"]["targets"] == "top-k" and ckpt["config"]["top_k"] == 3 and ckpt["config"]["init"] == "cam"
    assert ckpt["metrics"][-1]["samples"] == 30  # 10 images x 3 targets per epoch
    # resuming keeps the counts (a mid-run stop, then --resume, gives the same coverage)
    train_fm(config(toy, tmp_path / "cut", target="label", max_steps=4))
    assert (
        load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["coverage"].tolist() == want.tolist()
    )  # epoch 2 is running
    train_fm(config(toy, tmp_path / "cut", target="label", resume=True))
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["coverage"].tolist() == want.tolist()
    with pytest.raises(CheckpointMismatch, match="init: checkpoint 'random', now 'cam'"):
        train_fm(config(toy, tmp_path / "cut", target="label", init="cam", resume=True))


def test_init_from_starts_from_the_fm_checkpoint(toy, effnet, tmp_path):
    fm = tmp_path / "fm"
    train_fm(config(toy, fm, target="label"))
    start = load_checkpoint(str(fm / "checkpoint.pt"))
    warm = tmp_path / "warm"
    train_fm(
        config(toy, warm, target="label", init_from=str(fm / "checkpoint.pt"), max_steps=0)
    )  # saved before any step
    ckpt = load_checkpoint(str(warm / "checkpoint.pt"))
    for k, v in start["attention"].items():
        assert torch.equal(ckpt["attention"][k], v)
    assert ckpt["config"]["init"] == "checkpoint" and ckpt["config"]["init_from"] == str(fm / "checkpoint.pt")
    assert ckpt["coverage"].tolist() == start["coverage"].tolist()  # its rows were trained by the Fm run's samples
    # the Img worker builds its start with the same helper
    attention, inherited = initial_attention(effnet, {"seed": 0, "init_from": str(fm / "checkpoint.pt")})
    assert torch.equal(attention.conv.weight, start["attention"]["conv.weight"]) and torch.equal(
        inherited, start["coverage"]
    )


def test_user_errors_are_one_line_and_create_nothing(toy, tmp_path, capsys):
    cases = [
        (["--targets", "top-k", "--target", "label"], "add --target predicted"),
        (["--top-k", "3"], "--top-k needs --targets top-k"),
        (["--init", "cam", "--init-from", str(tmp_path / "x.pt")], "not both"),
        (["--init-from", str(tmp_path / "missing.pt")], "not found"),
    ]
    for i, (flags, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        rc = cli_main(["train", "--cache", toy["cache"], "--out", str(out), "--no-progress", *flags])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
        assert not out.exists()


def test_recipe_by_data_size(toy, tmp_path):
    train_fm(
        config(
            toy, tmp_path / "small", target="label", recipe_rule="data-size", epochs=None, batch_size=None, max_steps=0
        )
    )
    run = load_checkpoint(str(tmp_path / "small" / "checkpoint.pt"))["config"]
    assert (
        run["recipe_rule"] == "data-size" and run["init"] == "cam"
    )  # "auto": EfficientNet-Lite0's head is pooling + linear
    assert (run["lr"], run["batch_size"], run["schedule"], run["recipe"]["epochs"]) == (0.3, 16, "onecycle", 20)
    assert recipe_for_data("efficientnet_lite0", "fm", 800) == Recipe(
        lr=0.3, epochs=20, batch_size=16, schedule="onecycle", decay_to="start"
    )
    assert recipe_for_data("efficientnet_lite0", "fm", 1000).epochs == 16
    assert recipe_for_data("efficientnet_lite0", "fm", 8000).epochs == 8  # the floor (held-back loss, RESULTS.md)
    # the default rule is data-size: the same run without --recipe
    train_fm(
        config(toy, tmp_path / "default", target="label", epochs=None, batch_size=None, max_steps=0, recipe_rule=None)
    )
    default = load_checkpoint(str(tmp_path / "default" / "checkpoint.pt"))["config"]
    assert {k: default[k] for k in ("recipe_rule", "recipe", "init", "row_prior", "uncovered")} == {
        k: run[k] for k in ("recipe_rule", "recipe", "init", "row_prior", "uncovered")
    }
    assert recipe_for_data("efficientnet_lite0", "img", 800) == Recipe(
        lr=0.03, epochs=4, batch_size=8, schedule="onecycle", decay_to="start"
    )
    assert recipe_for_data("resnet50", "fm", 1_281_167) == Recipe(lr=1e-4, epochs=26, gamma=0.95, decay_epochs=12)


# ---------------------------------------------------------------- coverage beside the maps, in the gallery and in eval
def test_cam_store_keeps_the_coverage_of_each_explained_class(toy, tmp_path):
    from pipeline.cams.gallery import coverage_mark, gallery_html
    from pipeline.cams.run import generate_cams
    from pipeline.configs import CamsConfig
    from pipeline.store.cam_store import CamStore

    train_fm(config(toy, tmp_path / "run", target="label", epochs=1))
    ckpt = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    generate_cams(
        CamsConfig(
            checkpoint=str(tmp_path / "run" / "checkpoint.pt"),
            out=str(tmp_path / "cams"),
            cache=toy["cache"],
            classes="top-k",
            top_k=3,
            progress=False,
        )
    )
    store = CamStore.open(str(tmp_path / "cams"))
    assert store.info()["class_rows_trained"] == 4
    seen = 0
    for _, d in store.iter_shards():
        assert d["coverage"].dtype == np.int32 and d["coverage"].shape == d["class_ids"].shape
        np.testing.assert_array_equal(d["coverage"], ckpt["coverage"].numpy()[d["class_ids"]])
        seen += len(d["keys"])
    assert seen == len(LABELS)
    assert coverage_mark(0) and coverage_mark(2) and not coverage_mark(5) and not coverage_mark(None)
    item = {
        "order": 0,
        "key": "k00",
        "shard": "s",
        "class_ids": [3, 42],
        "class_names": ["a", "b"],
        "probs": [0.5, 0.2],
        "coverage": [3, 0],
        "label": -1,
        "label_name": "",
        "predicted": 3,
        "original": "img/x.png",
        "overlay": "cam/x.png",
    }
    page = gallery_html([item])
    assert page.count("untrained class row") == 1 and "trained on 3 samples only" in page


def test_eval_split_by_coverage(effnet, tmp_path):
    import csv

    from PIL import Image

    from pipeline.configs import EvalConfig
    from pipeline.evaluation.run import evaluate
    from pipeline.shards.pack import pack_folder
    from pipeline.train.checkpoints import save_checkpoint

    photos = skimage_photos()
    for i, (name, rgb) in enumerate(photos.items()):
        d = tmp_path / "images" / f"class{i}"
        d.mkdir(parents=True)
        Image.fromarray(rgb).save(d / f"{name}.jpg", quality=92)
    pack_folder(tmp_path / "images", str(tmp_path / "shards"), samples_per_shard=4, progress=False)
    from pipeline.images import decode_image, preprocess

    files = [tmp_path / "images" / f"class{i}" / f"{name}.jpg" for i, name in enumerate(photos)]
    with torch.no_grad():  # the evaluation's preprocessing of the packed files (near-tied classes then agree)
        top1 = effnet(
            torch.stack([preprocess(decode_image(f.read_bytes()), effnet.preprocessing) for f in files])
        ).argmax(1)
    coverage = torch.zeros(1000, dtype=torch.int64)
    coverage[top1[:2]] = 1  # the classes of the first two photos were trained
    url = str(tmp_path / "fm.pt")
    save_checkpoint(
        url,
        attention_state=init_attention(effnet, 0, "cam").state_dict(),
        method="fm",
        backbone=effnet.describe(),
        config={"init": "cam"},
        coverage=coverage,
    )
    out = tmp_path / "eval"
    evaluate(
        EvalConfig(
            shards=str(tmp_path / "shards"),
            out=str(out),
            checkpoints=[url],
            methods=("random",),
            engine="local",
            split_coverage=True,
            save_maps=4,
            progress=False,
        )
    )
    import json

    report = json.loads((out / "results.json").read_text())
    [split] = report["coverage_split"]
    assert split["rows_trained"] == int((coverage > 0).sum())
    rows = list(csv.DictReader(open(out / "per_image.csv", newline="")))
    for group in split["groups"]:
        for r in group["rows"]:
            mine = [
                x
                for x in rows
                if x["method"] == r["id"] and (coverage[int(x["predicted"])] > 0) == (group["group"] == "covered")
            ]
            assert r["n"] == len(mine)
            if mine:  # AD at 100% recomputed from the per-image scores
                ad = 100 * np.mean([max(0.0, float(x["Y"]) - float(x["O@1"])) / float(x["Y"]) for x in mine])
                assert r["AD"][0] == pytest.approx(ad, abs=1e-6)
    assert {g["group"]: g["rows"][0]["n"] for g in split["groups"]} == {"covered": 2, "uncovered": 2}
    assert "## Split by coverage" in (out / "results.md").read_text()
    # the report's gallery marks L-CAM's maps of classes whose row never trained (one mark per such image)
    from pipeline.report.page import write_report

    write_report(str(tmp_path / "report.html"), eval_dir=str(out))
    page = (tmp_path / "report.html").read_text()
    shown = np.load(out / "maps.npz")["class_ids"]
    assert page.count("untrained class row") == sum(int(coverage[int(c)]) == 0 for c in shown) == 2
    with pytest.raises(UserError, match="records its coverage"):
        save_checkpoint(
            str(tmp_path / "old.pt"),
            attention_state=init_attention(effnet, 0).state_dict(),
            method="fm",
            backbone=effnet.describe(),
            config={},
        )
        evaluate(
            EvalConfig(
                shards=str(tmp_path / "shards"),
                out=str(tmp_path / "e2"),
                checkpoints=[str(tmp_path / "old.pt")],
                methods=(),
                engine="local",
                split_coverage=True,
                progress=False,
            )
        )
    assert not (tmp_path / "e2").exists()
