"""``evaluate(cfg)``: plan, score every batch with every method and metric, write the outputs.

Outputs, each written atomically under the output folder: ``results.md`` (the tables, the
formulas, N and the protocol), ``results.json`` (every number, protocol, N, versions,
seeds, timings), ``adic.png`` (bar chart) and ``per_image.csv`` (Y and every metric's
per-image values per method: where explanations fail).
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..configs import EvalConfig
from ..errors import UserError
from ..fs import StorageOptions, join, write_bytes_atomic, write_json_atomic
from ..progress import Progress, say
from .config import MethodSpec, method_specs, methods_for_machine, resolve_backbone
from .coverage import check_coverage, coverage_markdown, coverage_split
from .engine import Evaluator, choose_engine, pick_device, run_local, run_ray
from .metrics.adic import pct, subset_table
from .metrics.base import box_metrics, build_metrics, optional_metrics
from .plan import DecodedBatch, plan_batches
from .render import render_charts, render_csv, render_markdown
from .results import Collector, MethodResult, aggregate, jsonable, versions

FORMAT = "lcam-eval/1"


class MethodProgress:
    """Progress of each costly method (RISE, Score-CAM: thousands of forwards per image) in
    backbone forwards, with rate and ETA, since one of their batches can take many minutes."""

    def __init__(self, specs: Sequence[MethodSpec], backbone: Any, selected: int, enabled: bool) -> None:
        from lcam.cam_methods.base import build_method

        self.bars: dict[str, Progress] = {}
        if not enabled:
            return
        channels = backbone.feature_shape[0]
        for s in specs:
            if s.kind == "lcam":
                continue
            per_image = build_method(s.kind, backbone, **dict(s.kwargs)).forwards_per_image(channels)
            if per_image:
                images = min(s.limit, selected) if s.limit is not None else selected
                self.bars[s.id] = Progress(
                    images * per_image, True, what=f"eval {s.label}", unit="forwards", every=10.0, bar=False
                )

    def __bool__(self) -> bool:
        return bool(self.bars)

    def update(self, method_id: str, forwards: int) -> None:
        bar = self.bars.get(method_id)
        if bar is not None:
            if bar.done == 0:  # the rate counts from the method's first forward, not from Ray's start-up
                bar.t0 = bar.last = time.perf_counter()
            bar.update(forwards)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@dataclass
class EvalSummary:
    out: str
    files: dict[str, str]
    images: int
    skipped: int
    seconds: float
    methods: list[MethodResult]
    ratios: tuple[float, ...]

    def lines(self) -> list[str]:
        head = (
            f"{'method':<22} {'N':>5}  "
            + "  ".join(f"AD{pct(r):>5}" for r in self.ratios)
            + "  "
            + "  ".join(f"IC{pct(r):>5}" for r in self.ratios)
        )
        out = [
            f"evaluated {self.images} images in {self.seconds:.1f}s"
            + (f" ({self.skipped} skipped: undecodable)" if self.skipped else ""),
            head,
        ]
        for m in self.methods:
            out.append(
                f"{m.label:<22} {m.n:>5}  "
                + "  ".join(f"{v:7.2f}" for v in m.ad)
                + "  "
                + "  ".join(f"{v:7.2f}" for v in m.ic)
            )
        boxes = [k for k in box_metrics() if any(k in m.metrics for m in self.methods)]
        if boxes:  # localisation against the shards' boxes, percent
            out.append(f"{'method':<22} {'N':>5}  " + "  ".join(f"{k:>20}" for k in boxes))
            for m in self.methods:
                n = max(m.metrics[k].get("n", 0) for k in boxes)
                out.append(
                    f"{m.label:<22} {n:>5}  "
                    + "  ".join(f"{m.metrics[k].get('mean', float('nan')):20.2f}" for k in boxes)
                )
        out += [f"{k:<13} {v}" for k, v in self.files.items()]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "files": self.files,
            "images": self.images,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "methods": [m.to_dict(self.ratios) for m in self.methods],
        }


def protocol_dict(ratios: Sequence[float], n: int) -> dict[str, Any]:
    from lcam.metrics.adic import ProtocolInfo

    d = ProtocolInfo(ratios=tuple(ratios), target="predicted", num_images=n).to_dict()
    d["preprocessing"] = "resize shorter side 256 (bilinear, PIL), centre crop 224, [0, 1] (torchvision-exact)"
    d["class"] = "the backbone's top-1 class on the clean image, shared by every method"
    return d


def check_metrics(cfg: EvalConfig) -> None:
    unknown = sorted(set(cfg.metrics) - set(optional_metrics()))
    if unknown:
        raise UserError(
            f"unknown metric(s) {', '.join(unknown)}; optional metrics: {', '.join(optional_metrics())} (AD/IC always runs)"
        )
    try:
        build_metrics(cfg.ratios, cfg.metrics, cfg.metric_options)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def on_cpu(cfg: EvalConfig, engine: str) -> bool:
    """Whether the evaluation's model work runs on CPUs: the local device, or a Ray cluster without GPUs."""
    if engine == "local":
        return pick_device(cfg.device) == "cpu"
    import ray

    from ..raykit import ensure_ray

    ensure_ray()
    return not ray.cluster_resources().get("GPU", 0)


