"""Faithful on new images: L-CAM on photos of trained classes that training never saw (issue 28).

    .venv/bin/python benchmarks/faithfulness.py [--data DIR] [--work DIR] [--curve 5,25,90] [--eval-limit N] ...

Data: Tiny ImageNet's 200 classes (``--data``, a folder with ``train/`` and ``val/``, each with
``labels.tsv``: file, class_index, wnid, name, x0 y0 x1 y1; used by path, never copied into the
repository). EfficientNet-Lite0 with its packaged ImageNet weights. As a user would, with the
project's commands:

  1. ``lcam shards``: ``train/`` packed one image per class per shard (shard r holds every
     class's r-th image: 100 shards of 200), ``val/`` likewise (10 shards);
  2. ``lcam extract``: one feature cache of ``train/`` (all 20,000; no cache of ``val/`` is needed);
  3. ``lcam train --val-shards V --limit-shards N`` per learning-curve point N (images per class)
     and per candidate setting (``--candidates``): the last V shards of ``train/`` (V images per
     class) are held back; every epoch's validation loss on them picks the run's ``best.pt``, and
     the lowest best validation loss picks the setting: ``val/`` is never used to choose anything;
  4. the untrained CAM rows (``lcam train --init cam --max-steps 0``: the start of the default);
  5. ``lcam eval`` on a seeded subset of ``val/`` (``--eval-limit``; the same images for every
     evaluation): every chosen L-CAM, the defaults, CAM, Grad-CAM, Grad-CAM++ and a random map;
  6. paired per-image differences with standard errors, against Grad-CAM and against CAM, split by
     whether the explained (predicted) class row trained; the learning curve as a PNG.

Targets (on ``val/``, the defaults trained on all of ``train/`` but the held-back part): AD at 50%
below Grad-CAM's by >= 2 paired standard errors, IC at 50% above Grad-CAM's, AD at 100% and 15% no
worse than Grad-CAM's by more than one s.e., AD at 50% below CAM's; and the training time on the
cached samples. Localisation metrics (pointing game, energy pointing game, box IoU) are reported
when ``lcam eval`` writes them. The cost of steps 5-6 grows with ``--eval-limit`` (the validation
split), not with the training data; training reads the cache only.

Parts are kept in ``--work`` and reused by a rerun (a finished training or evaluation is not redone).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import local_ray_env, target  # noqa: E402

RATIOS = (1.0, 0.5, 0.15)
LOCALISATION = ("pointing_game", "energy_pointing_game", "box_iou")  # lcam eval's names, when it offers them
# Candidate settings for the choice on the held-back part: name -> extra `lcam train` flags.
CANDIDATES = {
    "default": "",
    "spec": "--recipe spec",
    "decay-start": "--decay-to start",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/tiny-imagenet")
    p.add_argument(
        "--work",
        default="/tmp/lcam-bench-faithful",
        help="shards, cache, runs and evaluations (outside the repository)",
    )
    p.add_argument(
        "--held-back",
        default="10",
        help="images per class of train/ held back for validation (the last shards); "
        "one number, or one per --curve point (comma-separated)",
    )
    p.add_argument("--curve", default="5,25,90", help="learning-curve points: training images per class")
    p.add_argument(
        "--candidates",
        default=None,
        help="settings to choose among on the held-back part, NAME=FLAGS;... (default: the script's CANDIDATES); "
        "'default' (no flags) is always trained",
    )
    p.add_argument(
        "--eval-limit", type=int, default=400, help="val/ images evaluated (seeded subset; the protocol's cost)"
    )
    p.add_argument("--eval-points", default=None, help="curve points evaluated on val/ (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=str(Path(__file__).resolve().parent / "faithfulness-curve.png"))
    p.add_argument("--no-eval", action="store_true", help="stop after the trainings (the choice on the held-back part)")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="use the shards the cache already holds (e.g. an extraction still running): no extraction; the curve "
        "points must fit in them",
    )
    return p.parse_args()


def cli(argv: list[str]) -> None:
    from jobs.cli import main as cli_main

    print("$ lcam " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = cli_main(argv)
    if rc:
        raise SystemExit(f"lcam {argv[0]} failed ({rc})")


def interleaved_folder(src: Path, out: Path) -> tuple[Path, int]:
    """Symbolic links named r<rank>_<file> + labels.tsv, so that sorted file order is rank-major:
    packed with one shard per rank, shard r holds every class's r-th image. Returns (folder, classes)."""
    lines = (src / "labels.tsv").read_text().splitlines()
    header, rows = lines[0], [r for r in lines[1:] if r.strip()]
    rank: collections.Counter = collections.Counter()
    named = []
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        f, cls = r.split("\t")[:2]
        name = f"r{rank[cls]:03d}_{f}"
        rank[cls] += 1
        if not (out / name).exists():
            (out / name).symlink_to((src / f).resolve())
        named.append(name + "\t" + "\t".join(r.split("\t")[1:]))
    (out / "labels.tsv").write_text("\n".join([header, *sorted(named)]) + "\n")
    if len(set(rank.values())) != 1:
        raise SystemExit(
            f"{src}: classes have different image counts ({sorted(set(rank.values()))}); the shards would not be one rank each"
        )
    return out, len(rank)


