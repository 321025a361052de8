"""Every command runs with only its required arguments (issue #18).

Each job runs once, in this process through ``jobs.cli.main`` on the session's local Ray,
on four generated images (two classes) with the default backbone and its packaged
weights, and must finish (exit 0) and write what its ``--help`` promises. Extra flags
appear only where the defaults would cost minutes, each with the reason next to it.
Options that only make sense together are refused before any work: one line, exit 2,
nothing created.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import eval as eval_job
from jobs import pipeline as pipeline_job
from jobs.cli import main as cli_main
from pipeline.shards.read import list_shards, read_shard
from pipeline.store.cam_store import CamStore
from pipeline.store.feature_cache import FeatureCache
from pipeline.train.checkpoints import load_lcam

N_IMAGES = 4
PNG = b"\x89PNG\r\n\x1a\n"


def cheap_baselines(methods: list[str], limit_flag: str = "--method-limit") -> list[str]:
    """RISE's 4000 masks and Score-CAM's 1,280 channel masks are thousands of backbone forwards
    per image (minutes on CPU even for four images): fewer masks, Score-CAM on one image.
    Every default method still runs."""
    return ["--rise-masks", "40"] + ([limit_flag, "scorecam=1"] if "scorecam" in methods else [])


def default_methods(job, dest: str) -> list[str]:
    """The baselines a job evaluates by default (read from its parser: the defaults may change)."""
    from lcam.cam_methods import base as cam_methods

    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    default = parser.get_default(dest)  # None: the registry's default list (lcam pipeline)
    return (
        list(cam_methods.default_methods()) if default is None else [m.strip() for m in default.split(",") if m.strip()]
    )


def write_images(folder: Path) -> Path:
    """Small noise JPEGs in two class folders (ImageNet classes 0 and 1 by folder order)."""
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = folder / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(d / f"img{i}.jpg", quality=90)
    return folder


def run_in(folder: Path, argv: list[str]) -> int:
    """``lcam ARGV`` with ``folder`` as the working directory (defaults such as --out runs/train are relative)."""
    folder.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        return cli_main(argv)


def assert_run_folder(run: Path, method: str, epochs: int | None) -> None:
    """``lcam train --out``'s promise: checkpoint.pt (loads as an explainer), best.pt, the last epoch-NNN.pt (--keep 1),
    metrics.jsonl, curves.png."""
    model, ckpt = load_lcam(str(run / "checkpoint.pt"))
    assert ckpt["method"] == method and ckpt["backbone"]["backbone"] == "efficientnet_lite0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if epochs is not None:
        assert ckpt["epoch"] == epochs
        assert sorted(p.name for p in run.glob("epoch-*.pt")) == [f"epoch-{epochs:03d}.pt"]
        assert load_lcam(str(run / "best.pt"))[1]["method"] == method
        assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(range(1, epochs + 1))
    assert (run / "curves.png").read_bytes().startswith(PNG)


def assert_cam_store(url: Path, source_kind: str) -> None:
    info = CamStore.open(str(url)).info()
    assert (info["samples"], info["skipped"], info["source"]["kind"]) == (N_IMAGES, 0, source_kind)


def assert_eval_folder(out: Path, methods: list[str]) -> None:
    """``lcam eval OUT``'s promise: results.md, results.json, adic.png, per_image.csv; one row per method."""
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["methods"]) == sorted(methods)
    assert (out / "results.md").read_text().strip()
    assert (out / "adic.png").read_bytes().startswith(PNG)
    rows = (out / "per_image.csv").read_text().splitlines()
    assert len(rows) > 1


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("defaults")


@pytest.fixture(scope="module")
def images(work) -> Path:
    return write_images(work / "images")


@pytest.fixture(scope="module")
def shards(work, images) -> Path:
    """``lcam shards SRC OUT``."""
    assert cli_main(["shards", str(images), str(work / "shards")]) == 0
    return work / "shards"


@pytest.fixture(scope="module")
def cache(ray_local, work, shards) -> Path:
    """``lcam extract SHARDS CACHE``."""
    assert cli_main(["extract", str(shards), str(work / "cache")]) == 0
    return work / "cache"


@pytest.fixture(scope="module")
def fm_run(work, cache) -> Path:
    """``lcam train --cache CACHE`` (L-CAM-Fm is the default method; --out defaults to runs/train)."""
    assert run_in(work / "train-fm", ["train", "--cache", str(cache)]) == 0
    return work / "train-fm" / "runs" / "train"


