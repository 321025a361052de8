"""Options written once: each job's flags come from its config dataclass's declarations.

For every job: each config field has a CLI option or is declared derived (with a reason),
the parsed defaults build the dataclass's own defaults, and a YAML config with a wrong
type, choice or range is refused in one line naming the file and the field. Cheap: parsers
only, no Ray, no torch.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from jobs.cli import command_parser, main
from jobs.options import option_dest
from pipeline.configs import ExtractConfig
from pipeline.options import option_of

# job -> (config class, its module's config_from_args, required argv, the same as config fields)
JOBS = {
    "extract": (ExtractConfig, ["S", "C"], {"shards": "S", "cache": "C"}),
}


def job_config(job: str, args: argparse.Namespace):
    import importlib

    return importlib.import_module(f"jobs.{job}").config_from_args(args)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_field_has_an_option_or_says_why_not(job):
    config, _, _ = JOBS[job]
    dests = {a.dest for a in command_parser(job)._actions}
    for f in dataclasses.fields(config):
        o = option_of(f)
        if o.derived:
            assert len(o.derived) > 10, (job, f.name)  # a reason, not a marker
        else:
            assert option_dest(f.name, o) in dests, (job, f.name)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_parsed_defaults_are_the_dataclass_defaults(job):
    config, argv, required = JOBS[job]
    parsed = job_config(job, command_parser(job).parse_args(argv))
    assert parsed == config(**required)


def test_extract_options_parse_to_fields():
    argv = ["S", "C", "--views", "center, hflip", "--actors", "2", "--logits", "--no-progress", "--batch-size", "8",
            "--cache-storage-option", "client_kwargs.endpoint_url=http://h:1", "--cache-storage-option", "anon=true",
            "--precision", "bf16", "--torch-threads", "3"]
    cfg = job_config("extract", command_parser("extract").parse_args(argv))
    assert cfg.views == ("center", "hflip") and cfg.num_actors == 2 and cfg.store_logits is True and cfg.progress is False
    assert cfg.batch_size == 8 and cfg.precision == "bf16" and cfg.torch_threads == 3
    assert cfg.cache_storage_options == {"client_kwargs": {"endpoint_url": "http://h:1"}, "anon": True}
    assert cfg.shard_storage_options is None


def one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("field, value, words", [
    ("batch_size", "many", "expected a whole number, got 'many'"),
    ("batch_size", 2.5, "expected a whole number, got 2.5"),
    ("batch_size", True, "expected a number, got True"),
    ("batch_size", 0, "must be a positive number of images, got 0"),
    ("actors", -1, "must be at least 1, got -1"),
    ("dtype", "float64", "'float64' is not one of float16, bfloat16, float32"),
    ("precision", "fp8", "'fp8' is not one of auto, fp32, fp16, bf16"),
    ("logits", "yes", "expected true or false, got 'yes'"),
])
def test_a_wrong_yaml_field_is_one_line_naming_file_and_field(tmp_path, capsys, field, value, words):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"shards": "S", "cache": str(tmp_path / "cache"), field: value}))
    line = one_line(capsys, ["extract", "--config", str(path)])
    assert line == f"lcam extract: error: {path}: field {field!r}: {words}"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv, words", [
    (["--batch-size", "0"], "--batch-size must be a positive number of images, got 0"),
    (["--actors", "0"], "--actors must be at least 1, got 0"),
    (["--torch-threads", "-2"], "--torch-threads must be at least 1, got -2"),
])
def test_a_flag_out_of_range_is_one_line_before_anything_runs(tmp_path, capsys, argv, words):
    line = one_line(capsys, ["extract", "S", str(tmp_path / "cache"), *argv])
    assert line == f"lcam extract: error: {words}"
    assert not (tmp_path / "cache").exists()