def shards_of(data: Path, part: str, work: Path) -> tuple[str, int]:
    shards = work / f"shards-{part}"
    folder, classes = interleaved_folder(data / part, work / f"src-{part}")
    if not (shards / "index.json").exists():
        cli(["shards", str(folder), str(shards), "--samples-per-shard", str(classes), "--no-progress"])
    return str(shards), classes


def epochs_of(run: Path) -> list[dict]:
    return [
        r
        for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "epoch"
    ]


def train_run(work: Path, cache: str, name: str, flags: str, n: int, held: int) -> dict:
    """One `lcam train` (kept); returns its best epoch's record, its path and its training time."""
    run = work / "runs" / (f"n{n}-{name}" if held == 10 else f"n{n}-h{held}-{name}")
    done = run / "done.json"
    if not done.exists():
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        cli(
            [
                "train",
                "--method",
                "fm",
                "--cache",
                cache,
                "--out",
                str(run),
                "--val-shards",
                str(held),
                "--limit-shards",
                str(n),
                "--target",
                "predicted",
                "--no-progress",
                *shlex.split(flags),
            ]
        )
        rec = epochs_of(run)
        best = min(rec, key=lambda r: r["val_loss"])
        done.write_text(
            json.dumps(
                {
                    "seconds": time.perf_counter() - t0,
                    "best": best,
                    "first": rec[0],
                    "last": rec[-1],
                    "epochs": len(rec),
                }
            )
        )
    info = json.loads(done.read_text())
    info["checkpoint"] = str(run / "best.pt")
    info["run"] = str(run)
    return info


def per_image(path: Path) -> dict[str, dict[str, dict]]:
    """method -> image key -> {Y, O (per ratio), predicted, and any localisation columns}."""
    out: dict[str, dict[str, dict]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {"Y": float(r["Y"]), "O": [float(r[f"O@{q:g}"]) for q in RATIOS], "predicted": int(r["predicted"])}
            for col in LOCALISATION:
                if r.get(col) not in (None, ""):
                    row[col] = float(r[col])
            out.setdefault(r["method"], {})[r["key"]] = row
    return out


def mean_se(vals: list[float]) -> tuple[float, float]:
    n = len(vals)
    m = sum(vals) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1) / n) if n > 1 else float("nan"))


def ad_term(r: dict, j: int) -> float:
    return 100 * max(0.0, r["Y"] - r["O"][j]) / r["Y"]


def ic_term(r: dict, j: int) -> float:
    return 100 * float(r["O"][j] > r["Y"])


