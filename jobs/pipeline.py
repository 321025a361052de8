"""``lcam pipeline``: shards -> cache -> training -> checkpoints -> CAM store -> evaluation -> report.

Every stage resumes: extraction skips cached shards, training continues from its last
checkpoint, CAM generation skips done shards, so a job stopped half-way and submitted
again picks up where it stopped. Outputs under ``--workdir`` (any fsspec URL):
``cache/``, ``lcam-fm/`` and ``lcam-img/`` (checkpoints, metrics, curves), ``cams/``,
``eval/``, ``audit/`` (``audit.html``: errors explained, evidence per class), ``report.html``.
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.common import LAYER_HELP, add_storage_options, backbone_spec, parse_storage_options, run_stage, speaking_flags
from jobs.options import add_option
from pipeline.configs import AuditConfig, CamsConfig, EvalConfig, ExtractConfig, TrainConfig

OUTPUT, RESUMES = "workdir", "a re-run resumes"  # what Ctrl-C leaves (jobs/cli.py)

STAGES = ("extract", "train", "cams", "eval", "audit", "report")
METHOD_LABELS = {"fm": "L-CAM-Fm", "img": "L-CAM-Img"}

# The stages' options this command takes over, as (config, field, flag, overrides): type, choices,
# range and (unless overridden) help come from the field's declaration (pipeline/configs.py);
# the overrides are where this command means something else (its defaults run a whole study).
STAGE_OPTIONS: dict[str, list[tuple[type, str, str, dict]]] = {
    "extract": [
        (ExtractConfig, "backbone", "--backbone", {}),
        (ExtractConfig, "weights", "--weights", {}),
        (
            ExtractConfig,
            "views",
            "--views",
            {"default": "center,hflip", "help": "cached views per image (center, hflip)"},
        ),
        (ExtractConfig, "batch_size", "--extract-batch-size", {}),
    ],
    "train": [
        (TrainConfig, "epochs", "--epochs", {"help": "default: the backbone's recipe (docs/method.md section 3)"}),
        (TrainConfig, "lr", "--lr", {}),
        (TrainConfig, "batch_size", "--batch-size", {"help": "training batch (default 64)"}),
        (TrainConfig, "target", "--target", {"default": "label"}),
        (TrainConfig, "schedule", "--schedule", {"help": "default: the recipe's (step for --recipe spec)"}),
        (TrainConfig, "init", "--init", {"help": "the attention's start (see lcam train --init)"}),
        (
            TrainConfig,
            "uncovered",
            "--uncovered",
            {
                "help": "rows no training sample trained, in the exported checkpoints (see lcam train "
                "--uncovered; default init). L-CAM-Img with --img-from-fm keeps L-CAM-Fm's exported rows"
            },
        ),
        (
            TrainConfig,
            "row_prior",
            "--row-prior",
            {
                "help": "pull trained rows towards their start in the exported checkpoints (see lcam "
                "train --row-prior; default 1 with --recipe data-size and a CAM start, else 0)"
            },
        ),
        (
            TrainConfig,
            "targets",
            "--targets",
            {"default": "single", "help": "training targets per image (see lcam train)"},
        ),
        (TrainConfig, "top_k", "--top-k", {}),
        (TrainConfig, "recipe_rule", "--recipe", {"help": "training defaults (see lcam train --recipe)"}),
        (TrainConfig, "max_steps", "--max-steps", {"help": "stop training after this many steps (quick runs)"}),
        (TrainConfig, "max_steps", "--img-max-steps", {"help": "L-CAM-Img's own step limit (default: --max-steps)"}),
        (TrainConfig, "workers", "--img-workers", {"help": "Ray Train workers for L-CAM-Img (GPUs on a cluster)"}),
        (
            TrainConfig,
            "augment",
            "--img-augment",
            {
                "default": "random",
                "help": "L-CAM-Img's training images: random 224 crop + flip (default, as in the paper; the backbone runs at every step) "
                "or the centre crop (its pass 1 is then read from the feature cache: faster)",
            },
        ),
        (
            TrainConfig,
            "where",
            "--where",
            {
                "help": "L-CAM-Fm training and the cams stage: in this process (local) or as Ray tasks/actors that ask for "
                "a GPU when the cluster has one (ray); auto (default): ray when there is a cluster (RAY_ADDRESS set)"
            },
        ),
    ],
    "cams": [
        (CamsConfig, "overlays", "--overlays", {"default": 16, "help": "overlay PNGs in the CAM store's gallery"}),
        (
            CamsConfig,
            "classes",
            "--cams-classes",
            {
                "default": "predicted,label",
                "help": "classes in the CAM store (default predicted,label: the audit shows both maps of a mistake)",
            },
        ),
    ],
    "eval": [
        (EvalConfig, "limit", "--eval-limit", {"help": "evaluate a seeded random subset of N images"}),
        (
            EvalConfig,
            "save_maps",
            "--gallery-images",
            {"default": 8, "metavar": None, "help": "images in the report's method-by-method gallery"},
        ),
        (EvalConfig, "seed", "--seed", {"help": "the training runs' seed and the evaluation's image subset"}),
    ],
    "audit": [
        (AuditConfig, "max_thumbnails", "--audit-thumbnails", {"help": "pictures in audit.html (default 300)"}),
    ],
}


def stage_flags(stage: str, method: str | None = None) -> dict[str, str]:
    """How this command spells a stage's fields (config field -> flag), from STAGE_OPTIONS.
    A field with an ``--img-`` flag and a plain one (max_steps) takes the img one for ``method`` img."""
    out: dict[str, str] = {}
    for _, field, flag, _ in STAGE_OPTIONS[stage]:
        if field not in out or (method == "img" and flag.startswith("--img-")):
            out[field] = flag
    return out


# How this command spells the evaluation stage's options (config field -> flag).
EVAL_FLAGS = {**stage_flags("eval"), "methods": "--eval-methods", "checkpoints": "--method"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-shards", required=True, help="training shards: pattern or folder with index.json")
    parser.add_argument("--eval-shards", default=None, help="evaluation shards (default: the training shards)")
    parser.add_argument("--workdir", required=True, help="where every stage writes (local path, s3://, gs://)")
    parser.add_argument("--method", default="fm", choices=["fm", "img", "both"], help="which L-CAM to train")
    parser.add_argument(
        "--img-from-fm", action="store_true", help="with --method both: L-CAM-Img starts from the L-CAM-Fm checkpoint"
    )
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    add_storage_options(parser, what=" for every URL (no credentials: use the environment or the cloud role)")
    groups = {stage: parser.add_argument_group(f"{stage} stage") for stage in STAGE_OPTIONS}
    for stage, entries in STAGE_OPTIONS.items():
        for config, field, flag, overrides in entries:
            add_option(groups[stage], config, field, flag=flag, **overrides)
            if field == "backbone":
                groups[stage].add_argument("--layer", default=None, help=LAYER_HELP)
    add_option(groups["eval"], EvalConfig, "costly_on_cpu")
    groups["eval"].add_argument(
        "--eval-methods",
        default=None,
        help="CAM methods next to L-CAM, comma-separated (default: lcam eval's default list; see lcam eval --help)",
    )
    groups["eval"].add_argument(
        "--method-limit", default=None, help="per-method image limits, e.g. scorecam=16,rise=32"
    )
    from jobs.eval import add_registry_options

    add_registry_options(
        parser, methods_flag=None
    )  # every method's and metric's options, from the registries (--rise-masks, --road, ...)


def _methods(args: argparse.Namespace) -> list[str]:
    return ["fm", "img"] if args.method == "both" else [args.method]


def _eval_methods(text: str | None) -> tuple[str, ...]:
    """--eval-methods checked against the CAM-method registry before any stage runs."""
    from lcam.cam_methods.base import default_methods, method_names
    from pipeline.errors import UserError

    if text is None:
        return default_methods()
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in method_names()]
    if unknown:
        raise UserError(f"--eval-methods: unknown method(s) {', '.join(unknown)}; methods: {', '.join(method_names())}")
    return names


def _limits(text: str | None) -> dict[str, int]:
    from pipeline.errors import UserError

    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if part.strip():
            name, _, value = part.partition("=")
            if not value.strip().isdigit():
                raise UserError(f"method-limit {part!r} must look like name=N (e.g. scorecam=16)")
            out[name.strip()] = int(value)
    return out


def train_flags(method: str) -> dict[str, str]:
    """How this command spells the training stage's options (config field -> flag), so that its
    messages name what the user typed. Fields the pipeline sets itself get a description."""
    return {
        **stage_flags("train", method),
        "out": "--workdir",
        "shards": "--train-shards",
        "cache": "the feature cache in --workdir",
        "init_from": "--img-from-fm",
        "resume": f"the same pipeline with a higher {stage_flags('train', method)['max_steps']}",  # it resumes every run it finds in --workdir
    }


def _views(args: argparse.Namespace) -> list[str]:
    return [v.strip() for v in args.views.split(",") if v.strip()]


def _refuse_up_front(
    args: argparse.Namespace, stages: list[str], eval_methods: tuple[str, ...], train_configs: dict
) -> None:
    """Options that cannot work together, refused before the first stage: one line, nothing
    written, rather than a failure after extraction and training have spent their time.
    ``eval_methods``: --eval-methods, already checked against the registry."""
    from pipeline.errors import UserError
    from pipeline.train.setup import check_config

    if "cams" in stages and "center" not in _views(args):
        raise UserError(
            f"--views {args.views} leaves out center, the view the cams stage explains; add it (e.g. --views center,hflip)"
        )
    if "eval" in stages:
        stray = sorted(set(_limits(args.method_limit)) - set(eval_methods) - {f"lcam-{m}" for m in _methods(args)})
        if stray:
            raise UserError(
                f"--method-limit names {', '.join(stray)}, which this run does not evaluate "
                f"(--eval-methods {','.join(eval_methods)}, --method {args.method}); drop it or add the method"
            )
    if "train" in stages:
        for m, cfg in train_configs.items():
            with speaking_flags(train_flags(m)):
                check_config(cfg)


def _img_pass1_cache(args: argparse.Namespace, cache: str) -> str | None:
    """The cache L-CAM-Img's pass 1 reads, or None to run the backbone at every step.

    The cache holds the backbone on the clean centre crop, so it can stand in for pass 1
    only when that is the training image (--img-augment center) and the centre view was
    cached. The default keeps the paper's random crops (SPEC 3): L-CAM-Img then streams
    the images through the backbone, and the cache serves L-CAM-Fm, the CAMs and nothing else.
    """
    return cache if args.img_augment == "center" and "center" in _views(args) else None


def _train_config(args: argparse.Namespace, method: str, cache: str, out: str, so: dict | None, fm_run: str | None):
    """The training stage's config; ``fm_run``: this pipeline's L-CAM-Fm run, which warm-starts
    L-CAM-Img when ``--img-from-fm`` (the attention then starts from its checkpoint, not ``--init``)."""
    from pipeline.configs import TrainConfig
    from pipeline.fs import join
    from pipeline.train.run_folder import CHECKPOINT

    warm = method == "img" and bool(args.img_from_fm) and fm_run is not None

    return TrainConfig(
        method=method,
        out=out,
        cache=_img_pass1_cache(args, cache) if method == "img" else cache,
        shards=args.train_shards if method == "img" else None,
        backbone=args.backbone if method == "img" else None,
        weights=args.weights,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        target=args.target,
        schedule=args.schedule,
        max_steps=(args.img_max_steps or args.max_steps) if method == "img" else args.max_steps,
        seed=args.seed,
        workers=args.img_workers,
        augment=args.img_augment if method == "img" else None,
        init=None if warm else args.init,
        init_from=join(fm_run, CHECKPOINT) if warm else None,
        # a warm-started L-CAM-Img inherits L-CAM-Fm's exported rows (transferred or not): init restores them
        uncovered="init" if warm and args.uncovered == "transfer" else args.uncovered,
        row_prior=args.row_prior,
        targets=args.targets,
        top_k=args.top_k,
        recipe_rule=args.recipe,
        where=args.where,
        storage_options=so,
        cache_storage_options=so,
        shard_storage_options=so,
    )


def run(args: argparse.Namespace) -> int:
    from jobs.eval import registry_config
    from pipeline.cams.run import generate_cams
    from pipeline.configs import CamsConfig, EvalConfig, ExtractConfig
    from pipeline.errors import UserError
    from pipeline.evaluation.run import evaluate
    from pipeline.extract.run import extract
    from pipeline.fs import absolute, exists, join
    from pipeline.report.page import write_report
    from pipeline.train.run import train
    from pipeline.train.run_folder import CHECKPOINT, RunFolder

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    eval_methods = _eval_methods(args.eval_methods)  # before any stage: a typo must not cost an extraction
    so = parse_storage_options(args.storage_option)
    wd = absolute(args.workdir.rstrip("/"))
    cache, eval_dir = join(wd, "cache"), join(wd, "eval")
    runs = {m: join(wd, f"lcam-{m}") for m in _methods(args)}
    args.backbone = backbone_spec(args.backbone, args.layer)
    args.train_shards = absolute(args.train_shards)
    args.eval_shards = args.eval_shards and absolute(args.eval_shards)
    _refuse_up_front(
        args,
        stages,
        eval_methods,
        {m: _train_config(args, m, cache, out, so, runs.get("fm")) for m, out in runs.items()},
    )
    t0 = time.perf_counter()

    def stage(name: str) -> None:
        print(f"\n=== {name} ({time.perf_counter() - t0:.0f}s) ===", flush=True)

    if "extract" in stages:
        stage("extract: shards -> feature cache")
        summary = extract(
            ExtractConfig(
                shards=args.train_shards,
                cache=cache,
                backbone=args.backbone,
                weights=args.weights,
                views=tuple(_views(args)),
                batch_size=args.extract_batch_size,
                shard_storage_options=so,
                cache_storage_options=so,
            )
        )
        print("\n".join(summary.lines()), flush=True)
        if summary.failed_shards:
            raise UserError(
                f"{len(summary.failed_shards)} shard(s) could not be read (listed above); fix or remove them and run again"
            )

    if "train" in stages:
        for m, out in runs.items():
            stage(f"train {METHOD_LABELS[m]}")
            with speaking_flags(train_flags(m)) as flag:
                cfg = _train_config(args, m, cache, out, so, runs.get("fm"))
                cfg.resume = exists(join(out, CHECKPOINT), so)  # every stage resumes what it finds
                result = train(cfg)
                print("\n".join(result.lines(flag)), flush=True)

    first = runs[_methods(args)[0]]
    if "cams" in stages:
        stage("cams: CAM store from the cache")
        summary = generate_cams(
            CamsConfig(
                checkpoint=RunFolder(first, so).chosen(),
                out=join(wd, "cams"),
                cache=cache,
                overlays=args.overlays,
                classes=args.cams_classes,
                where=args.where,
                checkpoint_storage_options=so,
                source_storage_options=so,
                out_storage_options=so,
            )
        )
        print("\n".join(summary.lines()), flush=True)

    if "eval" in stages:
        stage("eval: AD/IC against the baselines")
        summary = run_stage(
            EVAL_FLAGS,
            evaluate,
            EvalConfig(
                shards=args.eval_shards or args.train_shards,
                out=eval_dir,
                checkpoints=[
                    f"lcam-{m}={RunFolder(out, so).chosen()}" for m, out in runs.items()
                ],  # best.pt (validation loss)
                methods=eval_methods,
                limit=args.eval_limit,
                method_limits=_limits(args.method_limit),
                **registry_config(args),
                costly_on_cpu=args.costly_on_cpu,
                seed=args.seed,
                save_maps=args.gallery_images,
                shard_storage_options=so,
                out_storage_options=so,
                checkpoint_storage_options=so,
            ),
        )
        print("\n".join(summary.lines()), flush=True)

    audit_dir = join(wd, "audit")
    if "audit" in stages:
        from pipeline.audit.run import MAPS_FILE, run_audit

        stage("audit: errors explained, evidence per class")
        compare = eval_dir if "gradcam" in eval_methods and exists(join(eval_dir, MAPS_FILE), so) else None
        summary = run_audit(
            AuditConfig(
                cams=join(wd, "cams"),
                out=audit_dir,
                compare=compare,
                max_thumbnails=args.audit_thumbnails,
                storage_options=so,
                out_storage_options=so,
            )
        )
        print("\n".join(summary.lines()), flush=True)

    if "report" in stages:
        stage("report")
        notes = []
        if args.eval_shards in (None, args.train_shards):
            notes.append(
                "Training and evaluation used the same images (no held-out set): the L-CAM numbers measure fit, not generalisation."
            )
        url = write_report(
            join(wd, "report.html"),
            title="L-CAM report",
            subtitle=f"{args.backbone} on {args.train_shards}",
            eval_dir=eval_dir,
            train_runs={METHOD_LABELS[m]: out for m, out in runs.items()},
            cams_gallery="cams/gallery/index.html" if args.overlays else None,
            notes=notes,
            storage_options=so,
            audit_page="audit/audit.html" if exists(join(audit_dir, "audit.html"), so) else None,
        )
        print(f"report: {url}", flush=True)
    print(f"\npipeline done in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("pipeline", sys.argv[1:]))
