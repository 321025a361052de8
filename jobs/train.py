"""``lcam train``: L-CAM-Fm from a feature cache, or L-CAM-Img from shards on Ray Train."""

from __future__ import annotations

import argparse
import json

from jobs.common import BACKBONE_HELP, PRECISION_HELP, LAYER_HELP, add_storage_options, backbone_spec, parse_storage_options, speaking_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default=None, choices=["fm", "img"],
                        help="fm: from the feature cache (default); img: from the image shards (--resume: the run's)")
    parser.add_argument("--out", default="runs/train", help="run folder URL: checkpoint.pt, epoch-NNN.pt, metrics.jsonl, curves.png (default runs/train)")
    parser.add_argument("--cache", default=None, help="feature cache URL (fm: required; img: pass 1 from it, needs --augment center)")
    parser.add_argument("--shards", default=None, help="img: shard URLs, a pattern (train-{000000..000146}.tar, *.tar) or a folder with index.json")
    parser.add_argument("--index", default=None, help="img: shard index URL (default: index.json beside the shards)")
    parser.add_argument("--backbone", default=None, help="img without --cache: backbone spec (default efficientnet_lite0): " + BACKBONE_HELP)
    parser.add_argument("--layer", default=None, help=LAYER_HELP)
    parser.add_argument("--weights", default=None, help="backbone weights (default: those the cache was made with, else 'default')")
    parser.add_argument("--epochs", type=int, default=None, help="default per backbone (SPEC section 3)")
    parser.add_argument("--lr", type=float, default=None, help="weight learning rate (biases x2); default per backbone and schedule")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size (default 64)")
    # None below: the default for a new run, the checkpoint's value with --resume.
    parser.add_argument("--schedule", default=None, choices=["step", "onecycle"], help="lr schedule (default step)")
    parser.add_argument("--target", default=None, choices=["label", "predicted"], help="ground-truth label (default), or the backbone's top-1 class")
    parser.add_argument("--view", default=None, help="fm: which cached view per sample: random (default), first, or an index")
    parser.add_argument("--augment", default=None, choices=["random", "center"], help="img: random crop 224 + flip (default) or centre crop")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--init", default=None, choices=["auto", "random", "cam"],
                        help="the attention's start: cam (row k = the classifier's weights for class k: an untrained row gives "
                             "CAM's map; pooling + linear heads only), random (the SPEC's draw), or auto (cam where the head allows "
                             "it, else random, e.g. VGG-16). Default: random with --recipe spec, auto with --recipe data-size")
    parser.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                        help="start from this L-CAM checkpoint's attention (e.g. --method img from an L-CAM-Fm run's checkpoint.pt)")
    parser.add_argument("--targets", default=None, choices=["single", "top-k"],
                        help="single: one target per image (SPEC, default); top-k: the top-K predicted classes, each its own CE target "
                             "and map (needs --target predicted)")
    parser.add_argument("--top-k", type=int, default=None, help="K for --targets top-k (default 3)")
    parser.add_argument("--recipe", default=None, choices=["spec", "data-size"],
                        help="defaults for lr/epochs/batch/schedule: spec (SPEC section 3, default) or data-size "
                             "(below 20,000 samples: the small-data recipe, see README)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (a checkpoint is kept; --resume continues)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (its method, cache, shards and recipe)")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0, help="fm: also checkpoint mid-epoch this often (0: at epoch ends only)")
    parser.add_argument("--log-every", type=int, default=20, help="steps per metrics.jsonl record")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="fm: the device to train on")
    parser.add_argument("--where", default="auto", choices=["auto", "local", "ray"],
                        help="fm: local = in this process; ray = as a Ray task that asks for a GPU when the cluster has one (CPU otherwise); "
                             "auto (default) = ray when there is a cluster (RAY_ADDRESS set, as in every `lcam submit` job), else local")
    parser.add_argument("--threads", type=int, default=None, help="fm on CPU: torch threads (default half the cores; the rest decode the cache)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help=PRECISION_HELP.replace("fp16 on a GPU without bf16", "fp32 on a GPU without bf16: no loss scaling") + "; L-CAM-Fm keeps fp32 under auto (only the head runs per step)")
    parser.add_argument("--buffer-rows", type=int, default=2048, help="fm: rows in the loader's shuffle buffer")
    parser.add_argument("--prefetch-chunks", type=int, default=4, help="fm: cache chunks read ahead")
    parser.add_argument("--loader-threads", type=int, default=2, help="fm: cache reading threads")
    parser.add_argument("--workers", type=int, default=1, help="img: Ray Train workers (one GPU each on a GPU cluster)")
    parser.add_argument("--use-gpu", default="auto", choices=["auto", "yes", "no"], help="img: auto = when the cluster has GPUs")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="img: CPUs reserved per training worker")
    parser.add_argument("--data-cpus", type=float, default=1.0, help="img: CPUs per Ray Data read/decode task")
    parser.add_argument("--decode-batch-size", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="img: rows in each worker's shuffle buffer (0: off)")
    parser.add_argument("--ray-storage", default=None, help="img: Ray Train's storage URL (default: OUT/ray-train, with --storage-option; on a cluster it must be shared storage)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_options(parser, what=" for --out")
    add_storage_options(parser, "--cache-storage-option", "cache_storage_option", " for the cache")
    add_storage_options(parser, "--shard-storage-option", "shard_storage_option", " for the shards")


def config_from_args(args: argparse.Namespace):
    from pipeline.training import TrainConfig

    return TrainConfig(
        method=args.method, out=args.out, cache=args.cache, shards=args.shards, index=args.index, backbone=backbone_spec(args.backbone, args.layer),
        weights=args.weights, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
        target=args.target, view=args.view, augment=args.augment, seed=args.seed, init=args.init, init_from=args.init_from,
        targets=args.targets, top_k=args.top_k, recipe_rule=args.recipe, max_steps=args.max_steps, resume=args.resume,
        checkpoint_minutes=args.checkpoint_minutes, log_every=args.log_every, device=args.device, where=args.where, threads=args.threads, precision=args.precision,
        buffer_rows=args.buffer_rows, prefetch_chunks=args.prefetch_chunks, loader_threads=args.loader_threads,
        workers=args.workers, use_gpu={"auto": None, "yes": True, "no": False}[args.use_gpu], cpus_per_worker=args.cpus_per_worker,
        data_cpus=args.data_cpus, decode_batch_size=args.decode_batch_size, shuffle_buffer=args.shuffle_buffer,
        ray_storage=args.ray_storage, storage_options=parse_storage_options(args.storage_option),
        cache_storage_options=parse_storage_options(args.cache_storage_option),
        shard_storage_options=parse_storage_options(args.shard_storage_option), progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.training import train

    with speaking_flags({"recipe_rule": "--recipe"}) as flag:  # the one field this command spells its own way
        summary = train(config_from_args(args))
    print(json.dumps(summary.to_dict(), indent=1) if args.json else "\n".join(summary.lines(flag)))
    return 0


if __name__ == "__main__":  # `lcam submit train` runs `python -m jobs.train --config ...` on the cluster
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("train", sys.argv[1:]))