def test_shards(shards):
    index = json.loads((shards / "index.json").read_text())
    assert [e["count"] for e in index["shards"]] == [N_IMAGES]  # default 1000 per shard: one shard
    assert json.loads((shards / "pack_report.json").read_text())
    samples = [s for info in list_shards(str(shards)) for s in read_shard(info)]
    assert sorted(s.label for s in samples) == [0, 0, 1, 1]


def test_extract(cache, shards, capsys):
    fc = FeatureCache.open(str(cache))
    assert (len(fc), tuple(fc.views)) == (N_IMAGES, ("center",))
    assert cli_main(["cache", "verify", str(cache), "--index", str(shards)]) == 0
    assert "ok" in capsys.readouterr().out.lower()


def test_train_fm(fm_run):
    # the default recipe by data size: 4 samples -> one-cycle, 20 epochs (one step each here)
    assert_run_folder(fm_run, "fm", epochs=20)
    assert load_lcam(str(fm_run / "checkpoint.pt"))[1]["config"]["init"] == "cam"


def test_train_img(ray_local, work, shards):
    # --max-steps 2: each of the recipe's 4 epochs is a Ray Train report and checkpoint round;
    # two steps (two epochs of one batch here) show the run and its checkpoint work.
    assert run_in(work / "train-img", ["train", "--method", "img", "--shards", str(shards), "--max-steps", "2"]) == 0
    run = work / "train-img" / "runs" / "train"
    assert_run_folder(run, "img", epochs=None)
    assert load_lcam(str(run / "checkpoint.pt"))[1]["step"] == 2


def test_new_user_path_by_hand(ray_local, work, shards, cache, fm_run, capsys):
    """Issue 29: each command takes what the previous one made, by default (shards, extract and
    train ran in the fixtures above): cams from the run folder, the CAM store inspected, the
    audit of that default store (only the predicted class's maps), the evaluation of the run
    folder, and report.html from those outputs; then the trained run explains a file in two lines."""
    cams, audit, ev, report = (
        work / "cams-cache",
        work / "audit",
        work / "eval-by-hand",
        work / "report" / "report.html",
    )
    assert (
        cli_main(["cams", str(fm_run), str(cams), "--cache", str(cache), "--overlays", "2"]) == 0
    )  # RUN = RUN/checkpoint.pt
    assert_cam_store(cams, "cache")
    assert CamStore.open(str(cams)).info()["checkpoint"]["url"] == str(fm_run / "checkpoint.pt")
    capsys.readouterr()
    assert (
        cli_main(["cams", "info", str(cams)]) == 0 and cli_main(["cache", "info", str(cams)]) == 0
    )  # one store-aware info
    assert capsys.readouterr().out.count(f"CAM store    {cams}") == 2
    assert cli_main(["cache", "verify", str(cams)]) == 0
    assert f"verify {cams}: OK (1 shards, {N_IMAGES} rows)" in capsys.readouterr().out

    assert cli_main(["audit", str(cams), str(audit), "--no-progress"]) == 0
    out = capsys.readouterr().out
    # noise images labelled ImageNet 0 and 1: the classifier gets them wrong, and the store has no true-class map
    assert f"audit of {N_IMAGES} samples" in out and "--classes predicted,label` adds the true class's map" in out
    page = (audit / "audit.html").read_text()
    assert "not in this store" in page and "lcam cams --classes predicted,label" in page

    assert (
        cli_main(
            [
                "eval",
                str(shards),
                str(ev),
                "--checkpoint",
                f"fm={fm_run}",
                "--methods",
                "gradcam",
                "--save-maps",
                "2",
                "--where",
                "local",
                "--no-progress",
            ]
        )
        == 0
    )
    assert_eval_folder(ev, ["fm", "gradcam"])
    assert (
        cli_main(
            [
                "report",
                str(report),
                "--eval",
                str(ev),
                "--run",
                f"fm={fm_run}",
                "--cams",
                str(cams),
                "--audit",
                str(audit),
            ]
        )
        == 0
    )
    html = report.read_text()
    assert (
        'href="../audit/audit.html"' in html
        and 'href="../cams-cache/gallery/index.html"' in html
        and "fm training curves" in html
    )
    assert (report.parent / "report_files" / "adic.png").exists()

    from lcam import Explainer

    explain = Explainer.from_checkpoint(str(fm_run))  # the run folder, as the commands take it
    e = explain(sorted((work / "images").rglob("*.jpg"))[0])
    assert e.maps.shape == (1, 1, 7, 7) and e.class_names[0][0] == explain.names[int(e.class_ids[0, 0])]


