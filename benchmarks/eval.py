"""AD/IC of L-CAM against the baselines on the ImageNet sample, and the batched evaluation's speed.

    .venv/bin/python benchmarks/eval.py [--data DIR] [--work DIR] [--limit N] ...

With EfficientNet-Lite0 (packaged ImageNet weights), from one run:
  1. the pipeline: pack the sample into shards, extract the feature cache (Ray), train
     L-CAM-Fm on the 800 cached images (``pipeline.train.run.train``), then L-CAM-Img
     starting from L-CAM-Fm's attention, on the images of the table (``lcam.training``);
     the sample holds one image per class, so training and evaluation use the same images;
  2. ``lcam eval``: the table of all methods on the same seeded random subset; Score-CAM
     and RISE (costly) on stated sub-subsets of it, RISE with fewer masks than the papers;
  3. the batched evaluation of the two L-CAM checkpoints against the reference style
     (batch size 1; per image a clean pass, then per keep ratio the attention recomputed
     with all K maps and a masked pass), on the same images, with forward-pass counts:
     batched, reference and batched without BatchNorm folding alternate --timing-reps
     times after a warm-up round (``benchmarks.common.compare``); the speed-up is the
     median of the per-repetition ratios, printed with its spread and the load.
Targets: speed-up >= 3x; L-CAM-Img at least as good as Grad-CAM on AD and IC at 100/50/15%.

Stages 1's outputs are kept in --work (default /tmp/lcam-bench-eval) and reused by a
rerun with the same settings; --fresh starts over.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_DATA, compare, load_average, local_ray_env, target, target_ratio, work_folder  # noqa: E402

# the baselines added with the method registry (Ablation-CAM limited like Score-CAM: C head passes per image)
NEW_METHODS = ("xgradcam", "layercam", "hirescam", "eigencam", "ablationcam")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lcam-bench-eval"))
    p.add_argument("--fresh", action="store_true", help="redo packing, extraction and training")
    p.add_argument("--limit", type=int, default=128, help="images in the main table (seeded random subset of the 800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rise-images", type=int, default=16)
    p.add_argument("--rise-masks", type=int, default=200, help="RISE masks (papers: 4000 / 8000)")
    p.add_argument("--scorecam-images", type=int, default=2)
    p.add_argument("--timing-images", type=int, default=48, help="images for the batched-vs-reference timing")
    p.add_argument("--timing-reps", type=int, default=3, help="interleaved repetitions of the timing's three arms")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fm-epochs", type=int, default=80)
    p.add_argument("--fm-lr", type=float, default=3.0, help="one-cycle peak")
    p.add_argument("--fm-batch", type=int, default=16)
    p.add_argument("--img-epochs", type=int, default=4)
    p.add_argument("--img-lr", type=float, default=0.1, help="one-cycle peak")
    p.add_argument("--img-batch", type=int, default=8)
    p.add_argument(
        "--target",
        default="predicted",
        choices=["label", "predicted"],
        help="training target (default: the top-1 class, what eval explains)",
    )
    return p.parse_args()


def stage_key(**kw) -> str:
    return hashlib.sha256(json.dumps(kw, sort_keys=True).encode()).hexdigest()[:10]


def prepare(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """Shards, feature cache and L-CAM-Fm through the pipeline; L-CAM-Img fine-tuned from it (reused when present)."""
    from pipeline.configs import ExtractConfig, TrainConfig
    from pipeline.extract.run import extract
    from pipeline.shards.pack import pack_folder
    from pipeline.train.run import train

    shards = work / "shards"
    t0 = time.perf_counter()
    if not (shards / "index.json").exists():
        pack_folder(args.data, str(shards), samples_per_shard=100, progress=False, overwrite=True)
    cache = work / "cache"
    summary = extract(ExtractConfig(shards=str(shards), cache=str(cache), batch_size=16, progress=False))
    print(
        f"shards + cache: {time.perf_counter() - t0:.1f}s ({summary.shards_extracted} shards extracted now)", flush=True
    )
    out = {"shards": str(shards), "cache": str(cache)}
    fm_key = stage_key(epochs=args.fm_epochs, lr=args.fm_lr, batch=args.fm_batch, target=args.target, seed=args.seed)
    run = work / f"fm-{fm_key}"
    t0 = time.perf_counter()
    if not (run / f"epoch-{args.fm_epochs:03d}.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        s = train(
            TrainConfig(
                method="fm",
                out=str(run),
                cache=str(cache),
                epochs=args.fm_epochs,
                lr=args.fm_lr,
                batch_size=args.fm_batch,
                schedule="onecycle",
                target=args.target,
                view="first",
                seed=args.seed,
                progress=False,
            )
        )
        print(
            f"L-CAM-Fm (lcam train): {args.fm_epochs} epochs on the 800 cached images, one-cycle lr {args.fm_lr}, batch {args.fm_batch}, "
            f"target {args.target}: {time.perf_counter() - t0:.1f}s; last epoch loss {s.last_epoch['loss']:.3f} "
            f"(ce {s.last_epoch['ce']:.3f}, area {s.last_epoch['area']:.3f})",
            flush=True,
        )
    else:
        print(f"L-CAM-Fm: reusing {run}", flush=True)
    out["fm"] = str(run / "checkpoint.pt")
    img_key = stage_key(
        fm=fm_key, epochs=args.img_epochs, lr=args.img_lr, batch=args.img_batch, limit=args.limit, seed=args.seed
    )
    img = work / f"img-{img_key}" / "checkpoint.pt"
    if not img.exists():
        finetune_img(args, out["shards"], out["fm"], img)
    else:
        print(f"L-CAM-Img: reusing {img}", flush=True)
    out["img"] = str(img)
    return out


def finetune_img(args: argparse.Namespace, shards: str, fm_ckpt: str, out: Path) -> None:
    """L-CAM-Img: the attention starts from L-CAM-Fm's and trains with the Img forward
    (pixel-space masking, a full backbone pass and backward per image) on the images of
    the table. ``lcam train --method img`` has no warm start; from scratch it needs far
    more epochs than this machine's budget (see RESULTS.md), hence lcam.training here."""
    import numpy as np
    import torch

    from lcam import LCAM, build_backbone
    from lcam.recipe import Recipe
    from lcam.training import LCAMTrainer, TrainBatch, init_attention
    from pipeline.evaluation.plan import decode_batch, plan_batches, read_selected, shard_groups
    from pipeline.shards.read import list_shards
    from pipeline.train.checkpoints import load_checkpoint, save_checkpoint

    t0 = time.perf_counter()
    backbone = build_backbone("efficientnet_lite0")
    plan = plan_batches(list_shards(shards), 64, args.limit, args.seed)  # the table's images (same limit and seed)
    pixels = []
    for group in shard_groups(plan):
        samples = read_selected(group, None)
        pixels += [decode_batch(b, samples[b.batch_id], backbone.preprocessing).pixels for b in group]
    # channels-last: 1.5x faster forward + backward than NCHW on this CPU (measured, batch 8)
    x = torch.from_numpy(np.concatenate(pixels)).float().div_(255).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        feats, logits = zip(*(backbone.extract(c) for c in x.split(16)))
    feats, targets = torch.cat(feats), torch.cat(logits).argmax(1)  # target: the top-1 class, what eval explains
    attention = init_attention(backbone, args.seed)
    attention.load_state_dict(load_checkpoint(fm_ckpt)["attention"])
    model = LCAM(backbone, attention)
    steps = math.ceil(len(x) / args.img_batch)
    trainer = LCAMTrainer(
        model,
        "img",
        Recipe(lr=args.img_lr, epochs=args.img_epochs, batch_size=args.img_batch, schedule="onecycle"),
        steps,
    )
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.img_epochs):
        order = torch.randperm(len(x), generator=g)
        for idx in order.split(args.img_batch):
            trainer.step(
                TrainBatch(
                    targets=targets[idx], feats=feats[idx], images=x[idx].contiguous(memory_format=torch.channels_last)
                )
            )
        sums = trainer.finish_epoch().means()
    save_checkpoint(
        str(out),
        attention_state=model.attention.state_dict(),
        method="img",
        backbone=backbone.describe(),
        epoch=trainer.epoch,
        step=trainer.global_step,
        config={
            "init": fm_ckpt,
            "images": len(x),
            "lr": args.img_lr,
            "schedule": "onecycle",
            "batch_size": args.img_batch,
            "epochs": args.img_epochs,
            "target": "predicted",
            "view": "center",
        },
    )
    print(
        f"L-CAM-Img (lcam.training, from L-CAM-Fm): {args.img_epochs} epochs on the {len(x)} table images, one-cycle lr {args.img_lr}, "
        f"batch {args.img_batch}: {time.perf_counter() - t0:.1f}s; last epoch loss {sums['loss']:.3f} (ce {sums['ce']:.3f}, area {sums['area']:.3f})",
        flush=True,
    )


