"""``lcam cams CHECKPOINT OUT --cache URL | --shards PATTERN`` and ``lcam cams info URL``.

Bulk CAMs from a trained L-CAM into a Zarr CAM store; ``--overlays N`` adds overlay
PNGs and an HTML gallery under ``OUT/gallery``.
"""

from __future__ import annotations

import argparse
import json

from jobs.common import PRECISION_HELP, add_storage_options, parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="L-CAM checkpoint URL (L-CAM-Fm or L-CAM-Img); or the word 'info' to describe a store: lcam cams info URL")
    parser.add_argument("out", help="CAM store URL to write (local path, s3://, gs://); with 'info', the store to describe")
    src = parser.add_argument_group("source (exactly one)")
    src.add_argument("--cache", default=None, help="feature cache URL: no image is read, a matrix product per chunk")
    src.add_argument("--shards", default=None, help="WebDataset shards (pattern, .tar or folder with index.json): one forward pass per image on Ray")
    src.add_argument("--index", default=None, help="shard index URL (default: index.json beside the shards)")
    src.add_argument("--view", default="center", help="which cached view to explain (cache source; default center)")
    cls = parser.add_argument_group("classes")
    cls.add_argument("--classes", default=None, help="which classes per sample: predicted, label, top-k, top5 (any k), ids, or a combination side by side "
                     "such as predicted,label or top5,label (default predicted; implied by --top-k or --class-ids)")
    cls.add_argument("--top-k", type=int, default=None, help="explain the K most probable classes")
    cls.add_argument("--class-ids", default=None, help="explain these class ids for every sample, e.g. 281,285")
    parser.add_argument("--upsample", action="store_true", help="also store maps at the input size as uint8")
    parser.add_argument("--weights", default=None, help="where the backbone weights come from (default: as recorded in the checkpoint)")
    comp = parser.add_argument_group("compute")
    comp.add_argument("--batch-size", type=int, default=64)
    comp.add_argument("--actors", type=int, default=None, help="backbone actors (shard source) or model actors (cache source on Ray); default: one per GPU, else 1")
    comp.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="shard source: the backbone's autocast; " + PRECISION_HELP)
    comp.add_argument("--torch-threads", type=int, default=None, help="CPU threads per actor (default: all cores)")
    comp.add_argument("--device", default="auto", help="cache source: auto, cpu, cuda, cuda:1")
    comp.add_argument("--where", default="auto", choices=["auto", "local", "ray"],
                      help="cache source: local = in this process; ray = on model actors (one per GPU of the cluster, or --actors), "
                           "each writing whole shards; auto (default) = ray when there is a cluster (RAY_ADDRESS set), else local")
    pics = parser.add_argument_group("pictures")
    pics.add_argument("--overlays", type=int, default=0, help="write N overlay PNGs and an HTML gallery (default 0)")
    pics.add_argument("--gallery", default=None, help="gallery URL (default OUT/gallery)")
    pics.add_argument("--colormap", default="jet", help="matplotlib colormap (jet, viridis, inferno, turbo, ...)")
    pics.add_argument("--opacity", type=float, default=0.5, help="colour map opacity over the image, 0..1 (default 0.5)")
    pics.add_argument("--class-names", default=None, help="class names file (TSV/CSV with a 'name' column, or a name a line); default ImageNet")
    parser.add_argument("--json", action="store_true", help="print the summary (or info) as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_storage_options(parser, "--checkpoint-storage-option", "checkpoint_storage_option", " for the checkpoint")
    add_storage_options(parser, "--source-storage-option", "source_storage_option", " for the cache or the shards")
    add_storage_options(parser, "--out-storage-option", "out_storage_option", " for the CAM store and gallery")


def config_from_args(args: argparse.Namespace):
    from pipeline.cams import CamsConfig

    return CamsConfig(
        checkpoint=args.checkpoint,
        out=args.out,
        cache=args.cache,
        shards=args.shards,
        classes=args.classes,
        top_k=args.top_k,
        class_ids=args.class_ids,
        upsample=args.upsample,
        view=args.view,
        weights=args.weights,
        batch_size=args.batch_size,
        num_actors=args.actors,
        precision=args.precision,
        torch_threads=args.torch_threads,
        device=args.device,
        where=args.where,
        index=args.index,
        overlays=args.overlays,
        gallery=args.gallery,
        colormap=args.colormap,
        opacity=args.opacity,
        class_names=args.class_names,
        checkpoint_storage_options=parse_storage_options(args.checkpoint_storage_option),
        source_storage_options=parse_storage_options(args.source_storage_option),
        out_storage_options=parse_storage_options(args.out_storage_option),
        progress=not args.quiet,
    )


def info_lines(info: dict) -> list[str]:
    from pipeline.classes import describe_classes

    ck, src = info["checkpoint"], info["source"]
    what = describe_classes(info["classes"])
    up = f", upsampled {info['upsampled_size']}x{info['upsampled_size']} uint8" if info["upsampled_size"] else ""
    src_id = f"fingerprint {src['fingerprint']}, view {src['view']}" if src["kind"] == "cache" else f"view {src['view']}"
    lines = [
        f"CAM store    {info['url']}",
        f"fingerprint  {info['fingerprint']}",
        f"checkpoint   {ck.get('url')} (fingerprint {ck['fingerprint']}, L-CAM-{str(ck.get('method', '')).capitalize()}, {ck['backbone']['backbone']})",
        f"source       {src['kind']} {src.get('url', '')} ({src_id})",
        f"classes      {what}: {info['classes_per_sample']} map(s) per sample",
        f"maps         raw float16 {tuple(info['map_size'])}{up}",
        f"samples      {info['samples']} in {info['shards_done']} shards ({info['skipped']} skipped)",
        f"size         {info['bytes_on_disk'] / 2**20:.1f} MiB on disk",
        f"updated      {info['updated']} (created {info['created']})",
    ]
    if info.get("gallery"):
        lines.append(f"gallery      {info['gallery']}")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.checkpoint == "info":
        from pipeline.cams import CamStore

        info = CamStore.open(args.out, parse_storage_options(args.out_storage_option)).info()
        print(json.dumps(info, indent=1, sort_keys=True) if args.json else "\n".join(info_lines(info)))
        return 0

    from pipeline.cams import generate_cams

    summary = generate_cams(config_from_args(args))
    print(json.dumps(summary.to_dict(), indent=1) if args.json else "\n".join(summary.lines()))
    return 1 if summary.failed_shards else 0


if __name__ == "__main__":
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("cams", sys.argv[1:]))
