"""Training speed: L-CAM-Fm from the feature cache and L-CAM-Img with cached pass 1, each
against the reference code's style, on the ImageNet sample with EfficientNet-Lite0.

    .venv/bin/python benchmarks/train.py [--data /work/shared/data/imagenet-sample] [--work /tmp/lcam-bench-train]

Steps (one run):
1. pack the images into WebDataset shards and extract the float16 feature cache (Ray;
   reused when already there);
2. L-CAM-Fm: one epoch from the cache (CacheLoader: chunked reads, shuffle, prefetch)
   against one epoch in the reference style: the frozen backbone forward over the
   decoded images at every step (decoding is NOT timed: images are decoded up front,
   which favours the reference) and all K attention maps from the full 1x1 conv;
3. L-CAM-Img: a training step with pass 1 from the cache and the selected map from
   gathered weight rows, against the reference step (pass 1 by the backbone, all K maps).
Both comparisons run through ``benchmarks.common.compare``: the two styles alternate
(``--reps`` epochs, ``--img-steps`` steps each) after an uncounted warm-up round (a cache
epoch and ONE reference step for L-CAM-Fm; one step each for L-CAM-Img), and the targets
are the medians of the per-repetition ratios, printed with their spread and the load.
A full run times ``--reps`` reference epochs (~100 s each on 2 idle cores, one before the
harness); ``--ref-steps`` times only that many steps of each and extrapolates.

Peak memory is the rise of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) during each measured phase. Batch 64 (SPEC section 3) for the
epochs; ``--img-batch`` for the L-CAM-Img steps (default 32 to keep CPU runs short).
Both styles run with the same torch thread count (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import DEFAULT_DATA, compare, local_ray_env, target_ratio  # noqa: E402

local_ray_env()

import torch  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402


def peak_rss_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


class PeakMemory:
    """Rise of this process's peak RSS over its RSS at entry, for one phase: exact (the kernel's
    VmHWM, reset at entry) rather than sampled like benchmarks.common.PeakMemory; all the
    measured work runs in this process."""

    def __enter__(self) -> "PeakMemory":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.base = rss_mb()
        return self

    def __exit__(self, *exc) -> None:
        self.rise = peak_rss_mb() - self.base


def prepare_cache(data: str, work: str) -> tuple[str, str]:
    from pipeline.configs import ExtractConfig
    from pipeline.extract.run import extract
    from pipeline.shards.pack import pack_folder

    shards, cache = os.path.join(work, "shards"), os.path.join(work, "cache")
    if not os.path.exists(os.path.join(shards, "index.json")):
        print(f"packing {data} into shards ...", flush=True)
        pack_folder(data, shards, labels_file=os.path.join(data, "labels.tsv"), samples_per_shard=100, progress=False)
    t0 = time.perf_counter()
    summary = extract(ExtractConfig(shards=shards, cache=cache, batch_size=32, progress=True))
    if summary.shards_extracted:
        print(f"extracted {summary.images} images in {time.perf_counter() - t0:.0f}s", flush=True)
    if summary.failed_shards:
        raise SystemExit(f"extraction failed: {summary.failed_shards}")
    return shards, cache


def decoded_images(shards: str, prep) -> dict[str, torch.Tensor]:
    """key -> (3, 224, 224) uint8 centre crop (the reference's inputs, decoded before timing)."""
    from pipeline.images import decode_image, preprocess
    from pipeline.shards.read import iter_samples, list_shards

    out = {}
    for info in list_shards(shards):
        for s in iter_samples(info.url):
            out[s.key] = (preprocess(decode_image(s.image), prep) * 255).round().to(torch.uint8)
    return out


def reference_step(model, optimizer, scheduler, loss_fn, method: str, x: torch.Tensor, targets: torch.Tensor) -> float:
    """The reference code's step: pass 1 by the frozen backbone, ALL K maps from the full conv, then the targets'."""
    bb = model.backbone
    with torch.no_grad():
        feats = bb.features(bb.normalize(x))
    maps_all = torch.sigmoid(model.attention(feats))  # (B, K, h, w)
    a = maps_all[torch.arange(len(targets)), targets].unsqueeze(1)
    if method == "fm":
        logits = bb.head(a * feats)
    else:
        logits = bb(nnf.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False) * x)
    terms = loss_fn(logits, targets, a)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()
    scheduler.step()
    return float(terms.total.detach())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lcam-bench-train"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img-batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="interleaved L-CAM-Fm epochs per style (after a warm-up round)")
    ap.add_argument(
        "--img-steps",
        type=int,
        default=3,
        help="measured L-CAM-Img steps per style, interleaved (after one warm-up each)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for BOTH styles (default 1: what `lcam train` uses for L-CAM-Fm on 2 cores; 0: torch's default)",
    )
    ap.add_argument(
        "--ref-steps",
        type=int,
        default=0,
        help="reference Fm epoch: time only this many steps and extrapolate (0: the full epoch)",
    )
    args = ap.parse_args()

    import ray

    from lcam import LCAM, LCAMLoss, build_backbone
    from lcam.recipe import default_recipe, make_optimizer, make_scheduler
    from lcam.training import LCAMTrainer, TrainBatch, init_attention
    from pipeline.store.feature_cache import FeatureCache
    from pipeline.train.fm import fm_batches
    from pipeline.train.loader import CacheLoader

    os.makedirs(args.work, exist_ok=True)
    shards, cache_url = prepare_cache(args.data, args.work)
    if ray.is_initialized():
        ray.shutdown()  # free the cores for the measurements
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = FeatureCache.open(cache_url)
    backbone = build_backbone("efficientnet_lite0")
    recipe = default_recipe(backbone.name).with_overrides(batch_size=args.batch)
    n = len(cache)
    print(
        f"\ncache: {n} samples, {cache.dtype}, views {list(cache.views)}; torch threads {torch.get_num_threads()}, batch {args.batch}",
        flush=True,
    )

    # ---- reference style: decoded images, backbone at every step, all K maps
    print("decoding the images for the reference style (not timed) ...", flush=True)
    images = decoded_images(shards, backbone.preprocessing)
    keys = sorted(images)
    labels = {}
    for ks, _f, lab, _t in cache.iter_rows(batch_size=256, view=0):
        labels.update(zip(ks, lab.tolist()))
    g = torch.Generator().manual_seed(0)
    order = [keys[i] for i in torch.randperm(len(keys), generator=g).tolist()]
    batches = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
    timed = batches if args.ref_steps <= 0 else batches[: args.ref_steps]
    note = "" if len(timed) == len(batches) else f" (extrapolated from {len(timed)} steps)"

    # ---- L-CAM-Fm: an epoch from the cache against a reference-style epoch, interleaved.
    # Both arms set the thread count they run with at every call (the setting is process-wide).
    loader = CacheLoader(cache, args.batch, seed=0, target="label", view="random")
    trainer = LCAMTrainer(LCAM(backbone, init_attention(backbone, 0)), "fm", recipe, len(loader))
    ref = LCAM(backbone, init_attention(backbone, 0))
    opt = make_optimizer(ref.attention, recipe)
    sched = make_scheduler(opt, recipe, len(loader))
    loss_fn = LCAMLoss()
    cpu = {"fm": [], "reference": []}
    rise = {"fm": 0.0, "reference": 0.0}
    epochs = iter(range(1_000_000))

    threads = torch.get_num_threads()  # --threads, or torch's default when 0

    def set_threads() -> None:
        torch.set_num_threads(threads)

    def fm_epoch() -> float:
        set_threads()
        epoch = next(epochs)
        loader.set_epoch(epoch)
        with PeakMemory() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            sums = trainer.train_epoch(fm_batches(loader, 0))
            wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if epoch:  # epoch 0 is the warm-up round's
            cpu["fm"].append(cpu_s)
            rise["fm"] = max(rise["fm"], mem.rise)
        print(
            f"  L-CAM-Fm from cache: epoch of {int(sums.n)} samples ({len(loader)} steps) in {wall:.3f}s "
            f"(process CPU {cpu_s:.2f}s), loss {sums.means()['loss']:.3f}",
            flush=True,
        )
        return wall

    def reference_epoch(steps: list | None = None) -> float:
        """Seconds for an epoch in the reference style, extrapolated when fewer steps are run."""
        set_threads()
        run = steps or timed
        with PeakMemory() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            for i, b in enumerate(run):
                x = torch.stack([images[k] for k in b]).float().div_(255)
                loss = reference_step(ref, opt, sched, loss_fn, "fm", x, torch.tensor([labels[k] for k in b]))
                print(
                    f"    reference Fm step {i + 1}/{len(run)}: {time.perf_counter() - t0:.1f}s, loss {loss:.3f}",
                    flush=True,
                )
            wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        to_epoch = len(order) / sum(map(len, run))
        if steps is None:
            cpu["reference"].append(cpu_s * to_epoch)
            rise["reference"] = max(rise["reference"], mem.rise)
        return wall * to_epoch

    # warm-up round: one cache epoch (opens the shards, starts the prefetch threads) and a
    # single reference step (oneDNN's first-call set-up; reported extrapolated to an epoch),
    # not a whole ~100 s reference epoch
    fm = compare(
        {"fm": fm_epoch, "reference": reference_epoch},
        reps=args.reps,
        warmup={"reference": lambda: reference_epoch(timed[:1])},
        unit="s/epoch",
    )
    fm.report("L-CAM-Fm epoch")
    fm_cpu, ref_cpu = statistics.median(cpu["fm"]), statistics.median(cpu["reference"])

    # ---- L-CAM-Img: ours (pass 1 from the cache, gathered rows) vs reference, one step each a
    # round on the same batch (the warm-up round's batch is the first)
    feats_of = {}
    for ks, f, _lab, _t in cache.iter_rows(batch_size=256, view=0):
        feats_of.update(zip(ks, torch.from_numpy(f)))
    ours_img = LCAMTrainer(LCAM(backbone, init_attention(backbone, 0)), "img", recipe, len(loader))
    ref_img = LCAM(backbone, init_attention(backbone, 0))
    opt_i, loss_i = make_optimizer(ref_img.attention, recipe), LCAMLoss()
    sched_i = make_scheduler(opt_i, recipe, len(loader))
    calls = {"ours": 0, "reference": 0}
    img_rise = {"ours": 0.0, "reference": 0.0}

    def img_batch(arm: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = calls[arm]
        calls[arm] += 1
        b = order[step * args.img_batch : (step + 1) * args.img_batch]
        x = torch.stack([images[k] for k in b]).float().div_(255)
        return x, torch.tensor([labels[k] for k in b]), torch.stack([feats_of[k] for k in b])

    def img_ours() -> float:
        set_threads()
        x, y, f = img_batch("ours")
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            ours_img.step(TrainBatch(targets=y, feats=f, images=x))
            seconds = time.perf_counter() - t0
        if calls["ours"] > 1:  # the first is the warm-up
            img_rise["ours"] = max(img_rise["ours"], mem.rise)
        return seconds

    def img_reference() -> float:
        set_threads()
        x, y, _f = img_batch("reference")
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            reference_step(ref_img, opt_i, sched_i, loss_i, "img", x, y)
            seconds = time.perf_counter() - t0
        if calls["reference"] > 1:
            img_rise["reference"] = max(img_rise["reference"], mem.rise)
        return seconds

    img = compare({"ours": img_ours, "reference": img_reference}, reps=args.img_steps, unit="s/step")
    img.report(f"L-CAM-Img step, batch {args.img_batch}")

    fm_epoch_s, ref_epoch = fm.median("fm"), fm.median("reference")
    img_ours_s, img_ref_s = img.median("ours"), img.median("reference")
    fm_ratio, img_ratio = fm.ratio("fm", "reference"), img.ratio("ours", "reference")
    print(
        "\n| measurement (EfficientNet-Lite0, CPU; medians of interleaved repetitions) | ours | reference style | ratio |"
    )
    print("|---|---|---|---|")
    print(
        f"| L-CAM-Fm epoch, {n} images, batch {args.batch} (median of {fm.reps}) | {fm_epoch_s:.3f} s (from cache) | {ref_epoch:.1f} s{note} | {fm_ratio.median:.0f}x |"
    )
    print(f"| L-CAM-Fm epoch, process CPU time | {fm_cpu:.2f} s | {ref_cpu:.1f} s | {ref_cpu / fm_cpu:.0f}x |")
    print(f"| L-CAM-Fm samples/s | {n / fm_epoch_s:.0f} | {n / ref_epoch:.1f} | |")
    print(f"| L-CAM-Fm peak RSS rise | {rise['fm']:.0f} MB | {rise['reference']:.0f} MB | |")
    print(
        f"| L-CAM-Img step, batch {args.img_batch} (median of {img.reps}) | {img_ours_s:.2f} s (pass 1 cached) | {img_ref_s:.2f} s | {img_ratio.median:.2f}x |"
    )
    print(f"| L-CAM-Img peak RSS rise per step | {img_rise['ours']:.0f} MB | {img_rise['reference']:.0f} MB | |")
    print()
    target_ratio("fm_epoch_speedup", fm_ratio, ">=", 100, "{:.1f}")
    target_ratio("img_step_speedup", img_ratio, ">=", 1.3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
