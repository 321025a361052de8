"""The ``lcam`` command itself: ``--version``, and ``--help`` of every command without torch or Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, main
from jobs.submit import JOB_NAMES

ROOT = Path(__file__).resolve().parents[1]

# One subprocess asks every command for --help, then says which heavy modules got imported.
HELP_PROBE = """
import contextlib, io, json, sys
from jobs.cli import COMMANDS, main
texts = {}
for name in COMMANDS:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([name, "--help"])
        except SystemExit:
            pass
    texts[name] = out.getvalue()
print(json.dumps({"texts": texts, "loaded": sorted(m for m in ("torch", "ray", "zarr", "torchvision") if m in sys.modules)}))
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_help_of_every_command_imports_neither_torch_nor_ray():
    proc = run_python(HELP_PROBE)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []  # torch alone takes seconds to import: --help must not wait for it
    for name, text in report["texts"].items():
        assert text.startswith(f"usage: lcam {name}"), (name, text[:200])
    assert "--checkpoint" in report["texts"]["eval"] and "--methods" in report["texts"]["eval"]


def test_the_probe_would_see_torch():
    """The check can fail: a module importing torch at import time shows up in the probe."""
    proc = run_python("import sys, jobs.cli, lcam.backbones.registry; print('torch' in sys.modules)")
    assert proc.stdout.strip() == "True"


def test_version(capsys):
    from importlib import metadata

    assert main(["--version"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"lcam {metadata.version('lcam')}"
    proc = run_python("import sys; from jobs.cli import main; main(['--version']); print('torch' in sys.modules)")
    assert proc.stdout.split() == ["lcam", metadata.version("lcam"), "False"]


def test_commands_are_listed_in_the_top_level_help(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--version" in text and all(name in text for name in COMMANDS)


@pytest.mark.parametrize("job", JOB_NAMES)
def test_job_modules_run_as_scripts(job):
    """`lcam submit JOB` runs `python -m jobs.JOB --config ...` on the cluster: every submittable module must be a script."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", f"jobs.{job}", "--help"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: lcam {job}")


def test_eval_flags_come_from_the_registries():
    from jobs.cli import command_parser
    from jobs.eval import config_from_args

    args = command_parser("eval").parse_args(
        [
            "SHARDS",
            "OUT",
            "--methods",
            "xgradcam,rise",
            "--rise-masks",
            "8",
            "--road",
            "--road-percentiles",
            "50,90",
            "--insdel-steps",
            "4",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.methods == ("xgradcam", "rise") and cfg.metrics == ("road",)
    assert cfg.method_options["rise"] == {"num_masks": 8, "grid": 7, "p": 0.5, "mask_batch": 32, "seed": 0}
    assert (
        cfg.metric_options["road"] == {"percentiles": (50, 90), "seed": 0}
        and cfg.metric_options["insdel"]["steps"] == 4
    )
    none = config_from_args(command_parser("eval").parse_args(["S", "O", "--methods", "none"]))
    assert none.methods == () and none.metrics == ()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_default(name):
    """`lcam NAME --help` states the default of every option that has one (README promise: defaults in --help)."""
    import argparse

    from jobs.cli import command_parser

    def check(parser: argparse.ArgumentParser) -> int:
        text, seen = parser.format_help(), 0
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                seen += sum(check(p) for p in action.choices.values())
            elif action.option_strings and action.default not in (None, False, argparse.SUPPRESS, []):
                assert action.help and "default" in action.help, (name, action.option_strings)
                assert f"default: {action.default}" in " ".join(text.split()) or "default" in action.help.replace(
                    "%(default)s", ""
                ), action.option_strings
                seen += 1
        return seen

    check(command_parser(name))
