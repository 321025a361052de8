"""Held-out protocol: L-CAM on images of classes it never trained on, against Grad-CAM.

    .venv/bin/python benchmarks/generalisation.py [--data DIR] [--work DIR] [--seed 0] ...

The ImageNet sample (800 images, one per class; used by path, never copied into the
repository) is split by class with a seeded shuffle: 600 training classes, 200 held-out
classes. With EfficientNet-Lite0 (packaged ImageNet weights):
  1. the 600 training images are packed into shards and extracted into a feature cache;
  2. L-CAM-Fm variants train on the 600 cached images (``pipeline.train.run.train``, one-cycle,
     target = the predicted class, or --target label): ``--init random|cam`` x ``--targets``
     single / top-K (cheap: from the cache), each exported with an ``--uncovered`` rule and a
     ``--row-prior`` (re-exports of one training: INIT:K:FILL:PRIOR);
  3. L-CAM-Img trains with ``lcam train --method img --init-from`` the chosen L-CAM-Fm
     checkpoint (Ray Train, centre crops) on a seeded subset of the 600 training images
     (--img-images; CPU time);
  4. ``lcam eval`` of every variant, L-CAM-Img and the baselines on the 200 held-out images
     (classes with no training image) and, for contrast, on 200 of the 600 training images;
  5. per-image paired differences against Grad-CAM with standard errors, and the share of
     held-out images whose explained class row was trained at all (coverage > 0).
Targets: on the held-out images, L-CAM-Fm and L-CAM-Img (the chosen defaults: --fm-default,
``--init cam --row-prior 1`` as ``lcam train --recipe data-size`` gives them) >= Grad-CAM on AD
(lower) and IC (higher) at 100/50/15% kept. The held-out table is also split by the explained
row: untrained (its start: CAM) or trained on other images.

``--folds 4`` repeats steps 1-4 for four disjoint blocks of 200 held-out classes of the same
shuffle (fold 0 is the single split) and pools the per-image results, so every image of the
sample is held out exactly once: 800 held-out images, standard errors halved, one target line
set on the pool.

Outputs are kept in --work (default /tmp/lcam-bench-heldout) and reused by a rerun with the
same settings (an interrupted training resumes); --fresh starts over. Each training and each
evaluation (one per checkpoint, one for the baselines) is its own part, so on a loaded machine
parts can run as parallel processes (--variants, --no-img, --train-only, --tables, --baselines "")
and a last run with the full settings prints the tables from what they left.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_DATA, local_ray_env, target, work_folder  # noqa: E402

RATIOS = (1.0, 0.5, 0.15)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lcam-bench-heldout"))
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="class split, training and evaluation subsets")
    p.add_argument("--heldout", type=int, default=200, help="classes held out (the rest train)")
    p.add_argument(
        "--folds",
        type=int,
        default=1,
        help="F > 1: F disjoint held-out blocks of the seed's class shuffle (fold 0 is the --folds 1 split), "
        "everything trained and evaluated per fold, the tables and targets on all folds' images pooled "
        "(4 x 200: every image of the sample held out once)",
    )
    p.add_argument("--insample", type=int, default=200, help="training images in the in-sample table")
    p.add_argument("--fm-epochs", type=int, default=80)
    p.add_argument("--fm-lr", type=float, default=3.0, help="one-cycle peak")
    p.add_argument("--fm-batch", type=int, default=16)
    p.add_argument(
        "--target",
        default="predicted",
        choices=("predicted", "label"),
        help="training target of both trainings (lcam train --target; the explained class is always the top-1)",
    )
    p.add_argument(
        "--variants",
        default="random:1,random:3,random:5,cam:1,cam:3,cam:5,cam:1:init:1",
        help="L-CAM-Fm variants INIT:K[:FILL[:PRIOR]] (K: top-K targets; FILL: --uncovered rule, default init; PRIOR: "
        "--row-prior, default 0; another rule or prior re-exports the INIT:K run, no second training)",
    )
    p.add_argument(
        "--transfer-ridge",
        default="auto",
        help="--uncovered transfer's ridge (auto: cross-validated on the trained rows)",
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="stop after training (e.g. parts trained by parallel runs of this script)",
    )
    p.add_argument(
        "--fm-default",
        default="cam,1,init,1",
        help="INIT,K[,FILL[,PRIOR]] of the L-CAM-Fm the targets are checked on (and Img starts from)",
    )
    p.add_argument(
        "--img-prior", type=float, default=None, help="L-CAM-Img's --row-prior (default: the L-CAM-Fm default's PRIOR)"
    )
    p.add_argument(
        "--img-images",
        type=int,
        default=200,
        help="training images for L-CAM-Img (seeded subset of the training classes)",
    )
    p.add_argument("--img-epochs", type=int, default=4)
    p.add_argument("--img-lr", type=float, default=0.1)
    p.add_argument("--img-batch", type=int, default=8)
    p.add_argument("--no-img", action="store_true", help="skip L-CAM-Img (its training is the costly part on CPU)")
    p.add_argument(
        "--baselines",
        default="gradcam,random",
        help="baselines next to L-CAM (gradcam is required: the paired differences)",
    )
    p.add_argument(
        "--tables",
        default="held-out,in-sample",
        help="evaluations to run now (each is kept; parallel runs can split them)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args()


def key(**kw) -> str:
    return hashlib.sha256(json.dumps(kw, sort_keys=True).encode()).hexdigest()[:10]


def split_by_class(data: str, heldout: int, seed: int, fold: int = 0) -> tuple[list[str], list[str], str]:
    """(training rows, held-out rows, header) of labels.tsv: a seeded shuffle of the classes,
    fold f holding out its f-th block of ``heldout`` classes (so folds 0..F-1 of one seed
    hold out disjoint classes: with F * heldout = all classes, every image is held out once)."""
    lines = Path(data, "labels.tsv").read_text().splitlines()
    header, rows = lines[0], [r for r in lines[1:] if r.strip()]
    classes = sorted({int(r.split("\t")[1]) for r in rows})
    random.Random(seed).shuffle(classes)
    held = set(classes[fold * heldout : (fold + 1) * heldout])
    return (
        [r for r in rows if int(r.split("\t")[1]) not in held],
        [r for r in rows if int(r.split("\t")[1]) in held],
        header,
    )


def pack_subset(data: str, rows: list[str], header: str, folder: Path) -> str:
    """Shards of these images: a folder of symbolic links + labels.tsv (outside the repository), packed."""
    from pipeline.shards.pack import pack_folder

    shards = folder / "shards"
    if (shards / "index.json").exists():
        return str(shards)
    src = folder / "images"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for r in rows:
        name = r.split("\t")[0]
        (src / name).symlink_to(Path(data, name).resolve())
    (src / "labels.tsv").write_text("\n".join([header, *rows]) + "\n")
    pack_folder(str(src), str(shards), samples_per_shard=100, progress=False, overwrite=True)
    return str(shards)


def per_image(csv_path: Path) -> dict[str, dict[str, tuple[float, list[float], int]]]:
    """method -> key -> (Y, [O@r], predicted class) from lcam eval's per_image.csv."""
    out: dict[str, dict[str, tuple[float, list[float], int]]] = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["method"], {})[r["key"]] = (
                float(r["Y"]),
                [float(r[f"O@{q:g}"]) for q in RATIOS],
                int(r["predicted"]),
            )
    return out


