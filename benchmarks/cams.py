"""Bulk CAM throughput: L-CAM from a feature cache and from images vs pytorch-grad-cam.

On the ImageNet sample with EfficientNet-Lite0, from ONE run:

* L-CAM maps/s from the feature cache (`lcam cams --cache`: read, matrix product, write the store);
* L-CAM maps/s from images (`lcam cams --shards`: Ray, decode, one forward, write the store),
  and the same forward through the Python API on already decoded tensors;
* pytorch-grad-cam's Grad-CAM, batched, on the same decoded tensors, same layer (the
  output of the backbone's `features`, the layer L-CAM's attention reads), with the
  model as users have it (parameters requiring grad: backward runs through the network);
* pytorch-grad-cam's Score-CAM on a few of those images (1280 masked forwards each).

Targets: from the cache >= 200x Grad-CAM; from images >= 2x Grad-CAM (decode and store
writes included, against Grad-CAM on pre-decoded tensors). The images rate counts from
the moment the model actor is ready (the summary's steady_maps_per_second), so the fixed
start-up (a Ray worker importing torch, building the model) drops out as it does on a
large dataset; the same run's end-to-end rate is printed beside it.

The L-CAM paths, the API and Grad-CAM alternate ``--repeats`` times after one uncounted
warm-up round (``benchmarks.common.compare``); the targets are the medians of the
per-repetition ratios to Grad-CAM, printed with their spread and the load. Score-CAM runs
once after them (it is costly and has no target).

The L-CAM checkpoint is the classic-CAM initialisation (attention = the classifier's fc
weights): speed does not depend on the weights. Shards, cache and checkpoint are kept in
--work, so a second run skips packing and extraction.

    .venv/bin/python benchmarks/cams.py [--data /work/shared/data/imagenet-sample] [--images 200]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import DEFAULT_DATA, compare, local_ray_env, target_ratio  # noqa: E402

local_ray_env()  # before Ray is imported: its own temp dir, no auth token (Score-CAM's tqdm bar still shows here)
from lcam import LCAM, build_backbone  # noqa: E402
from pipeline.cams.explainer import Explainer  # noqa: E402
from pipeline.cams.run import generate_cams  # noqa: E402
from pipeline.configs import (
    CamsConfig,  # noqa: E402
    ExtractConfig,  # noqa: E402
)
from pipeline.extract.run import extract  # noqa: E402
from pipeline.images import decode_image, preprocess  # noqa: E402
from pipeline.raykit import ensure_ray  # noqa: E402
from pipeline.shards.pack import pack_folder  # noqa: E402
from pipeline.shards.read import list_shards, read_shard  # noqa: E402
from pipeline.train.checkpoints import save_checkpoint  # noqa: E402

PER_SHARD = 200  # a subset of whole shards for the image-based methods; fewer per-shard overheads


def prepare(data: str, work: str) -> tuple[str, str, str]:
    shards, cache = (os.path.join(work, f"{name}-{PER_SHARD}") for name in ("shards", "cache"))
    ckpt = os.path.join(work, "ckpt.pt")
    if not os.path.exists(os.path.join(shards, "index.json")):
        labels = os.path.join(data, "labels.tsv")
        pack_folder(
            data,
            shards,
            labels_file=labels if os.path.exists(labels) else None,
            samples_per_shard=PER_SHARD,
            progress=False,
        )
    t = time.perf_counter()
    s = extract(ExtractConfig(shards=shards, cache=cache, batch_size=32, progress=True))
    if s.shards_extracted:
        print(
            f"extracted {s.images} images into the cache in {time.perf_counter() - t:.0f}s ({s.images_per_second:.1f} images/s)"
        )
    if not os.path.exists(ckpt):
        backbone = build_backbone("efficientnet_lite0")
        model = LCAM(backbone)
        fc = backbone.head[-1]
        with torch.no_grad():
            model.attention.conv.weight.copy_(fc.weight[:, :, None, None])
            model.attention.conv.bias.copy_(fc.bias / 49)
        save_checkpoint(ckpt, attention_state=model.attention.state_dict(), method="fm", backbone=backbone.describe())
    return shards, cache, ckpt


def lcam_store_runs(ckpt: str, out_root: str, repeats: int, **source) -> list:
    """Summaries of ``repeats`` runs of `lcam cams`, each into a fresh store."""
    out_summaries = []
    for _ in range(repeats):
        out = os.path.join(out_root, f"store-{len(os.listdir(out_root))}")
        s = generate_cams(CamsConfig(checkpoint=ckpt, out=out, progress=False, **source))
        assert s.failed_shards == [] and s.maps > 0, s.lines()
        out_summaries.append(s)
        shutil.rmtree(out)
    return out_summaries


def decoded(shard_urls: list[str], prep) -> torch.Tensor:
    return torch.stack(
        [preprocess(decode_image(s.image), prep) for info in list_shards(shard_urls) for s in read_shard(info)]
    )


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def gradcam_rate(x: torch.Tensor, batch: int, cam_class) -> float:
    """pytorch-grad-cam as users run it: a model whose parameters require grad."""
    model = build_backbone("efficientnet_lite0")
    for p in model.parameters():
        p.requires_grad_(True)
    cam = cam_class(model=model, target_layers=[model.target_layer])
    cam.batch_size = batch  # masked images per forward (read by ScoreCAM only; its default is 16)

    def go() -> None:
        for i in range(0, len(x), batch):
            maps = cam(input_tensor=x[i : i + batch], targets=None)  # predicted class, like L-CAM
            assert maps.shape[0] == len(x[i : i + batch])

    try:
        return rate(go, len(x))
    finally:
        cam.activations_and_grads.release()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lcam-bench-cams"))
    ap.add_argument(
        "--images", type=int, default=200, help=f"images for the image-based methods (whole shards of {PER_SHARD})"
    )
    ap.add_argument("--scorecam-images", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved repetitions of every compared method, after a warm-up round (medians reported)",
    )
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, CUDA {torch.cuda.is_available()}; load {os.getloadavg()[0]:.1f}"
    )
    shards, cache, ckpt = prepare(args.data, args.work)
    all_shards = [s.url for s in list_shards(shards)]
    subset = all_shards[: max(1, math.ceil(args.images / PER_SHARD))]
    stores = tempfile.mkdtemp(prefix="stores-", dir=args.work)
    ensure_ray()  # started once, outside every timing

    explainer = Explainer.from_checkpoint(ckpt, device="cpu")
    x = decoded(subset, explainer.preprocessing)
    n = min(args.images, len(x))
    x = x[:n]
    import pytorch_grad_cam

    # every arm returns seconds per map and sets the driver's torch threads itself (the
    # setting is process-wide; the CAM actors set their own in their processes)
    threads = torch.get_num_threads()
    last: dict[str, object] = {}

    def store_arm(name: str, **source):
        def arm() -> float:
            torch.set_num_threads(threads)
            s = last[name] = lcam_store_runs(ckpt, stores, 1, **source)[0]
            return 1 / (s.steady_maps_per_second if "shards" in source else s.maps_per_second)

        return arm

    def api() -> float:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        for i in range(0, n, args.batch_size):
            explainer(x[i : i + args.batch_size])
        return (time.perf_counter() - t) / n

    def gradcam() -> float:
        torch.set_num_threads(threads)
        return 1 / gradcam_rate(x, args.batch_size, pytorch_grad_cam.GradCAM)

    # the warm-up round's images run starts the CAM actors' workers; the steady rate leaves
    # their start-up out anyway (it counts from the model actor's start)
    comparison = compare(
        {
            "lcam_cache": store_arm("lcam_cache", cache=cache),
            "lcam_cache_upsampled": store_arm("lcam_cache_upsampled", cache=cache, upsample=True),
            "lcam_images": store_arm("lcam_images", shards=subset, batch_size=args.batch_size),
            "lcam_api": api,
            "gradcam": gradcam,
        },
        reps=args.repeats,
        unit="s/map",
    )
    comparison.report("bulk CAMs", rate="maps/s")
    img = last["lcam_images"]
    m = args.scorecam_images
    torch.set_num_threads(threads)
    scorecam = gradcam_rate(x[:m], args.batch_size, pytorch_grad_cam.ScoreCAM)  # costly: one run, not compared

    rate_of = {arm: 1 / comparison.median(arm) for arm in comparison.arms}
    rows: dict[str, tuple[float, float, str]] = {
        "lcam_cache": (
            rate_of["lcam_cache"],
            comparison.ratio("lcam_cache", "gradcam").median,
            f"`lcam cams --cache`: {last['lcam_cache'].samples} rows read, explained, stored",
        ),
        "lcam_cache_upsampled": (
            rate_of["lcam_cache_upsampled"],
            comparison.ratio("lcam_cache_upsampled", "gradcam").median,
            "same, plus uint8 maps at 224x224 in the store",
        ),
        "lcam_images": (
            rate_of["lcam_images"],
            comparison.ratio("lcam_images", "gradcam").median,
            f"`lcam cams --shards`: {img.samples} images, Ray read/decode/forward/store, from the model actor's start "
            f"({img.actors_ready_seconds:.0f}s start-up excluded, last run)",
        ),
        "lcam_images_end_to_end": (
            img.maps_per_second,
            img.maps_per_second / rate_of["gradcam"],
            "the last images run end to end, start-up included",
        ),
        "lcam_api": (
            rate_of["lcam_api"],
            comparison.ratio("lcam_api", "gradcam").median,
            f"Explainer on {n} decoded tensors, batch {args.batch_size}",
        ),
        "gradcam": (
            rate_of["gradcam"],
            1.0,
            f"pytorch-grad-cam GradCAM on the same {n} tensors, batch {args.batch_size}",
        ),
        "scorecam": (
            scorecam,
            scorecam / rate_of["gradcam"],
            f"pytorch-grad-cam ScoreCAM on {m} of them, {args.batch_size} masks a forward (one run)",
        ),
    }
    print()
    print(f"medians of {args.repeats} interleaved repetitions; x Grad-CAM: the median of the per-repetition ratios")
    print(f"{'method':<22} {'maps/s':>10} {'x Grad-CAM':>11}  what")
    for name, (value, ratio, what) in rows.items():
        print(f"{name:<22} {value:>10.4g} {ratio:>11.4g}  {what}")
    print()
    print(
        f"(from images end to end, start-up included: {rows['lcam_images_end_to_end'][1]:.2f}x Grad-CAM over {img.samples} images, last run)"
    )
    target_ratio("cams_cache_vs_gradcam", comparison.ratio("lcam_cache", "gradcam"), ">=", 200, "{:.1f}")
    target_ratio("cams_images_vs_gradcam", comparison.ratio("lcam_images", "gradcam"), ">=", 2, "{:.2f}")
    shutil.rmtree(stores, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
