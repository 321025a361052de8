"""The first hour of a new user (issue 29), the parts that need no Ray: the Python API on a
model object, the factory contract, the refusals that answer at once, and one vocabulary
across every command's parser. (The commands run end to end by hand in
tests/test_defaults.py::test_new_user_path_by_hand.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import lcam
from jobs.cli import COMMANDS, command_parser
from lcam.backbones.registry import build_backbone
from pipeline.options import PRECISIONS

ROOT = Path(__file__).resolve().parents[1]


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n)]


def test_three_lines_explain_a_torchvision_model_object(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)  # random weights: nothing downloaded
    images = noise_images(4)
    images[0].save(tmp_path / "first.png")
    # the three lines: fit from PIL images, explain a path and a PIL image, read maps and names
    explain = lcam.Explainer.fit(model, images, max_steps=3)
    e = explain([tmp_path / "first.png", images[1]], top_k=2)
    maps, names = e.maps, e.class_names
    assert maps.shape == (2, 2, 7, 7) and len(names) == 2 and all(n.startswith("class ") for row in names for n in row)
    # the classes explained are the classifier's own top-2 on the same preprocessed input
    x = torch.stack(
        [explain.preprocess(Image.open(tmp_path / "first.png").convert("RGB")), explain.preprocess(images[1])]
    )
    with torch.no_grad():
        top2 = model(explain.model.backbone.normalize(x)).topk(2, dim=1).indices
    assert torch.equal(e.class_ids.cpu(), top2)
    assert explain.checkpoint["config"]["steps"] == 3  # max_steps stops the small-data recipe early
    # labels from a DataLoader train exactly their rows (coverage), a tensor batch explains the same as the images
    loader = torch.utils.data.DataLoader(list(zip(x, torch.tensor([4, 7]))), batch_size=2)
    fitted = lcam.Explainer.fit(model, loader, epochs=1)
    assert fitted.checkpoint["coverage"].nonzero().flatten().tolist() == [4, 7]
    assert torch.equal(fitted(x).class_ids, fitted([tmp_path / "first.png", images[1]]).class_ids)


def test_a_model_object_goes_where_a_backbone_does():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    backbone = build_backbone(model)
    assert backbone.feature_shape == (512, 7, 7) and backbone.num_classes == 10
    assert lcam.LCAM(model).attention.num_classes == 10


def test_the_factory_contract():
    from tests import custom_backbones

    custom_backbones.SEEN_KWARGS.clear()
    assert build_backbone("tests.custom_backbones:tiny_kwargs", "random").num_classes == 10
    assert build_backbone("tests.custom_backbones:tiny_keyword_only").num_classes == 10
    assert build_backbone("tests.custom_backbones:tiny").num_classes == 10  # factory()
    assert build_backbone("tests.custom_backbones:tiny_with_weights", "random").num_classes == 10  # factory(weights)
    assert custom_backbones.SEEN_KWARGS == [{"weights": "random"}, {"weights": "default"}]


REFUSALS_SCRIPT = r"""
import contextlib, io, json, sys, time
from jobs.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's own refusals
            rc = exc.code
    out.append({"argv": argv, "rc": rc, "lines": err.getvalue().strip().splitlines(), "seconds": time.perf_counter() - t0})
