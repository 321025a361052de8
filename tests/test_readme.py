"""The README cannot drift: every ``lcam ...`` command line it shows parses with the real parser.

Command lines are taken from code spans and from the lines of ``sh`` code blocks that start
with ``lcam``. They are parsed (never run) with :func:`jobs.cli.command_parser`, the
parser ``lcam`` itself uses. Upper-case words (``SHARDS``, ``URL``) are placeholders and
stand for themselves as values; a bare ``lcam CMD`` names a command (it must exist); ``a|b`` (``\\|`` inside a table) stands for one command
line per alternative; ``...`` stands for "more of the same" and is dropped; ``--config
FILE key=value`` is split off the way the CLI splits it (the file itself is not read).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import shlex
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, command_parser
from jobs.config import split_config_args

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = sorted(
    (README.parent / "docs").glob("*.md")
)  # the README's details live there: their command lines are checked too
# a placeholder that must be one of a positional's choices: the value it stands for here
CHOICE_PLACEHOLDERS = {"JOB": "pipeline"}


def readme_command_lines(text: str) -> list[str]:
    lines: list[str] = []
    in_block = False
    shell = False
    for raw in text.splitlines():
        if raw.startswith("```"):
            in_block = not in_block
            shell = in_block and raw[3:].strip() in (
                "",
                "sh",
                "bash",
                "shell",
                "console",
            )  # not ```text: printed output
            continue
        if in_block:
            if not shell:
                continue
            line = raw.split(" #", 1)[0].strip()
            if line.startswith("lcam "):
                lines.append(line)
            continue
        for span in re.findall(r"`([^`]+)`", raw.replace("\\|", "|")):
            if span.startswith("lcam ") or span == "lcam":
                lines.append(span)
    return lines


def expand_alternatives(line: str) -> list[list[str]]:
    """``lcam cache info|verify URL`` -> two token lists; ``...`` dropped."""
    tokens = [t for t in shlex.split(line) if t != "..."]
    choices = [t.split("|") if "|" in t and not t.startswith("-") else [t] for t in tokens]
    return [list(combo) for combo in itertools.product(*choices)]


def parse_command_line(tokens: list[str]) -> None:
    """Raise AssertionError naming the problem unless ``tokens`` parse as an ``lcam`` command."""
    assert tokens[0] == "lcam"
    if len(tokens) == 1 or tokens[1] in ("--help", "-h", "--version"):
        return
    name, argv = tokens[1], [CHOICE_PLACEHOLDERS.get(t, t) for t in tokens[2:]]
    assert name in COMMANDS, f"unknown command {name!r}"
    if not argv:  # the prose names a command ("`lcam eval` follows SPEC section 5"): no line to parse
        return
    parser = command_parser(name)
    if name not in ("submit", "jobs"):  # their --config is the job's, parsed as a plain option
        _, _, argv = split_config_args(argv)
        if len(argv) < len(tokens[2:]):  # --config given: the positionals come from the file
            return
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code == 0 and ("-h" in argv or "--help" in argv):
                return  # `lcam eval --help`: help printed, a valid line
            raise AssertionError(err.getvalue().strip().splitlines()[-1]) from exc


def test_readme_shows_command_lines():
    lines = readme_command_lines(README.read_text())
    shown = {shlex.split(line)[1] for line in lines if len(shlex.split(line)) > 1}
    # the commands table shows every command (a guard against the extraction silently finding nothing)
    assert {"shards", "extract", "cache", "train", "cams", "eval", "pipeline", "submit", "demo"} <= shown


@pytest.mark.parametrize("line", readme_command_lines("\n".join(p.read_text() for p in [README, *DOCS])))
def test_readme_command_line_parses(line):
    for tokens in expand_alternatives(line):
        try:
            parse_command_line(tokens)
        except AssertionError as exc:
            pytest.fail(f"README: `{' '.join(tokens)}` does not parse: {exc}")


def test_a_wrong_command_line_is_caught():
    """The check can fail: an option that does not exist, or a missing positional."""
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-option"):
        parse_command_line(["lcam", "eval", "SHARDS", "OUT", "--no-such-option"])
    with pytest.raises(AssertionError, match="required"):
        parse_command_line(["lcam", "eval", "--shards", "SHARDS"])
    assert expand_alternatives("lcam cache info|verify URL ...") == [
        ["lcam", "cache", "info", "URL"],
        ["lcam", "cache", "verify", "URL"],
    ]


def python_blocks(text: str, section: str) -> list[str]:
    """The ```python blocks of one ``## section`` of the README."""
    part = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", part, flags=re.S)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """The README's Python examples run as written, on generated photos in their folder layout,
    with the classifier at random weights (nothing downloaded) and a run folder made by
    save_checkpoint. (The other Python blocks name an s3 bucket or a user's package.)"""
    import numpy as np
    import torch
    from PIL import Image

    from lcam import build_backbone
    from pipeline.train.checkpoints import save_checkpoint

    rng = np.random.default_rng(0)
    for folder, name in (("class0", "chelsea"), ("class1", "coffee"), ("class1", "rocket")):
        (tmp_path / "photos" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(
            tmp_path / "photos" / folder / f"{name}.jpg"
        )
    backbone = build_backbone("efficientnet_lite0")
    torch.manual_seed(0)
    from lcam import LCAM

    save_checkpoint(
        str(tmp_path / "runs" / "fm" / "checkpoint.pt"),
        attention_state=LCAM(backbone).attention.state_dict(),
        method="fm",
        backbone=backbone.describe(),
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import pipeline.cams.fit
    from lcam.recipe import Recipe

    # the small-data recipe's 80 epochs, shortened to 2: the blocks' calls are what is tested here
    monkeypatch.setattr(
        pipeline.cams.fit,
        "recipe_for_data",
        lambda backbone, method, samples: Recipe(lr=3.0, epochs=2, batch_size=16, schedule="onecycle"),
    )
    text = README.read_text()
    blocks = python_blocks(text, "Explain a model from Python") + python_blocks(text, "The method in code")[:1]
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        code = block.replace('weights="DEFAULT"', "weights=None")  # random weights: no download in a test
        exec(compile(code, "README.md", "exec"), namespace)
    e = namespace["explain"]("photos/class0/chelsea.jpg")
    assert e.maps.shape == (1, 1, 7, 7) and isinstance(e.class_names[0][0], str)
