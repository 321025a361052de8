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
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import DEFAULT_DATA, target  # noqa: E402
from lcam import LCAM, build_backbone  # noqa: E402
from pipeline.cams import CamsConfig, Explainer, generate_cams  # noqa: E402
from pipeline.checkpoints import save_checkpoint  # noqa: E402
from pipeline.extract import ExtractConfig, extract
from pipeline.raykit import ensure_ray  # noqa: E402
from pipeline.images import decode_image, preprocess  # noqa: E402
from pipeline.shards import list_shards, pack_folder, read_shard  # noqa: E402

PER_SHARD = 200  # a subset of whole shards for the image-based methods; fewer per-shard overheads


def prepare(data: str, work: str) -> tuple[str, str, str]:
    shards, cache = (os.path.join(work, f"{name}-{PER_SHARD}") for name in ("shards", "cache"))
    ckpt = os.path.join(work, "ckpt.pt")
    if not os.path.exists(os.path.join(shards, "index.json")):
        labels = os.path.join(data, "labels.tsv")
        pack_folder(data, shards, labels_file=labels if os.path.exists(labels) else None, samples_per_shard=PER_SHARD, progress=False)
    t = time.perf_counter()
    s = extract(ExtractConfig(shards=shards, cache=cache, batch_size=32, progress=True))
    if s.shards_extracted:
        print(f"extracted {s.images} images into the cache in {time.perf_counter() - t:.0f}s ({s.images_per_second:.1f} images/s)")
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
    return torch.stack([preprocess(decode_image(s.image), prep) for info in list_shards(shard_urls) for s in read_shard(info)])


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
    ap.add_argument("--images", type=int, default=200, help=f"images for the image-based methods (whole shards of {PER_SHARD})")
    ap.add_argument("--scorecam-images", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the cache path (it is fast; median reported)")
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, CUDA {torch.cuda.is_available()}; load {os.getloadavg()[0]:.1f}")
    shards, cache, ckpt = prepare(args.data, args.work)
    all_shards = [s.url for s in list_shards(shards)]
    subset = all_shards[: max(1, math.ceil(args.images / PER_SHARD))]
    stores = tempfile.mkdtemp(prefix="stores-", dir=args.work)
    ensure_ray()  # started once, outside every timing

    rows: dict[str, tuple[float, str]] = {}
    runs = lcam_store_runs(ckpt, stores, args.repeats, cache=cache)
    r = [s.maps_per_second for s in runs]
    rows["lcam_cache"] = (statistics.median(r), f"`lcam cams --cache`: {runs[0].samples} rows read, explained, stored; median of {args.repeats} runs ({', '.join(f'{v:.0f}' for v in r)})")
    up = lcam_store_runs(ckpt, stores, 1, cache=cache, upsample=True)[0]
    rows["lcam_cache_upsampled"] = (up.maps_per_second, "same, plus uint8 maps at 224x224 in the store")
    img = lcam_store_runs(ckpt, stores, 1, shards=subset, batch_size=args.batch_size)[0]
    rows["lcam_images"] = (img.steady_maps_per_second, f"`lcam cams --shards`: {img.samples} images, Ray read/decode/forward/store, from the model actor's start ({img.actors_ready_seconds:.0f}s start-up excluded)")
    rows["lcam_images_end_to_end"] = (img.maps_per_second, "the same run end to end, start-up included")

    explainer = Explainer.from_checkpoint(ckpt, device="cpu")
    x = decoded(subset, explainer.preprocessing)
    n = min(args.images, len(x))
    x = x[:n]

    def api() -> None:
        for i in range(0, n, args.batch_size):
            explainer(x[i : i + args.batch_size])

    rows["lcam_api"] = (rate(api, n), f"Explainer on {n} decoded tensors, batch {args.batch_size}")
    import pytorch_grad_cam

    rows["gradcam"] = (gradcam_rate(x, args.batch_size, pytorch_grad_cam.GradCAM), f"pytorch-grad-cam GradCAM on the same {n} tensors, batch {args.batch_size}")
    m = args.scorecam_images
    rows["scorecam"] = (gradcam_rate(x[:m], args.batch_size, pytorch_grad_cam.ScoreCAM), f"pytorch-grad-cam ScoreCAM on {m} of them, {args.batch_size} masks a forward")

    grad = rows["gradcam"][0]
    print()
    print(f"{'method':<22} {'maps/s':>10} {'x Grad-CAM':>11}  what")
    for name, (value, what) in rows.items():
        print(f"{name:<22} {value:>10.4g} {value / grad:>11.4g}  {what}")
    print()
    ratio_cache = rows["lcam_cache"][0] / grad
    ratio_images = rows["lcam_images"][0] / grad
    print(f"(from images end to end, start-up included: {rows['lcam_images_end_to_end'][0] / grad:.2f}x Grad-CAM over {img.samples} images)")
    target("cams_cache_vs_gradcam", ratio_cache, ">=", 200, "{:.1f}")
    target("cams_images_vs_gradcam", ratio_images, ">=", 2, "{:.2f}")
    shutil.rmtree(stores, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
