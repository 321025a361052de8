"""``lcam shards SRC OUT``: pack an image folder into WebDataset shards with an index."""

from __future__ import annotations

import argparse

from pipeline.shards.pack import LAYOUTS, pack_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="local image folder (class sub-folders, or flat + labels file)")
    parser.add_argument(
        "out", help="output folder or URL (e.g. s3://bucket/shards) for shards, index.json, pack_report.json"
    )
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="auto", help="source layout (default: decided from what is there)"
    )
    parser.add_argument(
        "--labels",
        metavar="FILE",
        help="labels file: TSV/CSV 'file, class' rows, or one class index per line for ImageNet val",
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=1000, metavar="N", help="samples per shard (default 1000)"
    )
    parser.add_argument(
        "--max-shard-bytes", type=int, default=1 << 30, metavar="N", help="bytes per shard at most (default 1 GiB)"
    )
    parser.add_argument(
        "--prefix", default="shard", metavar="P", help="shard name prefix: P-000000.tar (default 'shard')"
    )
    parser.add_argument("--overwrite", action="store_true", help="allow an output folder that already holds shards")
    parser.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        metavar="S",
        help="pack in a seeded random order instead of file order",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=1000,
        metavar="K",
        help="the classifier's classes: a labels file class outside 0..K-1 is refused (default 1000)",
    )
    parser.add_argument(
        "--skip-bad-labels",
        action="store_true",
        help="leave out images whose labels file class is outside 0..K-1 (listed in the report) instead of refusing",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    report = pack_folder(
        args.src,
        args.out,
        layout=args.layout,
        labels_file=args.labels,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        prefix=args.prefix,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        shuffle_seed=args.shuffle_seed,
        num_classes=args.num_classes,
        skip_bad_labels=args.skip_bad_labels,
    )
    print(report.summary())
    return 0 if report.packed > 0 else 1


if __name__ == "__main__":  # `lcam submit shards` runs `python -m jobs.shards --config ...` on the cluster
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("shards", sys.argv[1:]))