print(json.dumps({"runs": out, "heavy": sorted(m for m in ("torch", "ray") if m in sys.modules)}))
"""


def test_every_refusal_is_one_line_before_torch_or_ray(tmp_path):
    """Issue 29's refusals: one line, exit 2, and neither torch nor Ray imported (so each answers
    in well under a second: the seconds are printed on failure, not asserted: the machine's load varies)."""
    from pipeline.train.checkpoints import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(
        str(run / "checkpoint.pt"),
        attention_state={"conv.weight": torch.zeros(1000, 4, 1, 1)},
        method="fm",
        backbone={"backbone": "b", "num_classes": 1000, "feature_shape": [4, 2, 2]},
    )
    images = tmp_path / "photos" / "cats"
    images.mkdir(parents=True)
    noise_images(1)[0].save(images / "a.jpg")
    (tmp_path / "empty").mkdir()
    cases = {
        ("cams", str(run), "out", "--cache", "c", "--classes", "top"): "unknown class selection 'top'",
        (
            "cams",
            str(run),
            "out",
            "--cache",
            "c",
            "--class-ids",
            "5000",
        ): "class id 5000 is out of range: the classifier has 1000 classes",
        ("cams", str(tmp_path / "empty"), "out", "--cache", "c"): "is a folder without checkpoint.pt",
        ("cams", str(run), "out"): "give exactly one source",
        (
            "extract",
            str(tmp_path / "photos"),
            "cache",
        ): "is a folder of images: pack it into shards first, `lcam shards",
        ("train", "--precision", "fp16", "--cache", "c"): "--precision fp16 is not offered for training",
        ("eval", "s", "o", "--where", "cloud"): "invalid choice: 'cloud'",
        ("audit", "cams"): "give the output folder: lcam audit CAMS OUT",
        ("audit", "cams", "out", "--band", "0.7"): "--band must be between 0 and 0.5",
        ("extract", "s", "c", "--views", "side"): "unknown view 'side'",
    }
    proc = subprocess.run(
        [sys.executable, "-c", REFUSALS_SCRIPT, json.dumps([list(k) for k in cases])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for run_, words in zip(found["runs"], cases.values()):
        last = run_["lines"][-1] if run_["lines"] else ""
        assert run_["rc"] == 2 and words in last and "Traceback" not in "".join(run_["lines"]), run_
        assert len(run_["lines"]) == 1 or "usage:" in run_["lines"][0], run_  # argparse's own refusal: usage + one line
    assert found["heavy"] == [], (
        f"a refusal imported {found['heavy']}; seconds: {[round(r['seconds'], 2) for r in found['runs']]}"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing created


def options_of(name: str) -> dict[str, object]:
    parser = command_parser(name)
    actions = list(parser._actions)
    for a in parser._actions:  # lcam cache info|verify|repair, lcam jobs ...: the sub-parsers' options too
        if hasattr(a, "choices") and isinstance(a.choices, dict):
            for sub in a.choices.values():
                actions += list(sub._actions)
    return {s: a for a in actions for s in a.option_strings}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_one_word_per_idea_in_every_command(name):
    """The same idea has the same word and the same choices in every command (README: Commands)."""
    opts = options_of(name)
    assert "--engine" not in opts or opts["--engine"] is opts.get("--where")  # the old word, an alias only
    if "--where" in opts:
        assert tuple(opts["--where"].choices) == ("auto", "local", "ray")
    if "--precision" in opts:
        assert tuple(opts["--precision"].choices) == PRECISIONS
    if (
        "--quiet" in opts and name != "audit"
    ):  # audit's --quiet prints nothing; elsewhere the old word for --no-progress
        assert opts["--quiet"] is opts["--no-progress"]
    if "--threads" in opts:
        assert opts["--threads"] is opts["--torch-threads"]
    long_work = {"extract", "train", "cams", "eval", "audit"}
    if name in long_work:
        assert "--no-progress" in opts and "--verbose" not in () and "--where" in opts or name in ("extract", "audit")
    if name in ("train", "audit"):  # the output: OUT as in every command, --out its other spelling
        positional = [a.dest for a in command_parser(name)._actions if not a.option_strings]
        assert "out" in positional and "--out" in opts


def test_ctrl_c_says_what_it_left(tmp_path):
    """Interrupted before any output: no promise of a resume; with output: the job's own resume rule."""
    import argparse
    import importlib

    from jobs.cli import interrupted_message

    extract, audit = importlib.import_module("jobs.extract"), importlib.import_module("jobs.audit")
    missing = argparse.Namespace(cache=str(tmp_path / "cache"), out=str(tmp_path / "out"))
    assert interrupted_message(extract, missing) == "interrupted before any output was written"
    (tmp_path / "cache").mkdir()
    (tmp_path / "out").mkdir()
    assert (
        interrupted_message(extract, missing)
        == f"interrupted; the finished part of {tmp_path / 'cache'} is kept and a re-run resumes"
    )
    assert (
        interrupted_message(audit, missing) == f"interrupted; the finished part of {tmp_path / 'out'} is kept"
    )  # audit does not resume
    assert interrupted_message(extract, None) == "interrupted before any output was written"  # Ctrl-C while parsing


def test_submit_ships_the_working_directory_and_runs_every_stage(tmp_path):
    """The user's directory is the job's working directory (their module.path:factory travels);
    this project's packages go beside it; every stage, audit and report included, can be submitted."""
    from jobs.submit import JOB_NAMES, PROJECT_ROOT, shipped_files

    env = shipped_files(str(tmp_path))
    assert env["working_dir"] == str(tmp_path)
    assert sorted(Path(p).name for p in env["py_modules"]) == ["jobs", "lcam", "pipeline"]
    assert all(Path(p).parent == Path(PROJECT_ROOT) for p in env["py_modules"])
    assert "py_modules" not in shipped_files(PROJECT_ROOT)  # from the checkout itself: the working directory holds them
    assert {"shards", "extract", "cache", "train", "cams", "eval", "audit", "report", "pipeline"} <= set(JOB_NAMES)
    args = command_parser("submit").parse_args(["audit", "--config", "audit.yaml"])
    assert args.job == "audit"


def test_costly_methods_of_the_default_list_are_left_out_on_a_cpu():
    from lcam.cam_methods.base import default_methods, method_class
    from pipeline.configs import EvalConfig
    from pipeline.evaluation.config import methods_for_machine

    default = EvalConfig("S", "O")
    kept, left = methods_for_machine(default, on_cpu=True)
    assert (
        set(left)
        == {m for m in default_methods() if method_class(m).cost in ("channels", "masks")}
        == {"scorecam", "rise"}
    )
    assert kept == tuple(m for m in default_methods() if m not in left)
    assert methods_for_machine(default, on_cpu=False) == (default_methods(), ())  # a GPU runs them all
    assert methods_for_machine(EvalConfig("S", "O", costly_on_cpu=True), on_cpu=True) == (default_methods(), ())
    asked = EvalConfig("S", "O", methods=("gradcam", "scorecam"))
    assert methods_for_machine(asked, on_cpu=True) == (
        ("gradcam", "scorecam"),
        (),
    )  # a list the user gave runs as given