def evaluate(cfg: EvalConfig) -> EvalSummary:
    """Plan, score every batch with every method, write the outputs; see the module docstring."""
    from ..shards.read import require_shards

    t_start = time.perf_counter()
    ratios = tuple(float(r) for r in cfg.ratios)
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise UserError(f"keep ratios must be in (0, 1], got {list(cfg.ratios)}")
    cfg.ratios = ratios
    check_metrics(cfg)
    engine = choose_engine(cfg.engine)
    shards = require_shards(cfg.shards, storage_options=cfg.shard_storage_options, index_url=cfg.index)
    boxed = sum(s.boxes or 0 for s in shards)  # samples with bounding boxes, per the index
    if boxed:  # localisation against them, for every method
        cfg.metrics = (*cfg.metrics, *(n for n in box_metrics() if n not in cfg.metrics))
    cfg.methods, left_out = methods_for_machine(cfg, on_cpu(cfg, engine))
    if left_out and cfg.progress:
        from lcam.cam_methods.base import method_class

        labels = ", ".join(method_class(m).label for m in left_out)
        say(
            f"eval: {labels} left out on a CPU (about a thousand forwards per image each); --costly-on-cpu runs them "
            f"(--method-limit {left_out[0]}=N caps one to N images), or give --methods"
        )
    backbone, loaded = resolve_backbone(cfg)
    specs = method_specs(cfg, loaded)
    if cfg.split_coverage:
        check_coverage(loaded)
    plan = plan_batches(shards, cfg.batch_size, cfg.limit, cfg.seed, cfg.shard_storage_options)
    for s in specs:
        if s.limit is not None and s.limit > plan.selected:
            raise UserError(
                lambda flag: (
                    f"--method-limit {s.id}={s.limit} exceeds the {plan.selected} images evaluated; lower it or raise {flag('limit')}"
                )
            )
    if cfg.progress:
        say(
            f"eval: {plan.selected} images of {plan.available} in {len(plan.batches)} batches; methods: "
            + ", ".join(s.label + (f" (N={s.limit})" if s.limit else "") for s in specs)
            + f"; engine {engine}"
        )

    collected = Collector()
    progress = Progress(plan.selected, cfg.progress, what="eval", every=10.0)

    method_progress = MethodProgress(specs, backbone, plan.selected, cfg.progress)

    def on_batch(decoded: DecodedBatch, result: dict | None) -> None:
        collected(decoded, result)
        progress.update(len(decoded.keys) + len(decoded.skipped))

    t_eval = time.perf_counter()
    engine_info: dict[str, Any] = {"name": engine, "batch_size": cfg.batch_size, "fold_batchnorm": cfg.fold_batchnorm}
    if engine == "local":
        device = pick_device(cfg.device)
        evaluator = Evaluator(
            backbone,
            specs,
            ratios,
            metrics=cfg.metrics,
            metric_options=cfg.metric_options,
            forward_batch=cfg.batch_size,
            device=device,
            keep_maps=cfg.save_maps,
            fold_batchnorm=cfg.fold_batchnorm,
            on_method_forwards=method_progress.update if method_progress else None,
        )
        try:
            run_local(plan, evaluator, backbone.preprocessing, cfg.shard_storage_options, cfg.decode_workers, on_batch)
        finally:
            evaluator.close()
        engine_info.update(device=device, torch_threads=torch.get_num_threads(), decode_workers=cfg.decode_workers)
    else:
        engine_info.update(
            run_ray(plan, cfg, backbone, specs, on_batch, method_progress.update if method_progress else None)
        )
        engine_info["device"] = "cuda" if engine_info["gpus_per_actor"] else "cpu"
    eval_seconds = time.perf_counter() - t_eval
    method_progress.close()
    metrics = build_metrics(ratios, cfg.metrics, cfg.metric_options)
    res = aggregate(collected, specs, metrics)

    class_names = None
    if backbone.num_classes == 1000:
        from ..classes import imagenet_classes

        class_names = list(imagenet_classes())
    seeds = {s.id: s.kwargs["seed"] for s in specs if "seed" in s.kwargs}
    seeds.update({m.name: m.option_values["seed"] for m in metrics if "seed" in m.option_values})
    report = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "protocol": protocol_dict(ratios, len(res.keys)),
        "data": {
            "shards": cfg.shards,
            "index": cfg.index,
            "available": plan.available,
            "selected": plan.selected,
            "evaluated": len(res.keys),
            "limit": cfg.limit,
            "seed": cfg.seed,
            "skipped": res.skipped,
            "boxed": boxed,
        },
        "backbone": backbone.describe(),
        "methods": {m.id: m.to_dict(ratios) for m in res.methods},
        "metrics": [m.name for m in metrics],
        "subsets": {str(lim): subset_table(res, lim) for lim in sorted({s.limit for s in specs if s.limit})},
        "seeds": {
            "subset": cfg.seed,
            **seeds,
            "per_batch": "random map and ROAD noise seeded by SeedSequence([seed, batch_id])",
        },
        "engine": engine_info,
        "timings": {
            "total_seconds": time.perf_counter() - t_start,
            "evaluation_seconds": eval_seconds,
            "clean_forward_seconds": res.clean_seconds,
            "clean_forwards": res.clean_forwards,
            "images_per_second": len(res.keys) / eval_seconds if eval_seconds > 0 else None,
        },
        "versions": versions(),
        "config": cfg.public(),
    }
    for m in metrics[1:]:  # the optional metrics' protocols (AD/IC's is "protocol")
        report[m.name] = m.protocol()
    # the markdown states the wall time; measure it last, then write every file (each atomically)
    report["timings"]["total_seconds"] = time.perf_counter() - t_start
    so = cfg.out_storage_options
    charts = render_charts(res)
    files = {name: join(cfg.out, name) for name in ("results.md", "results.json", *charts, "per_image.csv")}
    write_bytes_atomic(files["per_image.csv"], render_csv(res, class_names), so)
    for name, png in charts.items():
        write_bytes_atomic(files[name], png, so)
    if cfg.split_coverage:
        report["coverage_split"] = coverage_split(res, specs, loaded)
    markdown = render_markdown(res, report) + coverage_markdown(report.get("coverage_split", []), ratios)
    write_bytes_atomic(files["results.md"], markdown.encode(), so)
    write_json_atomic(files["results.json"], jsonable(report), so)
    if cfg.save_maps:
        save_gallery_maps(collected, specs, join(cfg.out, "maps.npz"), so)
    return EvalSummary(
        cfg.out, files, len(res.keys), len(res.skipped), time.perf_counter() - t_start, res.methods, ratios
    )