def test_cams_from_shards(ray_local, work, fm_run, shards):
    out = work / "cams-shards"
    assert cli_main(["cams", str(fm_run / "checkpoint.pt"), str(out), "--shards", str(shards)]) == 0
    assert_cam_store(out, "images")


def test_eval(ray_local, work, shards):
    out = work / "eval"
    baselines = default_methods(eval_job, "methods")
    # the same architecture from timm at 64 px (built-ins take no size): Score-CAM's 1,281
    # forwards cost ~12x less than at 224 px (130 s of the suite's time); the default backbone
    # and its weights run in every other test here; the methods and outputs are the defaults'
    small = ["--backbone", "timm:efficientnet_lite0,size=64", "--weights", "random"]
    # --costly-on-cpu: on a CPU the default list leaves Score-CAM and RISE out (minutes per image); here they run, capped
    assert cli_main(["eval", str(shards), str(out), *cheap_baselines(baselines), *small, "--costly-on-cpu"]) == 0
    assert_eval_folder(out, baselines)


def assert_workdir(wd: Path, methods: list[str], baselines: list[str]) -> None:
    """``lcam pipeline``'s promise: cache/, lcam-fm/ and/or lcam-img/, cams/, eval/, report.html."""
    assert len(FeatureCache.open(str(wd / "cache"))) == N_IMAGES
    for m in methods:
        assert_run_folder(wd / f"lcam-{m}", m, epochs=None)
    assert_cam_store(wd / "cams", "cache")
    assert_eval_folder(wd / "eval", [f"lcam-{m}" for m in methods] + baselines)
    report = (wd / "report.html").read_text()
    for m in methods:
        assert {"fm": "L-CAM-Fm", "img": "L-CAM-Img"}[m] in report


def test_pipeline(ray_local, work, shards, capsys):
    # One --method both run carries what fm, img and both each promise: both runs the fm and the
    # img training stages in one workdir (the same stages a single-method run calls), and every
    # assertion of the single-method runs is made on it (checkpoints, evaluation rows, report names,
    # L-CAM-Img streaming its images, and the refusal that names the pipeline's flags).
    wd = work / "pipeline-both"
    argv = ["pipeline", "--train-shards", str(shards), "--workdir", str(wd), "--method", "both"]
    # issue #18's --eval-methods gradcam: the default baselines cost minutes even capped (Score-CAM:
    # 1,280 forwards per image); test_eval runs them, test_default_baselines_exist checks this default.
    baselines = ["gradcam"]
    argv += ["--eval-methods", "gradcam"]
    argv += ["--img-max-steps", "2"]  # as in test_train_img: two Ray Train rounds, not eight
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert_workdir(wd, ["fm", "img"], baselines)
    # L-CAM-Img streamed its images (the default random crops cannot come from the cache)
    ckpt = load_lcam(str(wd / "lcam-img" / "checkpoint.pt"))[1]
    assert ckpt["config"]["augment"] == "random" and not ckpt["cache_fingerprint"] and not ckpt["config"]["cache"]
    # L-CAM-Fm trained from the cache (its fingerprint recorded), with the recipe's 20 epochs (the
    # default by data size, as lcam train's)
    fm_ckpt = load_lcam(str(wd / "lcam-fm" / "checkpoint.pt"))[1]
    assert fm_ckpt["cache_fingerprint"] and fm_ckpt["config"]["cache"] and fm_ckpt["epoch"] == 20
    assert fm_ckpt["config"]["recipe_rule"] == "data-size" and fm_ckpt["config"]["init"] == "cam"
    # a training error inside the pipeline names the pipeline's flags, not lcam train's
    capsys.readouterr()
    rc = cli_main(argv + ["--img-augment", "center", "--stages", "train"])
    err = capsys.readouterr().err
    assert rc == 2 and "--img-augment: checkpoint 'random', now 'center'" in err and "another --workdir" in err
    assert " --augment" not in err and " --out" not in err and "Traceback" not in err