def paired(rows: dict, a: str, b: str, only=None) -> tuple[list[tuple[float, float]], list[tuple[float, float]], int]:
    """Per ratio (mean, standard error) of the per-image differences a - b: AD terms
    100 * max(0, Y - O) / Y and IC terms 100 * [O > Y], on the images both ran on
    (``only``: the set of image keys to keep)."""
    keys = sorted(k for k in set(rows[a]) & set(rows[b]) if only is None or k in only)
    n = len(keys)
    ad, ic = [], []
    for j in range(len(RATIOS)):
        da, di = [], []
        for k in keys:
            (ya, oa, _), (yb, ob, _) = rows[a][k], rows[b][k]
            da.append(100 * (max(0.0, ya - oa[j]) / ya - max(0.0, yb - ob[j]) / yb))
            di.append(100 * (float(oa[j] > ya) - float(ob[j] > yb)))
        for vals, out in ((da, ad), (di, ic)):
            mean = sum(vals) / n
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else float("nan")
            out.append((mean, sd / math.sqrt(n)))
    return ad, ic, n


def run_fold(
    args: argparse.Namespace, work: Path, fold: int
) -> tuple[dict[str, str], dict[str, dict], str, str] | None:
    """Steps 1-4 for one class split: (runs: name -> checkpoint, tables: label -> method ->
    image key -> (Y, [O@r], class), the L-CAM-Fm default's name, L-CAM-Img's), or None while
    an evaluation of it is left for another run (--tables)."""
    from pipeline.configs import EvalConfig, ExtractConfig, TrainConfig
    from pipeline.evaluation.run import evaluate
    from pipeline.extract.run import extract
    from pipeline.train.checkpoints import load_checkpoint
    from pipeline.train.run import train

    # ---- 1. split, shards, cache
    train_rows, held_rows, header = split_by_class(args.data, args.heldout, args.seed, fold)
    print(
        f"split by class (seed {args.seed}, fold {fold} of {args.folds}): {len(train_rows)} training images/classes, "
        f"{len(held_rows)} held-out",
        flush=True,
    )
    fkey = {"fold": fold} if fold else {}  # fold 0 keeps the keys of the single split (its parts are reused)
    split = key(seed=args.seed, heldout=args.heldout, **fkey)
    train_shards = pack_subset(args.data, train_rows, header, work / f"train-{split}")
    held_shards = pack_subset(args.data, held_rows, header, work / f"heldout-{split}")
    t0 = time.perf_counter()
    cache = str(work / f"train-{split}" / "cache")
    try:
        from pipeline.store.feature_cache import FeatureCache

        done = len(FeatureCache.open(cache)) == len(train_rows)
    except Exception:  # no cache yet
        done = False
    if not done:  # (a finished cache: no Ray start, so that parallel runs of this script stay light)
        extract(ExtractConfig(shards=train_shards, cache=cache, batch_size=16, progress=False))
    print(f"shards + feature cache of the training images: {time.perf_counter() - t0:.1f}s", flush=True)

    # ---- 2. L-CAM-Fm variants from the cache
    runs: dict[str, str] = {}
    variants = []
    for v in (v for v in args.variants.split(",") if v.strip()):
        init, k, *rest = (p.strip() for p in v.split(":"))
        variants.append((init, int(k), (rest[:1] or ["init"])[0], float((rest[1:2] or ["0"])[0])))

    tsuffix, tkey = ("", {}) if args.target == "predicted" else (f"-{args.target}", {"target": args.target})

    def variant_name(init: str, k: int, fill: str, prior: float) -> str:
        return f"fm-{init}-k{k}" + tsuffix + (f"-{fill}" if fill != "init" else "") + (f"-p{prior:g}" if prior else "")

    for init, k, fill, prior in sorted(
        variants, key=lambda v: (v[2], v[3]) != ("init", 0.0)
    ):  # the trained runs first, re-exports after
        name = f"fm-{init}-k{k}" + tsuffix
        run = (
            work
            / f"{name}-{key(split=split, epochs=args.fm_epochs, lr=args.fm_lr, batch=args.fm_batch, init=init, k=k, **tkey)}"
        )
        if (fill, prior) != (
            "init",
            0.0,
        ):  # the same training exported otherwise (lcam train --resume --uncovered/--row-prior)
            if not (run / f"epoch-{args.fm_epochs:03d}.pt").exists():
                raise SystemExit(
                    f"variant {init}:{k}:{fill}:{prior:g} re-exports the run of {init}:{k}: train that first (add it to --variants)"
                )
            src, name = run, variant_name(init, k, fill, prior)
            run = (
                work
                / f"{name}-{key(run=str(src), fill=fill, ridge=args.transfer_ridge, **({'prior': prior} if prior else {}))}"
            )
            if not (run / f"epoch-{args.fm_epochs:03d}.pt").exists():
                run.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / "checkpoint.pt", run / "checkpoint.pt")
                train(
                    TrainConfig(
                        out=str(run),
                        resume=True,
                        uncovered=fill,
                        transfer_ridge=args.transfer_ridge,
                        row_prior=prior,
                        progress=False,
                    )
                )
            rec = load_checkpoint(str(run / "checkpoint.pt"))["extra"]["uncovered"]
            print(
                f"{name}: {init}:{k} re-exported with --uncovered {fill} --row-prior {prior:g}: {len(rec['rows'])} rows filled, "
                f"{rec.get('blended', 0)} trained rows pulled towards their start"
                + (f", ridge {rec['ridge']:g}" if "ridge" in rec else "")
                + (
                    " (5-fold cosine on trained rows, per ridge: "
                    + ", ".join(
                        f"{r}: {c:.3f}" for r, c in sorted(rec["cv_cosine"].items(), key=lambda rc: float(rc[0]))
                    )
                    + ")"
                    if "cv_cosine" in rec
                    else ""
                ),
                flush=True,
            )
            runs[name] = str(run / "checkpoint.pt")
            continue
        if not (run / f"epoch-{args.fm_epochs:03d}.pt").exists():
            t0 = time.perf_counter()
            resume = (run / "checkpoint.pt").exists()  # an interrupted run continues exactly
            s = train(
                TrainConfig(
                    method="fm",
                    out=str(run),
                    cache=cache,
                    epochs=args.fm_epochs,
                    lr=args.fm_lr,
                    batch_size=args.fm_batch,
                    schedule="onecycle",
                    target=args.target,
                    view="first",
                    seed=args.seed,
                    init=init,
                    targets="top-k" if k > 1 else "single",
                    top_k=k if k > 1 else None,
                    resume=resume,
                    progress=False,
                )
            )
            print(
                f"{name}: {args.fm_epochs} epochs, {time.perf_counter() - t0:.1f}s{' (resumed)' if resume else ''}; last epoch loss "
                f"{s.last_epoch['loss']:.3f} (ce {s.last_epoch['ce']:.3f}, area {s.last_epoch['area']:.3f})",
                flush=True,
            )
        runs[name] = str(run / "checkpoint.pt")
    d_init, d_k, *d_rest = args.fm_default.split(",")
    d_fill, d_prior = (d_rest[:1] or ["init"])[0], float((d_rest[1:2] or ["0"])[0])
    fm_default = variant_name(d_init, int(d_k), d_fill, d_prior)
    img_prior = d_prior if args.img_prior is None else args.img_prior
    # its uncovered rows: the Fm run's (--uncovered init of --init-from)
    img_name = (
        "img" + fm_default[len(f"fm-{d_init}-k{int(d_k)}") :] + (f"-ip{img_prior:g}" if img_prior != d_prior else "")
    )
    if fm_default not in runs and not args.no_img:
        raise SystemExit(f"--fm-default {args.fm_default} is not among the variants trained")

    # ---- 3. L-CAM-Img, warm-started from the chosen L-CAM-Fm
    if not args.no_img:
        img_rows = sorted(random.Random(args.seed + 1).sample(train_rows, min(args.img_images, len(train_rows))))
        img_shards = pack_subset(
            args.data, img_rows, header, work / f"img-data-{key(split=split, n=len(img_rows), seed=args.seed)}"
        )
        run = (
            work
            / f"img-{key(fm=runs[fm_default], n=len(img_rows), epochs=args.img_epochs, lr=args.img_lr, batch=args.img_batch, **({'prior': img_prior} if img_prior else {}))}"
        )
        if not (run / f"epoch-{args.img_epochs:03d}.pt").exists():
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.perf_counter()
            s = train(
                TrainConfig(
                    method="img",
                    out=str(run),
                    shards=img_shards,
                    init_from=runs[fm_default],
                    epochs=args.img_epochs,
                    lr=args.img_lr,
                    batch_size=args.img_batch,
                    schedule="onecycle",
                    target=args.target,
                    augment="center",
                    seed=args.seed,
                    row_prior=img_prior,
                    progress=False,
                )
            )
            print(
                f"L-CAM-Img (lcam train --method img --init-from {fm_default}): {args.img_epochs} epochs on {len(img_rows)} training images, "
                f"{time.perf_counter() - t0:.1f}s; last epoch loss {s.last_epoch['loss']:.3f}",
                flush=True,
            )
        runs[img_name] = str(run / "checkpoint.pt")
    if args.train_only:
        return None
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the evaluations run in this process (the local engine)

    # ---- 4. the two tables: one evaluation per L-CAM checkpoint and one for the baselines, on the
    # same images (same shards, limit and seed), so parts can run in parallel processes and be reused
    baselines = tuple(s.strip() for s in args.baselines.split(",") if s.strip())
    tables: dict[str, dict] = {}
    wanted = {t.strip() for t in args.tables.split(",") if t.strip()}
    for label, shards, limit in (("held-out", held_shards, None), ("in-sample", train_shards, args.insample)):
        rows: dict[str, dict] = {}
        for name, url in ([("baselines", None)] if baselines else []) + list(runs.items()):
            out = (
                work
                / f"eval-{label}-{name}-{key(url=url, baselines=baselines if url is None else (), limit=limit, seed=args.seed, **fkey)}"
            )
            if not (out / "results.json").exists():
                if label not in wanted:
                    break
                t0 = time.perf_counter()
                evaluate(
                    EvalConfig(
                        shards=shards,
                        out=str(out),
                        checkpoints=[f"{name}={url}"] if url else [],
                        methods=() if url else baselines,
                        limit=limit,
                        seed=args.seed,
                        batch_size=args.batch_size,
                        engine="local",
                        progress=False,
                    )
                )
                print(f"eval {label} {name}: {time.perf_counter() - t0:.1f}s ({out})", flush=True)
            for mid, per_key in per_image(out / "per_image.csv").items():
                # keyed by fold too: an image trains in one fold and is held out (or in-sample) in another
                rows.setdefault(mid, {}).update({f"{fold}/{k}": v for k, v in per_key.items()})
        else:
            tables[label] = rows
    if len(tables) < 2:
        print(
            f"fold {fold}: tables complete: {sorted(tables) or 'none'}; run again with --tables for the rest",
            flush=True,
        )
        return None
    return runs, tables, fm_default, img_name


