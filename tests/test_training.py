"""Training L-CAM: from the cache vs end to end, loss, exact resume, refusals, Ray Train (L-CAM-Img)."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main as cli_main
from lcam import LCAM, LCAMLoss, build_backbone
from lcam.recipe import Recipe, default_recipe
from lcam.training import LCAMTrainer, TrainBatch, init_attention
from pipeline.configs import TrainConfig
from pipeline.errors import UserError
from pipeline.extract.run import cache_identity
from pipeline.images import decode_image, preprocess, random_crop_flip
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards, read_shard
from pipeline.store.feature_cache import FeatureCache
from pipeline.train.checkpoints import CheckpointMismatch, load_checkpoint, load_lcam, save_checkpoint
from pipeline.train.fm import fm_batches, train_fm
from pipeline.train.img import progress_line, train_img
from pipeline.train.img_data import crop_flip, crop_seed, decode_for_training, image_batches, read_training_rows
from pipeline.train.loader import CacheLoader
from pipeline.train.run_folder import format_epoch, trainer_state_from_checkpoint
from tests.helpers import skimage_photos

N_IMAGES, PER_SHARD, BATCH = 12, 3, 4  # 4 shards, 3 steps per epoch


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def data(tmp_path_factory, backbone):
    """Real photos (random crops of scikit-image's) in 2 class folders -> 4 shards; their clean
    centre crops, and feature caches (float16 and float32) written directly from this backbone."""
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    photos = list(skimage_photos().values())
    for i in range(N_IMAGES):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        y, x = rng.integers(0, h // 3), rng.integers(0, w // 3)
        folder = root / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(p[y : y + 2 * h // 3, x : x + 2 * w // 3]).save(folder / f"img{i:02d}.jpg", quality=90)
    shards = root / "shards"
    assert pack_folder(root / "images", str(shards), samples_per_shard=PER_SHARD, progress=False).packed == N_IMAGES
    images, feats, top1 = {}, {}, {}
    for info in list_shards(str(shards)):
        for s in read_shard(info):
            images[s.key] = preprocess(decode_image(s.image), backbone.preprocessing)
    keys = sorted(images)
    with torch.no_grad():
        f, logits = backbone.extract(torch.stack([images[k] for k in keys]))
    for i, k in enumerate(keys):
        feats[k], top1[k] = f[i], int(logits[i].argmax())
    caches = {
        dtype: write_cache(str(root / f"cache-{dtype}"), backbone, shards, feats, logits, keys, dtype)
        for dtype in ("float16", "float32")
    }
    return {"root": root, "shards": shards, "images": images, "feats": feats, "top1": top1, "caches": caches}


def write_cache(url, backbone, shards, feats, logits, keys, dtype) -> FeatureCache:
    """The cache `lcam extract` makes, written without Ray (features from one in-process batch)."""
    cache = FeatureCache.create_or_open(
        url,
        cache_identity(backbone, ("center",), dtype),
        feature_shape=backbone.feature_shape,
        views=("center",),
        dtype=dtype,
        num_classes=backbone.num_classes,
    )
    row = {k: i for i, k in enumerate(keys)}
    entries = []
    for info in list_shards(str(shards)):
        samples = read_shard(info)
        idx = [row[s.key] for s in samples]
        p5, c5 = logits[idx].softmax(1).topk(5)
        f = torch.stack([feats[s.key] for s in samples])[:, None]
        entries.append(cache.write_shard(info.url, [s.key for s in samples], [s.label for s in samples], f, c5, p5))
    cache.mark_done(entries)
    return FeatureCache.open(url)


def config(data, out, **kw) -> TrainConfig:
    # the SPEC's recipe (step schedule, random init): these tests check its mechanics
    base = dict(
        method="fm",
        out=str(out),
        cache=str(data["caches"]["float16"].url),
        batch_size=BATCH,
        target="predicted",
        view="first",
        seed=0,
        log_every=1,
        checkpoint_minutes=0,
        progress=False,
        recipe_rule="spec",
    )
    base.update(kw)
    return TrainConfig(**base)


def img_config(data, out, ray_storage, **kw) -> TrainConfig:
    """L-CAM-Img on 2 Ray Train workers, pass 1 from the float16 cache, the SPEC's recipe."""
    base = dict(
        method="img",
        out=str(out),
        shards=str(data["shards"]),
        cache=data["caches"]["float16"].url,
        augment="center",
        target="predicted",
        batch_size=BATCH,
        workers=2,
        recipe_rule="spec",
        cpus_per_worker=0.5,
        ray_storage=str(ray_storage),
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def train_steps(backbone, batches_of_epoch, steps: int, recipe: Recipe) -> LCAMTrainer:
    trainer = LCAMTrainer(LCAM(backbone, init_attention(backbone, 0)), "fm", recipe, N_IMAGES // BATCH)
    while trainer.global_step < steps:
        trainer.train_epoch(batches_of_epoch(trainer.epoch), max_steps=steps)
    return trainer


def test_cache_training_equals_end_to_end(data, backbone):
    """20 steps from cached F == 20 steps running the backbone on the images at every step (same
    order, same seed, no augmentation). Tolerances on the weights: float32 cache 2e-6 (only
    batch-size-dependent conv rounding can differ; measured: equal); float16 cache 2e-4: float16
    rounds F by up to 2^-11 relative (values <= 6, ReLU6), measured to move the weights by 3.3e-5
    after 20 steps at lr 1e-2, while training moves them by > 1e-2 (asserted)."""
    recipe = default_recipe("efficientnet_lite0").with_overrides(batch_size=BATCH)
    loaders = {
        dtype: CacheLoader(cache, BATCH, seed=3, target="predicted", view="first", buffer_rows=6)
        for dtype, cache in data["caches"].items()
    }

    def cached(loader):
        def batches(epoch):
            loader.set_epoch(epoch)
            return fm_batches(loader, 0)

        return batches

    def end_to_end(epoch):
        loader = loaders["float16"]
        loader.set_epoch(epoch)
        for _, _, keys in loader:  # the same order; the targets are the backbone's top-1, computed on the fly
            yield TrainBatch(images=torch.stack([data["images"][k] for k in keys]))

    e2e = train_steps(backbone, end_to_end, 20, recipe)
    w0 = init_attention(backbone, 0).conv.weight.detach()
    we, be = e2e.model.attention.conv.weight.detach(), e2e.model.attention.conv.bias.detach()
    assert e2e.global_step == 20 and e2e.epoch == 6
    for dtype, atol in (("float32", 2e-6), ("float16", 2e-4)):
        tr = train_steps(backbone, cached(loaders[dtype]), 20, recipe)
        assert tr.global_step == 20 and tr.epoch == 6
        wa = tr.model.attention.conv.weight.detach()
        assert float((wa - w0).abs().max()) > 50 * atol  # the comparison is not vacuous
        torch.testing.assert_close(wa, we, atol=atol, rtol=0)
        torch.testing.assert_close(tr.model.attention.conv.bias.detach(), be, atol=atol, rtol=0)


def test_training_step_gradient_equals_reference_formulation():
    """Gathered weight rows (ours) give the same loss and gradients as the reference: all K maps from
    the full 1x1 conv, then the target's map picked (L-CAM-Fm and L-CAM-Img)."""
    backbone = build_backbone("resnet18", weights="random")
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64)
    t = torch.tensor([5, 999, 5])
    loss_fn = LCAMLoss()
    for method in ("fm", "img"):
        ours = LCAM(backbone, init_attention(backbone, 1))
        ref = LCAM(backbone, init_attention(backbone, 1))
        masked, maps = ours.training_forward(method, t, images=x)
        loss_fn(masked, t, maps).total.backward()
        feats = backbone.features(backbone.normalize(x))
        a = torch.sigmoid(ref.attention(feats))[torch.arange(3), t][:, None]  # (B, 1, h, w) from all K maps
        if method == "fm":
            masked_ref = backbone.head(a * feats)
        else:
            masked_ref = backbone(
                torch.nn.functional.interpolate(a, size=(64, 64), mode="bilinear", align_corners=False) * x
            )
        loss_fn(masked_ref, t, a).total.backward()
        for p, q in zip(ours.attention.parameters(), ref.attention.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
        assert (
            float(ours.attention.conv.weight.grad[[5, 999]].abs().sum()) > 0
            and float(ours.attention.conv.weight.grad[0].abs().sum()) == 0
        )


def test_img_first_pass_from_features_equals_backbone_pass():
    """L-CAM-Img with F given (as from a cache) trains exactly like computing pass 1 itself."""
    backbone = build_backbone("resnet18", weights="random")
    torch.manual_seed(1)
    batches = [TrainBatch(targets=torch.randint(0, 1000, (2,)), images=torch.rand(2, 3, 64, 64)) for _ in range(3)]
    with torch.no_grad():
        with_f = [TrainBatch(b.targets, backbone.features(backbone.normalize(b.images)), b.images) for b in batches]
    runs = []
    for bs in (batches, with_f):
        tr = LCAMTrainer(LCAM(backbone, init_attention(backbone, 0)), "img", Recipe(lr=0.1, epochs=1), 3)
        assert tr.train_epoch(bs) is not None
        runs.append(tr.model.attention.conv.weight.detach())
    torch.testing.assert_close(runs[0], runs[1], atol=1e-6, rtol=0)


def test_fm_cli_loss_falls_and_writes_checkpoints_metrics_plot(data, backbone, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(
        [
            "train",
            "--method",
            "fm",
            "--cache",
            data["caches"]["float16"].url,
            "--out",
            str(out),
            "--epochs",
            "6",
            "--recipe",
            "spec",
            "--batch-size",
            str(BATCH),
            "--target",
            "predicted",
            "--log-every",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6/6 epochs, 18 steps" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 6] and len(steps) == 18
    assert all(r["samples"] == N_IMAGES for r in epochs)
    assert epochs[-1]["loss"] < 0.8 * epochs[0]["loss"] and epochs[-1]["ce"] < epochs[0]["ce"]
    # the step schedule: lr 1e-2 x 0.75 per epoch (SPEC 3, EfficientNet-Lite0 gets VGG-16's)
    np.testing.assert_allclose([r["lr"] for r in epochs], [1e-2 * 0.75**e for e in range(6)], rtol=1e-9)
    for r in epochs:  # the epoch mean is the sample-weighted mean of its steps
        mine = [s for s in steps if s["epoch"] == r["epoch"] - 1]
        assert abs(sum(s["loss"] * s["samples"] for s in mine) / N_IMAGES - r["loss"]) < 1e-5
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size[0] >= 800
    # kept by default: the last state (checkpoint.pt, and its epoch file) and best.pt (no validation
    # shards in a 4-shard cache: the last epoch)
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "checkpoint.pt", "epoch-006.pt"]
    assert torch.equal(
        load_checkpoint(str(out / "best.pt"))["attention"]["conv.weight"],
        load_checkpoint(str(out / "checkpoint.pt"))["attention"]["conv.weight"],
    )

    model, ckpt = load_lcam(str(out / "checkpoint.pt"))
    assert ckpt["method"] == "fm" and ckpt["epoch"] == 6 and ckpt["step"] == 18
    assert ckpt["cache_fingerprint"] == data["caches"]["float16"].fingerprint
    key = sorted(data["images"])[0]
    ex = model.explain(data["images"][key][None], upsample=True)
    assert int(ex.class_ids[0, 0]) == data["top1"][key]
    assert ex.upsampled.shape == (1, 1, 224, 224) and float(ex.maps.min()) == 0.0 and float(ex.maps.max()) == 1.0


def test_resume_after_interruption_reproduces_the_uninterrupted_run(data, tmp_path, capsys):
    full = train_fm(config(data, tmp_path / "full", epochs=3, view="random"))
    assert full.epochs_done == 3 and full.steps == 9 and not full.stopped_early
    part = train_fm(config(data, tmp_path / "cut", epochs=3, view="random", max_steps=5))  # stops inside epoch 2
    assert part.stopped_early and part.steps == 5 and part.epochs_done == 1
    cut = load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    assert cut["extra"]["position"] == {"epoch": 1, "batch_in_epoch": 2, "global_step": 5, "steps_per_epoch": 3}
    capsys.readouterr()
    # `lcam train --out DIR --resume`: method, cache and recipe come from the checkpoint
    assert (
        cli_main(
            [
                "train",
                "--out",
                str(tmp_path / "cut"),
                "--resume",
                "--log-every",
                "1",
                "--checkpoint-minutes",
                "0",
                "--no-progress",
                "--json",
            ]
        )
        == 0
    )
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["resumed_from_step"] == 5 and resumed["steps"] == 9 and resumed["epochs_done"] == 3

    a, b = (
        load_checkpoint(str(tmp_path / "full" / "checkpoint.pt")),
        load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt")),
    )
    for k in a["attention"]:
        torch.testing.assert_close(a["attention"][k], b["attention"][k], atol=1e-6, rtol=0)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sa["momentum_buffer"], sb["momentum_buffer"], atol=1e-6, rtol=0)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 9

    def curve(h):
        return [
            (r["kind"], r["epoch"], r["step"], r["samples"], round(r["loss"], 5), round(r["agreement"], 6)) for r in h
        ]

    assert curve(a["metrics"]) == curve(b["metrics"])  # epoch 2's metrics include the steps before the cut
    assert len(curve(b["metrics"])) == 9 + 3


def test_resume_and_restart_refusals(data, backbone, tmp_path, capsys):
    out = tmp_path / "run"
    train_fm(config(data, out, epochs=1))
    with pytest.raises(UserError, match="already holds a training run.*--resume"):
        train_fm(config(data, out, epochs=1))
    with pytest.raises(UserError, match="nothing to resume"):
        train_fm(config(data, tmp_path / "empty", resume=True))
    with pytest.raises(CheckpointMismatch, match=r"lr: checkpoint 0\.01, now 0\.5"):
        train_fm(config(data, out, lr=0.5, resume=True))
    with pytest.raises(CheckpointMismatch, match="fingerprint"):  # another cache (float32) than the run's
        train_fm(config(data, out, cache=data["caches"]["float32"].url, resume=True))
    # a checkpoint trained for another backbone
    other = tmp_path / "other"
    resnet = build_backbone("resnet18", weights="random")
    save_checkpoint(
        str(other / "checkpoint.pt"),
        attention_state=init_attention(resnet, 0).state_dict(),
        method="fm",
        backbone=resnet.describe(),
        config={},
        extra={},
    )
    rc = cli_main(["train", "--cache", data["caches"]["float16"].url, "--out", str(other), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "trained for resnet18" in err and "Traceback" not in err
    rc = cli_main(["train", "--cache", str(tmp_path / "no-cache"), "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "no feature cache" in capsys.readouterr().err
    with pytest.raises(UserError, match="clean centre crop"):  # random crops cannot take pass 1 from a cache
        train_img(
            TrainConfig(
                method="img",
                out=str(tmp_path / "img"),
                shards=str(data["shards"]),
                cache=data["caches"]["float16"].url,
                augment="random",
                progress=False,
            )
        )


def test_training_rows_decode_and_worker_batches(data, backbone):
    """The Ray Data stages and the worker's batching, run directly: centre crops with cached F, and
    random crops equal to pipeline.images.random_crop_flip for the per-(seed, epoch, key) generator."""
    info = list_shards(str(data["shards"]))[1]
    cache = data["caches"]["float32"]
    item = {"url": info.url, "name": info.name, "count": info.count}
    rows = read_training_rows(item, cache=cache, view_index=0)
    assert [r["key"] for r in rows] == [s.key for s in read_shard(info)] and all(r["error"] == "" for r in rows)
    batch = {k: np.array([r[k] for r in rows], dtype=object if k == "image" else None) for k in rows[0]}
    center = decode_for_training(batch, backbone.preprocessing, "center")
    [tb] = list(image_batches([center], augment="center", crop=224, seed=0, epoch=0, target="predicted", skipped=[]))
    keys = [r["key"] for r in rows]
    torch.testing.assert_close(tb.images, torch.stack([data["images"][k] for k in keys]), atol=0, rtol=0)
    torch.testing.assert_close(tb.feats, torch.stack([data["feats"][k] for k in keys]), atol=0, rtol=0)
    assert tb.targets.tolist() == [data["top1"][k] for k in keys]

    plain = {k: v for k, v in batch.items() if k != "features"}
    rnd = decode_for_training(plain, backbone.preprocessing, "random")
    skipped: list[str] = []
    [tb] = list(image_batches([rnd], augment="random", crop=224, seed=7, epoch=2, target="label", skipped=skipped))
    assert tb.feats is None and tb.targets.tolist() == [r["label"] for r in rows] and skipped == []
    for img, r in zip(tb.images, rows):
        want = random_crop_flip(
            decode_image(r["image"]), backbone.preprocessing, torch.Generator().manual_seed(crop_seed(7, 2, r["key"]))
        )
        torch.testing.assert_close(img, want, atol=0, rtol=0)
    assert crop_seed(7, 2, "a") != crop_seed(7, 3, "a")  # a new crop each epoch

    broken = dict(plain, image=np.array([b"\xff\xd8 not a jpeg"] + list(plain["image"][1:]), dtype=object))
    [tb] = list(
        image_batches(
            [decode_for_training(broken, backbone.preprocessing, "random")],
            augment="random",
            crop=224,
            seed=0,
            epoch=0,
            target="label",
            skipped=skipped,
        )
    )
    assert skipped == [rows[0]["key"]] and len(tb) == len(rows) - 1  # reported, never silently dropped


def test_crop_flip_draws_like_random_crop_flip():
    rgb = skimage_photos(("coffee",))["coffee"]
    from lcam.backbones.base import Preprocessing
    from pipeline.images import resized_size

    prep = Preprocessing()
    im = Image.fromarray(rgb)
    resized = np.asarray(im.resize(resized_size(im.width, im.height, 256), Image.BILINEAR))
    for seed in range(5):
        got = crop_flip(resized, 224, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(
            got, random_crop_flip(rgb, prep, torch.Generator().manual_seed(seed)), atol=0, rtol=0
        )


def test_img_progress_lines_from_rank_zero_messages():
    """The driver's lines for what rank 0 sends: rate and ETA computed by hand."""
    step = {"epoch": 0, "batch": 2, "steps": 4, "loss": 1.23456, "t": 4.0, "global_batch": 8}  # 0.5 steps/s
    assert progress_line(step, epochs=3) == "train: epoch 1/3 step 2/4, loss 1.235, 4.0 images/s, ETA 4s"
    record = {
        "epoch": 1,
        "loss": 0.5,
        "ce": 0.25,
        "area": 0.125,
        "tv": 0.0625,
        "agreement": 0.5,
        "lr": 1e-3,
        "samples": 8,
        "seconds": 2.0,
        "samples_per_s": 4.0,
    }
    assert progress_line({"epoch_done": record}, epochs=3) == format_epoch(record)
    assert (
        progress_line({"epoch_done": {"epoch": 0, "step": 1, "stopped": True, "skipped": 0}}, epochs=3) is None
    )  # stopped: no line


def test_img_ray_train_two_workers_checkpoint_loads_and_explains(ray_local, data, backbone, tmp_path):
    """L-CAM-Img on Ray Train: 2 CPU workers (gloo, DDP), images streamed by Ray Data, pass 1 from the cache."""
    out = tmp_path / "img"
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    keep = Keep()
    logging.getLogger("lcam").addHandler(keep)
    try:
        summary = train_img(img_config(data, out, tmp_path / "ray", epochs=1, progress=True))
    finally:
        logging.getLogger("lcam").removeHandler(keep)
    assert summary.epochs_done == 1 and summary.steps == 3 and not summary.stopped_early
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    [epoch] = [r for r in records if r["kind"] == "epoch"]
    # rank 0's epoch line came through the driver's relay (queued last: close() drains it),
    # after the driver's own start line; step lines, if any were due, name this epoch
    [start] = [i for i, line in enumerate(lines) if line.startswith(f"L-CAM-Img: {N_IMAGES} images")]
    assert lines.count(format_epoch(epoch)) == 1 and lines.index(format_epoch(epoch)) > start, lines
    assert all(line.startswith("train: epoch 1/1 step ") for line in lines if line.startswith("train: epoch ")), lines
    assert epoch["samples"] == N_IMAGES and epoch["workers"] == 2 and epoch["skipped"] == 0
    assert np.isfinite(epoch["loss"]) and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "epoch-001.pt").exists()

    model, ckpt = load_lcam(str(out / "checkpoint.pt"))
    assert (
        ckpt["method"] == "img"
        and ckpt["config"]["workers"] == 2
        and ckpt["cache_fingerprint"] == data["caches"]["float16"].fingerprint
    )
    # coverage summed over the two workers: every image once, for its top-1 class
    assert ckpt["coverage"].tolist() == np.bincount(list(data["top1"].values()), minlength=1000).tolist()
    assert not torch.equal(model.attention.conv.weight, init_attention(backbone, 0).conv.weight)  # it trained
    keys = sorted(data["images"])[:2]
    ex = model.explain(torch.stack([data["images"][k] for k in keys]))
    assert ex.class_ids[:, 0].tolist() == [data["top1"][k] for k in keys]
    assert ex.maps.shape == (2, 1, 7, 7) and torch.isfinite(ex.raw).all()
    # the finished run resumed with another export rule: re-exported in the driver, no Ray Train run
    raw = trainer_state_from_checkpoint(ckpt)["attention"]
    runs_before = sorted(p.name for p in (tmp_path / "ray").iterdir())
    again = train_img(
        TrainConfig(
            method="img",
            out=str(out),
            shards=str(data["shards"]),
            cache=data["caches"]["float16"].url,
            resume=True,
            uncovered="keep",
            workers=2,
            cpus_per_worker=0.5,
            ray_storage=str(tmp_path / "ray"),
            progress=False,
        )
    )
    assert again.steps == summary.steps and again.epochs_done == 1
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == runs_before
    after = load_checkpoint(str(out / "checkpoint.pt"))
    assert after["config"]["uncovered"] == "keep" and after["trained_rows"] is None and after["step"] == ckpt["step"]
    assert ckpt["trained_rows"] is not None  # the first export had filled the untrained rows (init)
    for k in raw:
        assert torch.equal(after["attention"][k], raw[k])
    assert torch.equal(
        load_checkpoint(str(out / "epoch-001.pt"))["attention"]["conv.weight"], after["attention"]["conv.weight"]
    )


def assert_validation_picks_best(out, epochs, best_epoch, backbone, method, targets, **inputs) -> None:
    """Every epoch record's validation loss is the L-CAM loss of that epoch's exported attention on the
    held-back ``inputs`` (recomputed here in one batch), and best.pt is the epoch with the lowest."""
    for r in epochs:
        att = init_attention(backbone, 0)
        att.load_state_dict(load_checkpoint(str(out / f"epoch-{r['epoch']:03d}.pt"))["attention"])
        with torch.no_grad():
            logits, maps = LCAM(backbone, att).training_forward(method, targets, **inputs)
            loss = LCAMLoss()(logits, targets, maps)
        assert abs(float(loss.total) - r["val_loss"]) < 1e-4 and abs(float(loss.ce) - r["val_ce"]) < 1e-4
    best = min(epochs, key=lambda r: r["val_loss"])["epoch"]
    assert best_epoch == best
    assert torch.equal(
        load_checkpoint(str(out / "best.pt"))["attention"]["conv.weight"],
        load_checkpoint(str(out / f"epoch-{best:03d}.pt"))["attention"]["conv.weight"],
    )


def test_validation_shards_pick_best_and_keep_prunes_epoch_files(data, backbone, tmp_path):
    """--val-shards 1: the last shard is held back; every epoch's validation loss is the L-CAM loss of the
    exported attention on its samples (recomputed here independently); best.pt is the epoch with the lowest;
    --keep 2 leaves the two most recent epoch files; --limit-shards trains on the first shards only."""
    cache = data["caches"]["float16"]
    out = tmp_path / "run"
    s = train_fm(config(data, out, epochs=4, val_shards=1, keep=0, lr=0.5, schedule="onecycle"))
    epochs = [
        r
        for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "epoch"
    ]
    held = cache.shard_ids()[-1]
    assert all(r["samples"] == N_IMAGES - PER_SHARD and r["val_samples"] == PER_SHARD for r in epochs)
    keys, feats = [], []
    for ks, f, _labels, _top in cache.iter_rows(64, shard_ids=[held], view=0):
        keys += ks
        feats.append(torch.from_numpy(np.asarray(f, dtype=np.float32)))
    f = torch.cat(feats)
    targets = torch.tensor([data["top1"][k] for k in keys])
    assert_validation_picks_best(out, epochs, s.best_epoch, backbone, "fm", targets, feats=f)
    # --keep 2 and a training subset
    out2 = tmp_path / "run2"
    train_fm(config(data, out2, epochs=4, val_shards=1, train_shards_limit=2, keep=2))
    assert sorted(p.name for p in out2.glob("epoch-*.pt")) == ["epoch-003.pt", "epoch-004.pt"]
    assert (out2 / "best.pt").exists() and (out2 / "checkpoint.pt").exists()
    rec = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert {r["samples"] for r in rec if r["kind"] == "epoch"} == {2 * PER_SHARD}
    with pytest.raises(UserError, match="--val-shards 4 holds back every shard"):
        train_fm(config(data, tmp_path / "run3", epochs=1, val_shards=4))


def test_img_validation_shards_pick_best_over_two_workers(ray_local, data, backbone, tmp_path):
    """L-CAM-Img with --val-shards 1 on 2 Ray Train workers: the last shard (by URL) is held back; each
    epoch's validation loss is the L-CAM-Img loss of the exported attention on all of its images (split
    unequally over the workers, summed; recomputed here in one batch), and best.pt is the lowest epoch."""
    out = tmp_path / "img-val"
    summary = train_img(
        img_config(data, out, tmp_path / "ray", epochs=2, lr=0.5, schedule="onecycle", val_shards=1, keep=0)
    )
    held = sorted(info.url for info in list_shards(str(data["shards"])))[-1]
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["config"]["val_shard_ids"] == [held] and len(ckpt["config"]["shards"]) == N_IMAGES // PER_SHARD
    epochs = [
        r
        for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "epoch"
    ]
    # training: 9 images, equal split over 2 workers (4 each); validation: all 3 held-back images
    assert [(r["samples"], r["val_samples"]) for r in epochs] == [(8, PER_SHARD), (8, PER_SHARD)]
    keys = [s.key for s in read_shard(next(i for i in list_shards(str(data["shards"])) if i.url == held))]
    images = torch.stack([data["images"][k] for k in keys])
    feats = torch.stack([data["feats"][k] for k in keys]).half().float()  # the cache's float16, as pass 1 reads it
    targets = torch.tensor([data["top1"][k] for k in keys])
    assert_validation_picks_best(out, epochs, summary.best_epoch, backbone, "img", targets, feats=feats, images=images)


def test_decay_to_start_pulls_towards_the_start_not_zero(backbone, data):
    """Recipe.decay_to "start": the gradient gets weight_decay * (p - start) instead of SGD's weight_decay * p.
    After one step from the start (Nesterov, first step: update = lr * (1 + momentum) * grad), a row no target
    touched is exactly its start, and a trained row differs from SGD's decay by lr * (1 + m) * wd * p."""
    keys = sorted(data["feats"])[:4]
    feats = torch.stack([data["feats"][k] for k in keys]).float()
    targets = torch.tensor([data["top1"][k] for k in keys])
    after = {}
    for mode in ("zero", "start"):
        att = init_attention(backbone, 0, "cam")
        start = {k: v.clone() for k, v in att.state_dict().items()}
        recipe = Recipe(lr=0.5, weight_decay=0.01, decay_to=mode)
        trainer = LCAMTrainer(LCAM(backbone, att), "fm", recipe, 1)
        trainer.step(TrainBatch(targets=targets, feats=feats))
        after[mode] = {k: v.detach().clone() for k, v in att.state_dict().items()}
    untouched = next(k for k in range(backbone.num_classes) if k not in set(targets.tolist()))
    w0 = start["conv.weight"].flatten(1)
    ws, wz = after["start"]["conv.weight"].flatten(1), after["zero"]["conv.weight"].flatten(1)
    assert torch.equal(ws[untouched], w0[untouched])
    torch.testing.assert_close(wz[untouched], w0[untouched] * (1 - 0.5 * 1.9 * 0.01))
    t = int(targets[0])
    torch.testing.assert_close(ws[t] - wz[t], 0.5 * 1.9 * 0.01 * w0[t], rtol=1e-4, atol=1e-7)