def reference_style(backbone, models, images) -> tuple[float, int, list]:
    """Batch size 1; per image and method: a clean pass, then per ratio the attention
    recomputed (a full forward with all K maps) and a masked pass."""
    import torch

    from lcam.metrics.adic import DEFAULT_RATIOS, keep_top, prepare_cams

    count = [0]
    handle = backbone.features.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + a[0].shape[0]))
    scores = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in images:
            x = x[None]
            per = []
            for model in models:
                probs = backbone(x).softmax(1)[0]
                c = int(probs.argmax())
                os_ = []
                for r in DEFAULT_RATIOS:
                    exp = model.explain(x, targets=[c], all_classes=True)
                    cam = keep_top(prepare_cams(exp.raw[:, 0], (224, 224)), r)
                    os_.append(float(backbone(x * cam[:, None]).softmax(1)[0, c]))
                per.append((c, float(probs[c]), os_))
            scores.append(per)
    seconds = time.perf_counter() - t0
    handle.remove()
    return seconds, count[0], scores


def main() -> int:
    args = parse_args()
    local_ray_env()
    import torch

    from lcam import LCAM, build_backbone
    from lcam.cam_methods.base import default_methods
    from pipeline.configs import EvalConfig
    from pipeline.evaluation.plan import decode_to_uint8
    from pipeline.evaluation.run import evaluate
    from pipeline.shards.read import list_shards, read_shard
    from pipeline.train.checkpoints import load_checkpoint

    work = work_folder(args.work, args.fresh)
    t_all = time.perf_counter()
    print(
        f"ImageNet sample {args.data}; EfficientNet-Lite0; {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; "
        f"load {load_average():.1f}",
        flush=True,
    )
    paths = prepare(args, work)
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the evaluation below runs in this process (the local engine)

    # ---- the table
    out = work / "eval"
    t0, load_table = time.perf_counter(), load_average()
    evaluate(
        EvalConfig(
            shards=paths["shards"],
            out=str(out),
            checkpoints=[paths["fm"], paths["img"]],
            limit=args.limit,
            seed=args.seed,
            methods=(*default_methods(), *NEW_METHODS),
            method_limits={
                "rise": args.rise_images,
                "scorecam": args.scorecam_images,
                "ablationcam": args.scorecam_images,
            },
            method_options={
                "rise": {"num_masks": args.rise_masks, "mask_batch": args.batch_size},
                "scorecam": {"batch_size": args.batch_size},
                "ablationcam": {"batch_size": args.batch_size},
            },
            batch_size=args.batch_size,
            engine="local",
        )
    )
    t_table = time.perf_counter() - t0
    report = json.loads((out / "results.json").read_text())
    print(
        f"\nevaluation of all methods: {t_table:.1f}s (load before {load_table:.1f}, after {load_average():.1f}); outputs in {out}\n"
    )
    print((out / "results.md").read_text())
    print("per-image cost of every method in this run (its map + AD/IC's masked forwards):")
    for m in report["methods"].values():
        if m["n"]:
            print(
                f"  {m['label']:<18} N={m['n']:<4} {m['seconds'] / m['n']:8.3f} s/image  "
                f"{(m['map_forwards'] + m['masked_forwards']) / m['n']:8.1f} forwards/image"
            )

    # ---- batched vs reference style, the two L-CAM checkpoints on the same images,
    # interleaved (benchmarks.common.compare): batched with BatchNorm folded, the reference
    # style, and batched without folding; the images are decoded once, before any timing
    tout = work / "eval-timing"
    threads = torch.get_num_threads()  # every arm sets it: the setting is process-wide
    timings: dict[str, dict] = {}

    def batched(fold: bool):
        def arm() -> float:
            torch.set_num_threads(threads)
            out_dir = tout if fold else work / "eval-timing-unfolded"
            evaluate(
                EvalConfig(
                    shards=paths["shards"],
                    out=str(out_dir),
                    checkpoints=[paths["fm"], paths["img"]],
                    methods=(),
                    limit=args.timing_images,
                    seed=args.seed + 1,
                    batch_size=args.batch_size,
                    engine="local",
                    fold_batchnorm=fold,
                    progress=False,
                )
            )
            timings[str(fold)] = json.loads((out_dir / "results.json").read_text())
            return timings[str(fold)]["timings"]["evaluation_seconds"]  # its own timer: reading + decoding + forwards

        return arm

    first = batched(
        True
    )()  # the batched arm's warm-up: it also picks the images (per_image.csv) the reference style runs on
    with open(tout / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = list(dict.fromkeys(r["key"] for r in rows))
    backbone = build_backbone("efficientnet_lite0")
    wanted = set(keys)
    pixels = {}
    for info in list_shards(paths["shards"]):
        for s in read_shard(info):
            if s.key in wanted:
                pixels[s.key] = torch.from_numpy(decode_to_uint8(s.image, backbone.preprocessing)).float().div_(255)
    images = [pixels[k] for k in keys]
    models = []
    for m in ("fm", "img"):
        model = LCAM(backbone)
        model.attention.load_state_dict(load_checkpoint(paths[m])["attention"])
        models.append(model.eval())
    reference: dict[str, tuple] = {}

    def reference_arm() -> float:
        torch.set_num_threads(threads)
        seconds, reference["forwards"], reference["scores"] = reference_style(backbone, models, images)
        return seconds

    comparison = compare(
        {"batched": batched(True), "reference": reference_arm, "unfolded": batched(False)},
        reps=args.timing_reps,
        warmup={"batched": lambda: first},
        unit="s",
    )
    comparison.report(f"batched evaluation vs reference style, {len(keys)} images")
    timing = timings["True"]
    batched_s, unfolded_s, ref_s = (
        comparison.median("batched"),
        comparison.median("unfolded"),
        comparison.median("reference"),
    )
    batched_fwd = timing["timings"]["clean_forwards"] + sum(
        m["map_forwards"] + m["masked_forwards"] for m in timing["methods"].values()
    )
    ref_fwd, ref_scores = reference["forwards"], reference["scores"]
    # the two styles compute the same numbers, up to float noise (batch size, memory layout)
    # that can flip near-tied pixels at the keep threshold
    import numpy as np

    from lcam.metrics.adic import average_drop, increase_in_confidence

    by = {(r["key"], r["method"]): r for r in rows}
    ratios = (1.0, 0.5, 0.15)
    n = len(keys)
    print(f"## Batched evaluation vs the reference style ({n} images, L-CAM-Fm + L-CAM-Img, 3 keep ratios)\n")
    print("| style | seconds | images/s | forward passes | per image |\n|---|--:|--:|--:|--:|")
    print(
        f"| reference (batch 1, attention recomputed per ratio) | {ref_s:.1f} | {n / ref_s:.2f} | {ref_fwd} | {ref_fwd / n:.0f} |"
    )
    print(
        f"| batched (lcam eval, batch {args.batch_size}, incl. reading + decoding) | {batched_s:.1f} | {n / batched_s:.2f} | {batched_fwd} | {batched_fwd / n:.0f} |"
    )
    print(
        f"| batched, BatchNorm not folded (--no-fold-batchnorm) | {unfolded_s:.1f} | {n / unfolded_s:.2f} | {batched_fwd} | {batched_fwd / n:.0f} |"
    )
    speedup = comparison.ratio("batched", "reference")
    folding = comparison.ratio("batched", "unfolded")
    print(
        f"\ntimes: medians of {comparison.reps} interleaved repetitions; BatchNorm folding alone: {folding.median:.2f}x "
        f"(spread {folding.lo:.2f}-{folding.hi:.2f})"
    )
    print(
        f"speed-up {speedup.median:.2f}x with {ref_fwd / n:.0f} vs {batched_fwd / n:.0f} forward passes per image (forward ratio {ref_fwd / batched_fwd:.2f})"
    )
    for j, mid in enumerate(("lcam-fm", "lcam-img")):
        Yb = torch.tensor([float(by[(k, mid)]["Y"]) for k in keys])
        Ob = torch.tensor([[float(by[(k, mid)][f"O@{q:g}"]) for k in keys] for q in ratios])
        Yr = torch.tensor([ref_scores[i][j][1] for i in range(n)])
        Or = torch.tensor([[ref_scores[i][j][2][qi] for i in range(n)] for qi in range(len(ratios))])
        d = (Ob - Or).abs().flatten().numpy()
        same_class = sum(int(by[(k, mid)]["predicted"]) == ref_scores[i][j][0] for i, k in enumerate(keys))
        print(
            f"{mid}: AD batched {np.round(average_drop(Yb, Ob).numpy(), 2).tolist()} vs reference {np.round(average_drop(Yr, Or).numpy(), 2).tolist()}; "
            f"IC {np.round(increase_in_confidence(Yb, Ob).numpy(), 2).tolist()} vs {np.round(increase_in_confidence(Yr, Or).numpy(), 2).tolist()}; "
            f"same class {same_class}/{n}; |O_b - O_r| median {np.median(d):.1e}, max {d.max():.1e} ({int((d > 1e-3).sum())} of {d.size} > 1e-3)"
        )
    print(f"whole benchmark: {time.perf_counter() - t_all:.0f}s; load average now {load_average():.1f}\n")

    target_ratio("eval_speedup_vs_reference", speedup, ">=", 3.0)
    img, gc = report["methods"]["lcam-img"], report["methods"]["gradcam"]
    for j, q in enumerate((1.0, 0.5, 0.15)):
        target(f"lcam_img_minus_gradcam_AD@{q * 100:g}%", img["ad"][j] - gc["ad"][j], "<=", 0.0)
    for j, q in enumerate((1.0, 0.5, 0.15)):
        target(f"lcam_img_minus_gradcam_IC@{q * 100:g}%", img["ic"][j] - gc["ic"][j], ">=", 0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