def save_gallery_maps(collected: Collector, specs: Sequence[MethodSpec], url: str, so: StorageOptions) -> None:
    """Every method's map of the first images by rank (NaN where a method's subset left one out)."""
    from ..report.page import save_comparison_maps

    keys, images, ids, probs, maps = [], [], [], [], {s.id: [] for s in specs}
    for bid in sorted(collected.batches):
        decoded, result = collected.batches[bid]
        if not result or "gallery" not in result:
            continue
        for j, i in enumerate(result["gallery"]["index"]):
            keys.append(decoded.keys[i])
            images.append(result["gallery"]["pixels"][j].transpose(1, 2, 0))
            ids.append(int(result["class_ids"][i]))
            probs.append(float(result["Y"][i]))
            for s in specs:
                e = result["methods"].get(s.id, {}).get("maps")
                hit = [] if e is None else list(np.nonzero(e["index"] == i)[0])
                maps[s.id].append(e["maps"][hit[0]] if hit else None)
    if not keys:
        return
    stacked = {}
    for mid, per_image in maps.items():
        shape = next((m.shape for m in per_image if m is not None), None)
        if shape is not None:
            stacked[mid] = np.stack([m if m is not None else np.full(shape, np.nan, np.float32) for m in per_image])
    save_comparison_maps(
        url,
        keys=keys,
        images=np.stack(images),
        class_ids=np.asarray(ids),
        probs=np.asarray(probs),
        maps=stacked,
        labels={s.id: s.label for s in specs},
        storage_options=so,
    )
