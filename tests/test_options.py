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
from pipeline.configs import AuditConfig, CamsConfig, EvalConfig, ExtractConfig, TrainConfig
from pipeline.options import option_of

# job -> (config class, the required argv, the same as config fields)
JOBS = {
    "extract": (ExtractConfig, ["S", "C"], {"shards": "S", "cache": "C"}),
    "cams": (
        CamsConfig,
        ["CKPT", "OUT", "--cache", "C"],
        {"checkpoint": "CKPT", "out": "OUT", "cache": "C"},
    ),  # one source is required
    "train": (TrainConfig, [], {}),
    "eval": (EvalConfig, ["S", "OUT"], {"shards": "S", "out": "OUT"}),
    "audit": (AuditConfig, ["CAMS", "--out", "OUT/"], {"cams": "CAMS", "out": "OUT"}),  # --out's parse drops the slash
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
    default = config(**required)
    for f in dataclasses.fields(config):
        if not option_of(f).derived:  # derived fields: the job's own computation (eval: the registries' flags)
            assert getattr(parsed, f.name) == getattr(default, f.name), (job, f.name)


def test_extract_options_parse_to_fields():
    argv = [
        "S",
        "C",
        "--views",
        "center, hflip",
        "--actors",
        "2",
        "--logits",
        "--no-progress",
        "--batch-size",
        "8",
        "--cache-storage-option",
        "client_kwargs.endpoint_url=http://h:1",
        "--cache-storage-option",
        "anon=true",
        "--precision",
        "bf16",
        "--torch-threads",
        "3",
    ]
    cfg = job_config("extract", command_parser("extract").parse_args(argv))
    assert (
        cfg.views == ("center", "hflip") and cfg.num_actors == 2 and cfg.store_logits is True and cfg.progress is False
    )
    assert cfg.batch_size == 8 and cfg.precision == "bf16" and cfg.torch_threads == 3
    assert cfg.cache_storage_options == {"client_kwargs": {"endpoint_url": "http://h:1"}, "anon": True}
    assert cfg.shard_storage_options is None


def one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("batch_size", "many", "expected a whole number, got 'many'"),
        ("batch_size", 2.5, "expected a whole number, got 2.5"),
        ("batch_size", True, "expected a number, got True"),
        ("batch_size", 0, "must be a positive number of images, got 0"),
        ("actors", -1, "must be at least 1, got -1"),
        ("dtype", "float64", "'float64' is not one of float16, bfloat16, float32"),
        ("precision", "fp8", "'fp8' is not one of auto, fp32, fp16, bf16"),
        ("logits", "yes", "expected true or false, got 'yes'"),
    ],
)
def test_a_wrong_yaml_field_is_one_line_naming_file_and_field(tmp_path, capsys, field, value, words):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"shards": "S", "cache": str(tmp_path / "cache"), field: value}))
    line = one_line(capsys, ["extract", "--config", str(path)])
    assert line == f"lcam extract: error: {path}: field {field!r}: {words}"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--batch-size", "0"], "--batch-size must be a positive number of images, got 0"),
        (["--actors", "0"], "--actors must be at least 1, got 0"),
        (["--torch-threads", "-2"], "--torch-threads must be at least 1, got -2"),
    ],
)
def test_a_flag_out_of_range_is_one_line_before_anything_runs(tmp_path, capsys, argv, words):
    line = one_line(capsys, ["extract", "S", str(tmp_path / "cache"), *argv])
    assert line == f"lcam extract: error: {words}"
    assert not (tmp_path / "cache").exists()


def test_the_eval_keep_ratios_default_is_the_metrics_one():
    """EvalConfig cannot import lcam.metrics (torch) for its default: read the constant from the source."""
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "lcam" / "metrics" / "adic.py"
    assigned = [
        n
        for n in ast.parse(source.read_text()).body
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == "DEFAULT_RATIOS"
    ]
    assert len(assigned) == 1 and EvalConfig("S", "O").ratios == ast.literal_eval(assigned[0].value) == (1.0, 0.5, 0.15)


def test_options_parse_to_fields_in_every_job():
    def parse(job, *argv):
        return job_config(job, command_parser(job).parse_args(list(argv)))

    cams = parse(
        "cams",
        "C",
        "O",
        "--cache",
        "K",
        "--quiet",
        "--actors",
        "2",
        "--opacity",
        "0.25",
        "--out-storage-option",
        "anon=true",
    )
    assert (
        cams.progress is False
        and cams.num_actors == 2
        and cams.opacity == 0.25
        and cams.out_storage_options == {"anon": True}
    )
    assert (
        parse("cams", "C", "O", "--cache", "K", "--no-progress").progress is False
    )  # one vocabulary: --no-progress here too
    train = parse(
        "train", "--recipe", "data-size", "--use-gpu", "no", "--no-progress", "--storage-option", "a.b=1", "--lr", "0.5"
    )
    assert train.recipe_rule == "data-size" and train.use_gpu is False and train.progress is False
    assert (
        train.storage_options == {"a": {"b": 1}}
        and train.lr == 0.5
        and parse("train", "--use-gpu", "yes").use_gpu is True
    )
    assert parse("train", "--torch-threads", "3").threads == 3 == parse("train", "--threads", "3").threads
    ev = parse(
        "eval",
        "S",
        "O",
        "--checkpoint",
        "a=x.pt",
        "--checkpoint",
        "y.pt",
        "--method-limit",
        "gradcam=3",
        "--ratios",
        "1, 0.5",
        "--no-fold-batchnorm",
        "--storage-option",
        "k=v",
    )
    assert ev.checkpoints == ["a=x.pt", "y.pt"] and ev.method_limits == {"gradcam": 3} and ev.ratios == (1.0, 0.5)
    assert ev.fold_batchnorm is False and ev.out_storage_options == {"k": "v"} and ev.progress is True


