"""Extraction throughput: the Ray pipeline against the model alone and a plain DataLoader loop.

    .venv/bin/python benchmarks/extract.py [--data DIR] [--limit N] [--batch-size B]

On the ImageNet sample with EfficientNet-Lite0, from one run:
  (a) the pipeline end to end (shards -> Ray Data decode -> backbone actor -> Zarr cache),
      images/s in steady state (Ray start-up on its own line); run twice, into two caches:
      the first run starts Ray's workers (each imports torch), the second finds them warm,
      as a long-running cluster does; the targets use the warm run;
  (b) the model alone on pre-decoded tensors, one process;
  (c) a plain torch DataLoader (2 workers) + model loop, as a user would write it.
All three run the same model: the backbone with BatchNorm folded (``Backbone.folded``),
channels-last.
Targets on a 2-core machine: a/c >= 1.0 and a/b >= 0.8.

Other backbones (``--backbone timm:resnet50 --weights random``, any spec) run
:func:`compare_with_model_alone` instead: (a) warm pipeline and (b) model alone
interleaved, ``--reps`` times, the median of the per-repetition ratios a/b (target >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_DATA, PeakMemory, local_ray_env, sample_images, target  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=480, help="images (default 480 of the 800)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="efficientnet_lite0", help="any backbone spec; others than the default run the interleaved a/b comparison")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    local_ray_env()
    import torch
    from PIL import Image

    from lcam import build_backbone
    from pipeline.cache import FeatureCache
    from pipeline.extract import ExtractConfig, extract
    from pipeline.raykit import ensure_ray
    from pipeline.images import preprocess
    from pipeline.shards import pack_folder

    items = sample_images(args.data, args.limit)
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    folder = work / "images"
    folder.mkdir()
    with open(folder / "labels.tsv", "w") as f:
        f.write("file\tclass_index\n")
        for path, label in items:
            os.symlink(path, folder / Path(path).name)  # by path: the sample is never copied
            f.write(f"{Path(path).name}\t{label}\n")
    pack_folder(folder, str(work / "shards"), samples_per_shard=32, progress=False)
    n = len(items)
    if args.backbone != "efficientnet_lite0":
        return compare_with_model_alone(args, items, work)
    print(f"{n} images from {args.data}, EfficientNet-Lite0, batch {args.batch_size}, {os.cpu_count()} cores")

    # (a) the pipeline
    t0 = time.perf_counter()
    ensure_ray()
    print(f"ray start-up: {time.perf_counter() - t0:.1f}s (not counted below)")
    with PeakMemory() as mem_a:
        cold = extract(ExtractConfig(shards=str(work / "shards"), cache=str(work / "cache"), batch_size=args.batch_size, progress=False))
        # again into a new cache on the same Ray: its workers are up and have imported torch,
        # as on a cluster that has been running; this is the steady state the targets use
        summary = extract(ExtractConfig(shards=str(work / "shards"), cache=str(work / "cache-warm"), batch_size=args.batch_size, progress=False))
    a = summary.steady_images_per_second
    info = FeatureCache.open(str(work / "cache")).info()
    per_image = info["bytes_on_disk"] / max(1, summary.images)
    print(f"(a) pipeline, first run (cold workers): {cold.images} images in {cold.seconds:.1f}s; steady state {cold.steady_images_per_second:.1f} images/s")
    print(f"(a) pipeline, warm workers: {summary.images} images in {summary.seconds:.1f}s; steady state {a:.1f} images/s; "
          f"peak memory {mem_a.peak_mib:.0f} MiB (driver + Ray workers)")
    print(f"    cache: {per_image / 1024:.1f} KiB per image on disk (raw {info['raw_bytes'] / max(1, summary.images) / 1024:.1f} KiB, "
          f"compression ratio {info['compression_ratio']:.2f})")
    import ray

    ray.shutdown()

    # the model as the pipeline's actor runs it: BatchNorm folded, channels-last
    backbone = build_backbone("efficientnet_lite0").folded().to(memory_format=torch.channels_last)
    torch.set_num_threads(os.cpu_count() or 1)

    # (b) the model alone on pre-decoded tensors
    tensors = [preprocess(Image.open(p).convert("RGB"), backbone.preprocessing) for p, _ in items]
    batches = [torch.stack(tensors[i : i + args.batch_size]).contiguous(memory_format=torch.channels_last) for i in range(0, n, args.batch_size)]
    with torch.inference_mode():
        backbone.extract(batches[0])  # warm-up, like the pipeline's first batch
        with PeakMemory() as mem_b:
            t0 = time.perf_counter()
            for x in batches[1:]:
                backbone.extract(x)
            b = sum(len(x) for x in batches[1:]) / (time.perf_counter() - t0)
    print(f"(b) model alone: {b:.1f} images/s; peak memory {mem_b.peak_mib:.0f} MiB")
    del tensors, batches

    # (c) a plain DataLoader + model loop
    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int):
            path, label = items[i]
            return preprocess(Image.open(path).convert("RGB"), backbone.preprocessing), label

    loader = torch.utils.data.DataLoader(Files(), batch_size=args.batch_size, num_workers=2)
    with PeakMemory() as mem_c, torch.inference_mode():
        t_first, after = None, 0
        for x, _ in loader:
            backbone.extract(x.contiguous(memory_format=torch.channels_last))
            if t_first is None:
                t_first = time.perf_counter()
            else:
                after += len(x)
        c = after / (time.perf_counter() - t_first)
    print(f"(c) DataLoader(2 workers) + model: {c:.1f} images/s; peak memory {mem_c.peak_mib:.0f} MiB")

    print(f"a/b = {a / b:.2f}   a/c = {a / c:.2f}")
    ok = target("extract_vs_dataloader", a / c, ">=", 1.0)
    ok &= target("extract_vs_model_alone", a / b, ">=", 0.8)
    return 0 if ok else 1


def compare_with_model_alone(args: argparse.Namespace, items: list, work: Path) -> int:
    """(a) warm pipeline vs (b) the model alone on decoded tensors, interleaved ``args.reps`` times."""
    import statistics

    import torch
    from PIL import Image

    from lcam import build_backbone
    from pipeline.extract import ExtractConfig, extract
    from pipeline.raykit import ensure_ray
    from pipeline.images import preprocess

    backbone = build_backbone(args.backbone, args.weights)
    print(f"{len(items)} images, {backbone.name} (weights {args.weights}), F {backbone.feature_shape}, "
          f"batch {args.batch_size}, {os.cpu_count()} cores")
    cfg = dict(shards=str(work / "shards"), backbone=args.backbone, weights=args.weights, batch_size=args.batch_size, progress=False)
    ensure_ray()
    extract(ExtractConfig(cache=str(work / "cache-cold"), **cfg))  # starts the workers: not measured
    model = backbone.folded().to(memory_format=torch.channels_last)  # as the actor runs it
    tensors = [preprocess(Image.open(p).convert("RGB"), backbone.preprocessing) for p, _ in items]
    batches = [torch.stack(tensors[i : i + args.batch_size]).contiguous(memory_format=torch.channels_last)
               for i in range(0, len(tensors), args.batch_size)]
    ratios = []
    for rep in range(args.reps):
        a = extract(ExtractConfig(cache=str(work / f"cache-{rep}"), **cfg)).steady_images_per_second
        torch.set_num_threads(os.cpu_count() or 1)
        with torch.inference_mode():
            model.extract(batches[0])  # warm-up, like the pipeline's first batch
            t0 = time.perf_counter()
            for x in batches[1:]:
                model.extract(x)
            b = sum(len(x) for x in batches[1:]) / (time.perf_counter() - t0)
        ratios.append(a / b)
        print(f"rep {rep}: (a) pipeline {a:.1f} images/s, (b) model alone {b:.1f} images/s, a/b {a / b:.2f}", flush=True)
    med = statistics.median(ratios)
    print(f"a/b median {med:.2f} (spread {min(ratios):.2f}-{max(ratios):.2f})")
    safe = args.backbone.replace(":", "_").replace(",", "_").replace("=", "")
    return 0 if target(f"extract_vs_model_alone[{safe}]", med, ">=", 0.8) else 1


if __name__ == "__main__":
    sys.exit(main())
