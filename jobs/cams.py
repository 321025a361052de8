"""``lcam cams CHECKPOINT OUT --cache URL | --shards PATTERN`` and ``lcam cams info URL``.

Bulk CAMs from a trained L-CAM into a Zarr CAM store; ``--overlays N`` adds overlay
PNGs and an HTML gallery under ``OUT/gallery``.
"""

from __future__ import annotations

import argparse
import json

from jobs.common import announce
from jobs.options import add_options, parse_storage_options
from jobs.options import config_from_args as build_config
from pipeline.configs import CamsConfig

RESUMES = "a re-run resumes"  # what Ctrl-C leaves (jobs/cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CamsConfig)  # every option is a CamsConfig field's declaration (pipeline/configs.py)
    parser.add_argument("--json", action="store_true", help="print the summary (or info) as JSON")


def config_from_args(args: argparse.Namespace) -> CamsConfig:
    return build_config(CamsConfig, args)


def check_against_checkpoint(cfg: CamsConfig) -> None:
    """Class ids and top-k against the checkpoint's classifier, read without torch (a run
    folder stands for its checkpoint.pt): a refusal answers at once, not after the model loads."""
    from pipeline.classes import ClassSelection
    from pipeline.train.checkpoints import checkpoint_summary

    found = checkpoint_summary(cfg.checkpoint, cfg.checkpoint_storage_options)
    if found.get("backbone", {}).get("num_classes"):
        ClassSelection.parse(cfg.classes, cfg.top_k, cfg.class_ids).validate(int(found["backbone"]["num_classes"]))


def info_lines(info: dict) -> list[str]:
    from pipeline.classes import describe_classes
    from pipeline.store.manifest import MANIFEST

    ck, src = info["checkpoint"], info["source"]
    what = describe_classes(info["classes"])
    up = f", upsampled {info['upsampled_size']}x{info['upsampled_size']} uint8" if info["upsampled_size"] else ""
    src_id = (
        f"fingerprint {src['fingerprint']}, view {src['view']}" if src["kind"] == "cache" else f"view {src['view']}"
    )
    lines = [
        f"CAM store    {info['url']}",
        f"fingerprint  {info['fingerprint']}",
        f"checkpoint   {ck.get('url')} (fingerprint {ck['fingerprint']}, L-CAM-{str(ck.get('method', '')).capitalize()}, {ck['backbone']['backbone']})",
        f"source       {src['kind']} {src.get('url', '')} ({src_id})",
        f"classes      {what}: {info['classes_per_sample']} map(s) per sample",
        f"maps         raw float16 {tuple(info['map_size'])}{up}",
        f"samples      {info['samples']} in {info['shards_done']} shards ({info['skipped']} skipped)",
        f"size         {info['bytes_on_disk'] / 2**20:.1f} MiB on disk, checksum {info.get('chunk_checksum') or 'none'} per chunk",
        f"updated      {info['updated']} (created {info['created']})",
    ]
    if info.get("gallery"):
        lines.append(f"gallery      {info['gallery']}")
    if not info.get("manifest_found", True):
        lines.append(
            f"PROBLEM      the manifest ({MANIFEST}) is missing: no shard counts as done; re-run `lcam cams` (or `lcam cache repair` to rebuild it)"
        )
    for url, f in sorted(info.get("failed", {}).items()):
        lines.append(f"FAILED       {url}: {f.get('reason')} (at {f.get('at')}); a re-run of `lcam cams` retries it")
    for url, what in sorted(info.get("damaged", {}).items()):
        lines.append(f"DAMAGED      {url}: {what}; a re-run of `lcam cams` re-makes it")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.checkpoint == "info":
        from pipeline.store.cam_store import CamStore

        info = CamStore.open(args.out, parse_storage_options(args.out_storage_option)).info()
        print(json.dumps(info, indent=1, sort_keys=True) if args.json else "\n".join(info_lines(info)))
        return 0

    cfg = config_from_args(args)  # mistakes in the options answer before the stage (torch, Ray) is imported
    check_against_checkpoint(cfg)
    if cfg.progress:
        announce(f"lcam cams: {cfg.checkpoint} -> {cfg.out}; loading torch and the checkpoint ...")
    from pipeline.cams.run import generate_cams

    summary = generate_cams(cfg)
    print(json.dumps(summary.to_dict(), indent=1) if args.json else "\n".join(summary.lines()))
    return 1 if summary.failed_shards else 0


if __name__ == "__main__":
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("cams", sys.argv[1:]))
