"""Extraction throughput: the Ray pipeline against the model alone and a plain DataLoader loop.

    .venv/bin/python benchmarks/extract.py [--data DIR] [--limit N] [--batch-size B]

On the ImageNet sample with EfficientNet-Lite0 (32-image shards):
  (a) the pipeline end to end (shards -> read/decode tasks -> backbone actor writing its
      shard's group -> Zarr cache), images/s in steady state; a first, unmeasured run starts
      Ray's workers (each imports torch), the measured ones find them warm, as a
      long-running cluster does;
  (b) the model alone on pre-decoded tensors, one process;
  (c) a plain torch DataLoader (2 workers) + model loop, as a user would write it.
All three run the same model: the backbone with BatchNorm folded (``Backbone.folded``),
channels-last. (a), (b), (c) alternate ``--reps`` times (this machine's speed drifts by
10-30% between minutes); the targets are the medians of the per-repetition ratios.
Targets on a 2-core machine: a/c >= 1.0 and a/b >= 0.8.

Other backbones (``--backbone timm:resnet50 --weights random``, any spec) run
:func:`compare_with_model_alone` instead: (a) warm pipeline and (b) model alone
interleaved, ``--reps`` times, the median of the per-repetition ratios a/b (target >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    print(f"{n} images from {args.data}, EfficientNet-Lite0, batch {args.batch_size}, {os.cpu_count()} cores, "
          f"{args.reps} interleaved repetitions; load {os.getloadavg()}", flush=True)

    t0 = time.perf_counter()
    ensure_ray()
    print(f"ray start-up: {time.perf_counter() - t0:.1f}s (not counted below)")
    # a first run into its own cache starts Ray's workers (each imports torch); the measured
    # runs find them warm, as on a cluster that has been up: the targets use those
    cfg = dict(shards=str(work / "shards"), batch_size=args.batch_size, progress=False)
    cold = extract(ExtractConfig(cache=str(work / "cache-cold"), **cfg))
    info = FeatureCache.open(str(work / "cache-cold")).info()
    print(f"(a) pipeline, first run (cold workers): {cold.images} images in {cold.seconds:.1f}s; steady state {cold.steady_images_per_second:.1f} images/s")
    print(f"    cache: {info['bytes_on_disk'] / max(1, cold.images) / 1024:.1f} KiB per image on disk (raw {info['raw_bytes'] / max(1, cold.images) / 1024:.1f} KiB, "
          f"compression ratio {info['compression_ratio']:.2f})", flush=True)

    # the model as the pipeline's actor runs it: BatchNorm folded, channels-last
    backbone = build_backbone("efficientnet_lite0").folded().to(memory_format=torch.channels_last)
    tensors = [preprocess(Image.open(p).convert("RGB"), backbone.preprocessing) for p, _ in items]
    batches = [torch.stack(tensors[i : i + args.batch_size]).contiguous(memory_format=torch.channels_last) for i in range(0, n, args.batch_size)]
    del tensors
    loader = torch.utils.data.DataLoader(Files(items, backbone.preprocessing), batch_size=args.batch_size, num_workers=2)

    rows, peaks = [], {"a": 0.0, "b": 0.0, "c": 0.0}
    for rep in range(args.reps):
        # (a) the pipeline, warm workers, steady state (from its first finished shard)
        with PeakMemory() as mem:
            a = extract(ExtractConfig(cache=str(work / f"cache-{rep}"), **cfg)).steady_images_per_second
        peaks["a"] = max(peaks["a"], mem.peak_mib)
        torch.set_num_threads(os.cpu_count() or 1)
        # (b) the model alone on pre-decoded tensors
        with PeakMemory() as mem, torch.inference_mode():
            backbone.extract(batches[0])  # warm-up, like the pipeline's first batch
            t0 = time.perf_counter()
            for x in batches[1:]:
                backbone.extract(x)
            b = sum(len(x) for x in batches[1:]) / (time.perf_counter() - t0)
        peaks["b"] = max(peaks["b"], mem.peak_mib)
        # (c) a plain DataLoader (2 workers) + model loop, from its first batch on
        with PeakMemory() as mem, torch.inference_mode():
            t_first, after = None, 0
            for x, _ in loader:
                backbone.extract(x.contiguous(memory_format=torch.channels_last))
                if t_first is None:
                    t_first = time.perf_counter()
                else:
                    after += len(x)
            c = after / (time.perf_counter() - t_first)
        peaks["c"] = max(peaks["c"], mem.peak_mib)
        rows.append((a, b, c))
        print(f"rep {rep}: (a) pipeline {a:.1f}  (b) model alone {b:.1f}  (c) DataLoader + model {c:.1f} images/s   "
              f"a/c {a / c:.2f}  a/b {a / b:.2f}   load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"peak memory (process tree, driver + Ray workers): (a) {peaks['a']:.0f} MiB, (b) {peaks['b']:.0f} MiB, (c) {peaks['c']:.0f} MiB")
    ac = [a / c for a, _, c in rows]
    ab = [a / b for a, b, _ in rows]
    print(f"a/c median {statistics.median(ac):.2f} (spread {min(ac):.2f}-{max(ac):.2f}); "
          f"a/b median {statistics.median(ab):.2f} (spread {min(ab):.2f}-{max(ab):.2f})")
    ok = target("extract_vs_dataloader", statistics.median(ac), ">=", 1.0)
    ok &= target("extract_vs_model_alone", statistics.median(ab), ">=", 0.8)
    return 0 if ok else 1


class Files:
    """(c)'s dataset: the sample's files, decoded and preprocessed one by one as a user would."""

    def __init__(self, items: list, preprocessing) -> None:
        self.items, self.preprocessing = items, preprocessing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        from pipeline.images import preprocess

        path, label = self.items[i]
        return preprocess(Image.open(path).convert("RGB"), self.preprocessing), label


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