def test_demo(ray_local, work, images):
    # --data: the four generated images instead of scikit-image's eight photos (half the
    # extraction and evaluation); --steps/--img-steps: 2 and 1 training steps instead of 60 and 6;
    # --scorecam-images 0: Score-CAM (1,280 forwards per image) is run by test_eval.
    folder = work / "demo"
    assert (
        run_in(folder, ["demo", "--data", str(images), "--steps", "2", "--img-steps", "1", "--scorecam-images", "0"])
        == 0
    )
    wd = folder / "runs" / "demo"
    assert_workdir(wd, ["fm", "img"], ["gradcam", "gradcam++"])


def test_default_baselines_exist():
    """The pipeline's and eval's default baselines are known methods (the matrix runs eval's)."""
    from lcam.cam_methods.base import method_names

    assert default_methods(pipeline_job, "eval_methods") and set(default_methods(pipeline_job, "eval_methods")) <= set(
        method_names()
    )
    assert default_methods(eval_job, "methods") and set(default_methods(eval_job, "methods")) <= set(method_names())


def test_options_that_only_work_together_are_refused_up_front(shards, tmp_path, capsys):
    """--img-workers 3 cannot split the default batch of 64: refused by the real ``lcam`` entry
    before extraction, in one line naming the pipeline's flag, with nothing created."""
    lcam = Path(sys.executable).with_name("lcam")
    if not lcam.exists():
        pytest.skip(f"no lcam console script beside {sys.executable} (pip install -e .)")
    wd = tmp_path / "wd"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [
            str(lcam),
            "pipeline",
            "--train-shards",
            str(shards),
            "--workdir",
            str(wd),
            "--method",
            "img",
            "--img-workers",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("lcam pipeline: error:") and "--img-workers" in lines[0] and " --workers" not in lines[0]
    assert not wd.exists()
    # the same refusal from `lcam train` names its own flag, and creates no run folder
    assert run_in(tmp_path / "train", ["train", "--method", "img", "--shards", str(shards), "--workers", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and " --workers" in err and "--img-workers" not in err
    assert not (tmp_path / "train" / "runs").exists()
    # --uncovered reaches both trainings: transfer maps CAM rows, so the SPEC's random init is refused up front;
    # a warm-started L-CAM-Img keeps L-CAM-Fm's exported rows (init), so only its worker split is refused
    for extra, named, absent in [
        (["--uncovered", "transfer", "--recipe", "spec"], "--uncovered transfer", "--workers"),
        (
            ["--method", "both", "--img-from-fm", "--init", "cam", "--uncovered", "transfer", "--img-workers", "3"],
            "--img-workers",
            "--uncovered",
        ),
    ]:
        proc = subprocess.run(
            [str(lcam), "pipeline", "--train-shards", str(shards), "--workdir", str(wd), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert named in lines[0] and absent not in lines[0], lines[0]
        assert not wd.exists()
    # --row-prior too: pulling rows towards the SPEC's random start is refused before any stage (before
    # the shards are even looked at: a missing folder here, so that a missing refusal fails fast)
    assert (
        cli_main(
            [
                "pipeline",
                "--train-shards",
                str(tmp_path / "no-shards"),
                "--workdir",
                str(wd),
                "--row-prior",
                "1",
                "--recipe",
                "spec",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--row-prior pulls trained rows" in err, err
    assert not wd.exists()


def test_stage_messages_name_the_flags_of_the_running_command():
    """A stage's message names config fields; each job spells them as its own flags."""
    import ray.cloudpickle

    from pipeline.errors import UserError, flag_namer
    from pipeline.train.checkpoints import CheckpointMismatch

    err = CheckpointMismatch(lambda flag: f"use {flag('augment')} center or another {flag('batch_size')}")
    assert str(err) == "use --augment center or another --batch-size"  # lcam train's own spelling
    spoken = err.spoken_as(flag_namer({"augment": "--img-augment"}))
    assert type(spoken) is CheckpointMismatch and str(spoken) == "use --img-augment center or another --batch-size"
    # across a Ray worker boundary the message keeps its fields
    back = ray.cloudpickle.loads(ray.cloudpickle.dumps(err))
    assert str(back.spoken_as(flag_namer({"augment": "--img-augment"}))) == str(spoken)
    plain = UserError("no flags here")
    assert plain.spoken_as(flag_namer({"augment": "--img-augment"})) is plain