def summary(rows: dict[str, tuple[float, list[float], int]]) -> tuple[list[float], list[float]]:
    """AD and IC per ratio of one method's per-image rows (lcam eval's formulas)."""
    n = len(rows)
    ad = [100 / n * sum(max(0.0, y - o[j]) / y for y, o, _ in rows.values()) for j in range(len(RATIOS))]
    ic = [100 / n * sum(float(o[j] > y) for y, o, _ in rows.values()) for j in range(len(RATIOS))]
    return ad, ic


def main() -> int:
    args = parse_args()
    local_ray_env()
    from pipeline.train.checkpoints import load_checkpoint

    work = work_folder(args.work, args.fresh)
    t_all = time.perf_counter()
    load = os.getloadavg()
    print(
        f"ImageNet sample {args.data}; EfficientNet-Lite0; {os.cpu_count()} cores; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
        flush=True,
    )
    n_classes = len({int(r.split("\t")[1]) for r in split_by_class(args.data, 0, args.seed)[0]})
    if args.folds < 1 or args.folds * args.heldout > n_classes:
        raise SystemExit(f"--folds {args.folds} x --heldout {args.heldout} classes: more than the sample has")

    # ---- 1-4 per fold; the tables pool the folds' images (each held out in exactly one fold)
    tables: dict[str, dict] = {"held-out": {}, "in-sample": {}}
    trained: dict[tuple[str, str], set[str]] = {}  # (table, method) -> image keys whose explained class row trained
    runs: dict[str, str] = {}
    complete = 0
    for fold in range(args.folds):
        done = run_fold(args, work, fold)
        if done is None:
            continue
        complete += 1
        fold_runs, fold_tables, fm_default, img_name = done
        for label, rows in fold_tables.items():
            for mid, per_key in rows.items():
                tables[label].setdefault(mid, {}).update(per_key)
        for mid, url in fold_runs.items():
            runs[mid] = url
            cov = load_checkpoint(url)["coverage"]
            if cov is not None:
                for label, rows in fold_tables.items():
                    trained.setdefault((label, mid), set()).update(
                        k for k, (_, _, c) in rows[mid].items() if int(cov[c]) > 0
                    )
    if complete < args.folds:
        print(f"{complete} of {args.folds} folds complete: run again for the tables", flush=True)
        return 0
    # ---- 5. report (pooled over the folds)
    baselines = [m for m in tables["held-out"] if m not in runs]
    ids = list(runs) + baselines
    print("\n## AD / IC: held-out classes vs in-sample (the training images)\n")
    print(
        "AD = 100/N sum max(0, Y - O)/Y (lower better), IC = 100/N sum [O > Y] (higher better); softmax of the top-1 class, "
        "pixel-space masking, keep 100/50/15%.\n"
    )
    print(
        "| method | N held-out | AD 100/50/15 held-out | IC 100/50/15 held-out | N in-sample | AD 100/50/15 in-sample | IC 100/50/15 in-sample |"
    )
    print("|---|--:|---|---|--:|---|---|")
    for mid in ids:
        cells = [mid]
        for label in ("held-out", "in-sample"):
            ad, ic = summary(tables[label][mid])
            cells += [
                str(len(tables[label][mid])),
                " / ".join(f"{v:.1f}" for v in ad),
                " / ".join(f"{v:.1f}" for v in ic),
            ]
        print("| " + " | ".join(cells) + " |")
    for label in ("held-out", "in-sample"):
        rows = tables[label]
        print(f"\n## {label}: paired differences against Grad-CAM (mean +- standard error over the same images)\n")
        print("| method | N | AD diff 100% | 50% | 15% | IC diff 100% | 50% | 15% | explained class row trained |")
        print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        for mid in runs:
            ad, ic, n = paired(rows, mid, "gradcam")
            keys = trained.get((label, mid), set())
            print(
                f"| {mid} | {n} | "
                + " | ".join(f"{m:+.2f} +- {s:.2f}" for m, s in ad)
                + " | "
                + " | ".join(f"{m:+.1f} +- {s:.1f}" for m, s in ic)
                + f" | {len(keys)}/{len(rows[mid])} |"
            )
            if label == "held-out" and 1 < len(keys) < len(rows[mid]) - 1:
                # the two kinds of held-out image: explained by a row that never trained (its
                # start, e.g. CAM) or by one trained on other images (a training image predicted as it)
                for part, keep in (("row trained", keys), ("row untrained", set(rows[mid]) - keys)):
                    ad, ic, n = paired(rows, mid, "gradcam", only=keep)
                    print(
                        f"| {mid}, {part} | {n} | "
                        + " | ".join(f"{m:+.2f} +- {s:.2f}" for m, s in ad)
                        + " | "
                        + " | ".join(f"{m:+.1f} +- {s:.1f}" for m, s in ic)
                        + " | |"
                    )
    others = [m for m in runs if m != fm_default]
    if fm_default in runs and others:
        # what the default's choices buy: every other variant against it, image by image
        print(f"\n## every other L-CAM minus the default ({fm_default}), paired\n")
        print("| method | table | N | AD diff 100% | 50% | 15% | IC diff 100% | 50% | 15% |")
        print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
        for mid in others:
            for label in ("held-out", "in-sample"):
                ad, ic, n = paired(tables[label], mid, fm_default)
                print(
                    f"| {mid} | {label} | {n} | "
                    + " | ".join(f"{m:+.2f} +- {s:.2f}" for m, s in ad)
                    + " | "
                    + " | ".join(f"{m:+.1f} +- {s:.1f}" for m, s in ic)
                    + " |"
                )
    print(f"\nwhole benchmark: {time.perf_counter() - t_all:.0f}s; load average now {os.getloadavg()[0]:.1f}\n")

    held = tables["held-out"]
    checked = [m for m in (fm_default, img_name) if m in runs]
    for mid in checked:
        # every held-out image, and (second) those whose explained class no training sample had:
        # the explainer never saw that class (the others are predicted as a class some training
        # image was predicted as, so their row trained on another image)
        untrained = set(held[mid]) - trained[("held-out", mid)] if ("held-out", mid) in trained else None
        for part, only in (("heldout", None), ("heldout-untrained-row", untrained)):
            if part != "heldout" and only is None:
                continue
            ad, ic, _ = paired(held, mid, "gradcam", only=only)
            for j, q in enumerate(RATIOS):
                target(f"{part}_{mid}_minus_gradcam_AD@{q * 100:g}%", ad[j][0], "<=", 0.0)
            for j, q in enumerate(RATIOS):
                target(f"{part}_{mid}_minus_gradcam_IC@{q * 100:g}%", ic[j][0], ">=", 0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