@pytest.mark.parametrize(
    "job, argv, words",
    [
        ("cams", ["C", "O", "--opacity", "1.5"], "--opacity must be between 0 and 1, got 1.5"),
        ("cams", ["C", "O", "--top-k", "0"], "--top-k must be at least 1, got 0"),
        ("train", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ("train", ["--max-steps", "-1"], "--max-steps must be at least 0, got -1"),
        (
            "eval",
            ["S", "O", "--ratios", "1,half"],
            "--ratios: keep ratios must be comma-separated numbers like 1,0.5,0.15, got '1,half'",
        ),
        (
            "eval",
            ["S", "O", "--method-limit", "scorecam"],
            "--method-limit 'scorecam' must look like METHOD=N, e.g. scorecam=32",
        ),
        ("eval", ["S", "O", "--limit", "0"], "--limit must be at least 1, got 0"),
    ],
)
def test_each_job_refuses_out_of_range_in_one_line(tmp_path, capsys, job, argv, words):
    assert one_line(capsys, [job, *argv]) == f"lcam {job}: error: {words}"


@pytest.mark.parametrize(
    "job, fields, words",
    [
        ("train", {"use_gpu": "maybe"}, "field 'use_gpu': 'maybe' is not one of auto, yes, no"),
        ("train", {"recipe": "fast"}, "field 'recipe': 'fast' is not one of spec, data-size"),
        ("train", {"checkpoint_minutes": -1}, "field 'checkpoint_minutes': must be at least 0, got -1"),
        ("cams", {"checkpoint": "C", "out": "O", "quiet": 1}, "field 'quiet': expected true or false, got 1"),
        (
            "eval",
            {"shards": "S", "out": "O", "batch_size": "16x"},
            "field 'batch_size': expected a whole number, got '16x'",
        ),
        ("audit", {"cams": "C", "out": "O", "band": 0.7}, "field 'band': must be between 0 and 0.5, got 0.7"),
        (
            "audit",
            {"cams": "C"},
            "missing field 'out' (output folder: audit.html, per_class.csv, confusions.csv, per_sample.parquet)",
        ),
    ],
)
def test_a_wrong_yaml_field_in_other_jobs(tmp_path, capsys, job, fields, words):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(fields))
    assert one_line(capsys, [job, "--config", str(path)]) == f"lcam {job}: error: {path}: {words}"


def test_the_pipeline_takes_its_stage_options_from_the_declarations():
    """Each stage option of `lcam pipeline` parses to its declared type, with the pipeline's own
    default where it overrides one and the stage's default elsewhere."""
    from jobs.options import field_value
    from jobs.pipeline import STAGE_OPTIONS

    parser = command_parser("pipeline")
    args = parser.parse_args(["--train-shards", "S", "--workdir", "W"])
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for entries in STAGE_OPTIONS.values():
        for config, field, flag, overrides in entries:
            declared = next(f for f in dataclasses.fields(config) if f.name == field)
            assert actions[flag].option == dataclasses.replace(
                option_of(declared), **{k: v for k, v in overrides.items() if k != "default"}
            )
            default = overrides.get("default", declared.default)
            assert getattr(args, flag[2:].replace("-", "_")) == default, flag
    assert field_value(ExtractConfig, "views", argparse.Namespace(views="center,hflip")) == ("center", "hflip")
    typed = parser.parse_args(
        ["--train-shards", "S", "--workdir", "W", "--extract-batch-size", "8", "--img-max-steps", "3", "--lr", "0.1"]
    )
    assert (typed.extract_batch_size, typed.img_max_steps, typed.lr) == (8, 3, 0.1)


def test_pipeline_stage_options_keep_their_ranges_and_names(tmp_path, capsys):
    from jobs.pipeline import EVAL_FLAGS, train_flags

    wd = tmp_path / "wd"
    line = one_line(capsys, ["pipeline", "--train-shards", "S", "--workdir", str(wd), "--img-workers", "0"])
    assert line == "lcam pipeline: error: --img-workers must be at least 1, got 0"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"train_shards": "S", "workdir": str(wd), "extract_batch_size": -4}))
    line = one_line(capsys, ["pipeline", "--config", str(path)])
    assert (
        line == f"lcam pipeline: error: {path}: field 'extract_batch_size': must be a positive number of images, got -4"
    )
    # lcam submit checks the same before it contacts the cluster (nothing listens on port 9)
    line = one_line(capsys, ["submit", "pipeline", "--address", "http://127.0.0.1:9", "--config", str(path)])
    assert line.endswith(f"{path}: field 'extract_batch_size': must be a positive number of images, got -4")
    assert not wd.exists()
    # the stages' messages name the pipeline's flags
    assert train_flags("img")["max_steps"] == "--img-max-steps" and train_flags("fm")["max_steps"] == "--max-steps"
    assert train_flags("img")["augment"] == "--img-augment" and train_flags("fm")["recipe_rule"] == "--recipe"
    assert EVAL_FLAGS["limit"] == "--eval-limit" and EVAL_FLAGS["save_maps"] == "--gallery-images"