def paired(rows: dict, a: str, b: str, keys: set[str] | None = None) -> tuple[list, list, int]:
    """Per ratio (mean, s.e.) of the per-image AD and IC differences a - b."""
    ks = sorted(k for k in set(rows[a]) & set(rows[b]) if keys is None or k in keys)
    ad = [mean_se([ad_term(rows[a][k], j) - ad_term(rows[b][k], j) for k in ks]) for j in range(len(RATIOS))]
    ic = [mean_se([ic_term(rows[a][k], j) - ic_term(rows[b][k], j) for k in ks]) for j in range(len(RATIOS))]
    return ad, ic, len(ks)


def paired_column(rows: dict, a: str, b: str, col: str) -> tuple[tuple[float, float], int]:
    """(mean, s.e.) of the per-image difference a - b of one localisation column, in percentage
    points, over the images both have it for (a box inside the crop)."""
    ks = sorted(k for k in set(rows[a]) & set(rows[b]) if col in rows[a][k] and col in rows[b][k])
    return mean_se([100 * (rows[a][k][col] - rows[b][k][col]) for k in ks]), len(ks)


def fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:+.2f} ± {ms[1]:.2f}"


def main() -> int:
    args = parse_args()
    local_ray_env()
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(
        f"data {data}; work {work}; EfficientNet-Lite0; {os.cpu_count()} cores; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
        flush=True,
    )
    t_all = time.perf_counter()

    # 1-2. shards and the training cache
    train_shards, classes = shards_of(data, "train", work)
    val_shards, _ = shards_of(data, "val", work)
    cache = str(work / "cache-train")
    from pipeline.store.feature_cache import FeatureCache

    try:
        have = len(FeatureCache.open(cache))
    except Exception:  # no cache yet
        have = 0
    n_train_images = sum(1 for line in (data / "train" / "labels.tsv").read_text().splitlines()[1:] if line.strip())
    if have < n_train_images and not args.cached_only:
        t0 = time.perf_counter()
        cli(["extract", train_shards, cache, "--no-progress"])
        print(f"extraction: {time.perf_counter() - t0:.0f}s", flush=True)
    per_class = (have if args.cached_only else n_train_images) // classes
    curve = [int(v) for v in args.curve.split(",")]
    held_list = [int(v) for v in args.held_back.split(",")]
    held_back = dict(zip(curve, held_list if len(held_list) == len(curve) else held_list[:1] * len(curve)))
    if any(n + held_back[n] > per_class for n in curve):
        raise SystemExit(
            f"--curve {args.curve} with --held-back {args.held_back}: the cache has {per_class} images per class"
        )
    if args.cached_only and have < n_train_images:
        print(f"--cached-only: {have} of {n_train_images} images of train/ cached ({per_class} per class)", flush=True)

    # 3. per curve point: the candidates, chosen on the held-back part
    cands = dict(CANDIDATES)
    if args.candidates:
        cands = {"default": ""}
        for item in (i for i in args.candidates.split(";") if i.strip()):
            name, _, flags = item.partition("=")
            cands[name.strip()] = flags.strip()
    trained: dict[int, dict[str, dict]] = {}
    for n in curve:
        trained[n] = {name: train_run(work, cache, name, flags, n, held_back[n]) for name, flags in cands.items()}
    print("\n## The choice on the held-back part of train/ (validation loss of best.pt; lower is better)\n")
    print("Held back: the last H images per class of train/; training on the first N per class of the rest.\n")
    print(
        "| N per class | H | setting | flags | epochs | best epoch | val loss first / best / last | val CE best | val area best | train loss first / last | training time |"
    )
    print("|--:|--:|---|---|--:|--:|---|--:|--:|---|--:|")
    chosen: dict[int, str] = {}
    for n in curve:
        chosen[n] = min(trained[n], key=lambda name: trained[n][name]["best"]["val_loss"])
        for name, info in trained[n].items():
            b, f, last = info["best"], info["first"], info["last"]
            print(
                f"| {n} | {held_back[n]} | {name}{' (chosen)' if name == chosen[n] else ''} | `{cands[name] or '(defaults)'}` | {info['epochs']} | {b['epoch']} | "
                f"{f['val_loss']:.4f} / {b['val_loss']:.4f} / {last['val_loss']:.4f} | {b['val_ce']:.3f} | {b['val_area']:.3f} | "
                f"{f['loss']:.4f} / {last['loss']:.4f} | {info['seconds']:.0f}s |"
            )
    if args.no_eval:
        return 0

    # 4. the untrained CAM rows: the default's start
    cam_run = work / "runs" / "cam-start"
    if not (cam_run / "checkpoint.pt").exists():
        cli(
            [
                "train",
                "--method",
                "fm",
                "--cache",
                cache,
                "--out",
                str(cam_run),
                "--init",
                "cam",
                "--max-steps",
                "0",
                "--no-progress",
            ]
        )

    # 5. lcam eval on the same val/ images: one evaluation per checkpoint, one for the baselines
    points = [int(v) for v in args.eval_points.split(",")] if args.eval_points else curve
    checkpoints = {"cam": str(cam_run / "checkpoint.pt")}
    for n in points:
        checkpoints[f"lcam-n{n}"] = trained[n]["default"]["checkpoint"]
        if chosen[n] != "default":
            checkpoints[f"lcam-n{n}-{chosen[n]}"] = trained[n][chosen[n]]["checkpoint"]
    common = ["--limit", str(args.eval_limit), "--seed", str(args.seed), "--engine", "local", "--no-progress"]
    rows: dict[str, dict] = {}
    for name, url in [("baselines", None), *checkpoints.items()]:
        out = work / "eval" / f"{name}-limit{args.eval_limit}-seed{args.seed}"
        if not (out / "per_image.csv").exists():
            t0 = time.perf_counter()
            extra = (
                ["--methods", "gradcam,gradcam++,random"]
                if url is None
                else ["--checkpoint", f"{name}={url}", "--methods", "none"]
            )
            cli(["eval", val_shards, str(out), *extra, *common])
            print(f"eval {name}: {time.perf_counter() - t0:.0f}s", flush=True)
        rows.update(per_image(out / "per_image.csv"))

    # 6. tables
    from pipeline.train.checkpoints import load_checkpoint

    coverage = {name: load_checkpoint(url)["coverage"] for name, url in checkpoints.items() if name != "cam"}
    methods = [m for m in checkpoints] + ["gradcam", "gradcam++", "random"]
    n_img = len(rows["gradcam"])
    print(f"\n## AD / IC on val/ ({n_img} images of the 200 trained classes, never trained on)\n")
    print(
        "AD = 100/N Σ max(0, Y − O)/Y (lower better), IC = 100/N Σ [O > Y] (higher better); softmax of the top-1 class, "
        "pixel-space masking, keep 100/50/15%.\n"
    )
    loc = [c for c in LOCALISATION if any(c in r for r in rows["gradcam"].values())]
    print("| method | N | AD 100 / 50 / 15% | IC 100 / 50 / 15% |" + "".join(f" {c} |" for c in loc))
    print("|---|--:|---|---|" + "--:|" * len(loc))
    for m in methods:
        r = rows[m]
        ad = [sum(ad_term(v, j) for v in r.values()) / len(r) for j in range(3)]
        ic = [sum(ic_term(v, j) for v in r.values()) / len(r) for j in range(3)]
        cells = [
            f"{sum(v[c] for v in r.values() if c in v) / max(1, sum(1 for v in r.values() if c in v)):.3f}" for c in loc
        ]
        print(
            f"| {m} | {len(r)} | "
            + " / ".join(f"{v:.1f}" for v in ad)
            + " | "
            + " / ".join(f"{v:.1f}" for v in ic)
            + " |"
            + "".join(f" {c} |" for c in cells)
        )
    for ref in ("gradcam", "cam"):
        print(
            f"\n## Paired differences against {ref} on val/ (mean ± standard error over the same images; AD: negative is better, IC: positive)\n"
        )
        print("| method | images | N | AD 100% | AD 50% | AD 15% | IC 100% | IC 50% | IC 15% |")
        print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
        for m in methods:
            if m == ref:
                continue
            parts = [("all", None)]
            if m in coverage and coverage[m] is not None:
                row_trained = {k for k, v in rows[m].items() if int(coverage[m][v["predicted"]]) > 0}
                parts += [("row trained", row_trained), ("row untrained", set(rows[m]) - row_trained)]
            for part, keys in parts:
                if keys is not None and len(keys) < 2:
                    continue
                ad, ic, n = paired(rows, m, ref, keys)
                print(
                    f"| {m} | {part} | {n} | "
                    + " | ".join(fmt(v) for v in ad)
                    + " | "
                    + " | ".join(fmt(v) for v in ic)
                    + " |"
                )
    if loc:
        print(
            "\n## Localisation against the boxes, paired differences on val/ (percentage points, mean ± s.e.; "
            "higher is better)\n"
        )
        print("| method | minus | N | " + " | ".join(loc) + " |")
        print("|---|---|--:|" + "--:|" * len(loc))
        for ref in ("gradcam", "cam"):
            for m in methods:
                if m == ref:
                    continue
                cells, n = [], 0
                for c in loc:
                    ms, n = paired_column(rows, m, ref, c)
                    cells.append(fmt(ms))
                print(f"| {m} | {ref} | {n} | " + " | ".join(cells) + " |")
    print(f"\nwhole benchmark: {time.perf_counter() - t_all:.0f}s; load average now {os.getloadavg()[0]:.1f}\n")

    # the learning curve: L-CAM (defaults) minus Grad-CAM and minus CAM, AD at 50%, per N
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for j, (metric, term) in enumerate(
            (("AD at 50% (lower is better)", ad_term), ("IC at 50% (higher is better)", ic_term))
        ):
            for ref, style in (("gradcam", "o-"), ("cam", "s--")):
                ms = [
                    mean_se(
                        [
                            term(rows[f"lcam-n{n}"][k], 1) - term(rows[ref][k], 1)
                            for k in sorted(set(rows[f"lcam-n{n}"]) & set(rows[ref]))
                        ]
                    )
                    for n in points
                ]
                ax[j].errorbar(
                    points,
                    [m for m, _ in ms],
                    yerr=[s for _, s in ms],
                    fmt=style,
                    capsize=3,
                    label=f"L-CAM-Fm minus {ref}",
                )
            ax[j].axhline(0, color="grey", lw=0.8)
            ax[j].set_xscale("log")
            ax[j].set_xticks(points, [str(n) for n in points])
            ax[j].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax[j].set_xlabel("training images per class")
            ax[j].set_title(metric)
            ax[j].legend(fontsize=8)
        fig.suptitle(
            f"L-CAM-Fm (lcam train defaults) on {n_img} val/ images of Tiny ImageNet's classes, paired differences ± s.e."
        )
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)
        print(f"learning curve: {args.plot}")
    except ImportError:
        print("matplotlib missing: no learning-curve plot")

    # targets: the defaults on the largest curve point
    top = f"lcam-n{max(points)}"
    ad, ic, _ = paired(rows, top, "gradcam")
    target(f"{top}_minus_gradcam_AD@50%_in_se", ad[1][0] / ad[1][1], "<=", -2.0)
    target(f"{top}_minus_gradcam_IC@50%", ic[1][0], ">=", 0.0)
    target(f"{top}_minus_gradcam_AD@100%_in_se", ad[0][0] / ad[0][1], "<=", 1.0)
    target(f"{top}_minus_gradcam_AD@15%_in_se", ad[2][0] / ad[2][1], "<=", 1.0)
    adc, _, _ = paired(rows, top, "cam")
    target(f"{top}_minus_cam_AD@50%", adc[1][0], "<=", 0.0)
    if "energy_pointing_game" in loc:
        (epg, epg_se), _ = paired_column(rows, top, "gradcam", "energy_pointing_game")
        target(f"{top}_minus_gradcam_energy_pointing_game_points", epg, ">=", 0.0)
    secs = trained[max(points)]["default"]["seconds"]
    target(f"training_seconds_{max(points) * classes}_cached_samples", secs, "<=", 600.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
