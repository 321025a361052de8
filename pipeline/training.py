"""Data, run folder and Ray Train plumbing around :class:`lcam.training.LCAMTrainer`.

L-CAM-Fm (:func:`train_fm`) trains from the Zarr feature cache through
:class:`pipeline.loader.CacheLoader` (whole chunks, shuffled, prefetched, bounded
memory). Its order is a function of (seed, epoch), so a checkpoint taken after any
step resumes exactly. :func:`train` runs it in this process or as one Ray task that asks
for a GPU when the cluster has one (``where``, :mod:`pipeline.placement`): the same
function with the same config, so the same losses.

L-CAM-Img (:func:`train_img`) runs a Ray Train ``TorchTrainer``: N data-parallel
workers (DDP over the attention mechanism; gloo on CPU, NCCL on GPUs), fed by a Ray
Data pipeline streaming the WebDataset shards (read -> decode -> resize, plus the
cached feature maps of the clean centre crop when a matching cache is given). The
random 224 crop and flip are drawn in the worker from a generator seeded by
(seed, epoch, key), so the augmentation of every image is reproducible.

A run folder (any fsspec URL) holds::

    checkpoint.pt        latest state (attention, optimizer, scheduler, position, RNG)
    epoch-NNN.pt         the state after each completed epoch
    metrics.jsonl        one JSON record per logged step window and per epoch
    curves.png           the loss terms, agreement and learning rate over the run
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .checkpoints import CheckpointMismatch, check_backbone, check_cache, load_checkpoint, save_checkpoint
from .errors import FlagNamer, UserError, option_flag
from .device import autocast_dtype, resolve_device
from .progress import Progress, say
from .fs import absolute, StorageOptions, exists, get_fs, join, write_bytes_atomic

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
# Options that decide the trajectory of a run: a resumed run must keep them.
FIXED_ON_RESUME = ("method", "backbone", "lr", "batch_size", "schedule", "target", "seed", "view", "augment", "init", "targets",
                   "top_k", "init_from", "recipe_rule")


from .configs import TrainConfig  # noqa: E402  re-exported: the config lives in the torch-free pipeline.configs


@dataclass
class TrainSummary:
    out: str
    method: str
    epochs_done: int
    epochs: int
    steps: int
    stopped_early: bool
    last_epoch: dict[str, Any] | None
    seconds: float
    checkpoint: str
    metrics: str
    curves: str
    resumed_from_step: int = 0
    skipped: int = 0
    ran_on: str | None = None  # fm as a Ray task: the Ray node id that trained; None: this process

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self, flag: FlagNamer = option_flag) -> list[str]:
        """Console lines; ``flag`` spells options as the running command does (see :class:`UserError`)."""
        state = f"stopped after step {self.steps} ({flag('max_steps')}); {flag('resume')} continues" if self.stopped_early else "done"
        out = [f"L-CAM-{self.method.capitalize()}: {self.epochs_done}/{self.epochs} epochs, {self.steps} steps in {self.seconds:.1f}s: {state}"]
        if self.last_epoch:
            out.append("last epoch: " + _format_epoch(self.last_epoch))
        if self.skipped:
            out.append(f"skipped {self.skipped} undecodable images")
        if self.ran_on:
            out.append(f"trained in a Ray task on node {self.ran_on[:12]}")
        out += [f"checkpoint {self.checkpoint}", f"metrics    {self.metrics}", f"curves     {self.curves}"]
        return out


# ---------------------------------------------------------------- run folder
class RunFolder:
    """Checkpoints, metrics and plot of one run at an fsspec URL (all writes atomic)."""

    def __init__(self, url: str, storage_options: StorageOptions = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options

    def path(self, name: str) -> str:
        return join(self.url, name)

    def checkpoint_for_start(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume from, None for a fresh run; refuses to overwrite a run."""
        have = exists(self.path(CHECKPOINT), self.storage_options)
        if resume:
            if not have:
                raise UserError(lambda flag: f"nothing to resume: no {CHECKPOINT} in {self.url}; start the run without {flag('resume')}")
            return load_checkpoint(self.path(CHECKPOINT), self.storage_options)
        if have:
            raise UserError(lambda flag: f"{self.url} already holds a training run ({CHECKPOINT}); continue it with {flag('resume')} or choose another {flag('out')}")
        return None

    def save(self, state: Mapping[str, Any], *, method: str, backbone: Mapping[str, Any], cache_fingerprint: str | None,
             config: Mapping[str, Any], history: list[dict[str, Any]], epoch_end: bool) -> None:
        pos = state["position"]
        kw = dict(
            attention_state=state["attention"], method=method, backbone=backbone, cache_fingerprint=cache_fingerprint,
            epoch=pos["epoch"], step=pos["global_step"], config=config, optimizer_state=state["optimizer"],
            scheduler_state=state["scheduler"], metrics=history, storage_options=self.storage_options,
            extra={"position": pos, "running": state["running"], "rng": _encode_rng(state["rng"]),
                   "coverage_state": {k: v.tolist() for k, v in state["coverage"].items()} if "coverage" in state else None},
            coverage=torch.maximum(state["coverage"]["epoch"], state["coverage"]["max"]) if "coverage" in state else None,
        )
        if epoch_end:  # the per-epoch copy first: checkpoint.pt never points past a missing epoch file
            save_checkpoint(self.path(f"epoch-{pos['epoch']:03d}.pt"), **kw)
        save_checkpoint(self.path(CHECKPOINT), **kw)

    def write_metrics(self, history: Sequence[Mapping[str, Any]]) -> None:
        # Rewritten whole (small): object stores cannot append, and a resumed run drops
        # the records of steps it re-does.
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
        write_bytes_atomic(self.path(METRICS), body.encode(), self.storage_options)

    def read_metrics(self) -> list[dict[str, Any]]:
        fs, path = get_fs(self.path(METRICS), self.storage_options)
        try:
            text = fs.cat_file(path).decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_curves(self, history: Sequence[Mapping[str, Any]], title: str) -> None:
        write_bytes_atomic(self.path(CURVES), plot_curves(history, title), self.storage_options)


def trainer_state_from_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :meth:`RunFolder.save`: a state for ``LCAMTrainer.load_state_dict``."""
    extra = ckpt["extra"]
    return {
        "attention": ckpt["attention"],
        "optimizer": ckpt["optimizer"],
        "scheduler": ckpt["scheduler"],
        "position": extra["position"],
        "running": extra["running"],
        "rng": _decode_rng(extra.get("rng") or {}),
        **({"coverage": {k: torch.tensor(v, dtype=torch.int64) for k, v in extra["coverage_state"].items()}}
           if extra.get("coverage_state") else {}),
    }


def _encode_rng(rng: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: base64.b64encode(v.cpu().numpy().tobytes()).decode() for k, v in rng.items()}


def _decode_rng(rng: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8) for k, v in rng.items()}


def history_until(history: Sequence[Mapping[str, Any]], step: int) -> list[dict[str, Any]]:
    """Records up to ``step``: what a run resumed at that step keeps."""
    return [dict(r) for r in history if int(r.get("step", 0)) <= step]


# ---------------------------------------------------------------- config resolution
def check_config(cfg: TrainConfig) -> None:
    """Refuse a config that cannot train, from its values alone (no data read, nothing written).

    :func:`train` runs it first; a job that trains after other stages (``lcam pipeline``)
    runs it before its first stage, so a bad combination fails before any work is done.
    Options left None are checked with the defaults a new run gets (on ``resume`` the
    checkpoint's values are checked when training starts).
    """
    from lcam.recipe import default_recipe
    from lcam.training import INITS

    from .placement import check_where

    method = cfg.method or "fm"
    if method not in ("fm", "img"):
        raise UserError(lambda flag: f"unknown {flag('method')} {method!r}: use fm (from the feature cache) or img (from the shards)")
    check_where(cfg.where)
    for fld, allowed in (("schedule", ("step", "onecycle")), ("target", ("label", "predicted")), ("augment", ("random", "center")),
                         ("init", ("auto", *INITS)), ("targets", ("single", "top-k")), ("recipe_rule", ("spec", "data-size"))):
        value = getattr(cfg, fld)
        if value not in (None, *allowed):
            raise UserError(lambda flag: f"{flag(fld)} must be {' or '.join(map(repr, allowed))}, got {value!r}")
    if cfg.max_steps is not None and cfg.max_steps < 0:  # 0: write the starting checkpoint only
        raise UserError(lambda flag: f"{flag('max_steps')} must be 0 or more, got {cfg.max_steps}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(lambda flag: f"{flag('top_k')} must be >= 1, got {cfg.top_k}")
    if not cfg.resume:
        if cfg.top_k is not None and cfg.targets != "top-k":
            raise UserError(lambda flag: f"{flag('top_k')} needs {flag('targets')} top-k")
        if cfg.targets == "top-k" and (cfg.target or "label") != "predicted":
            raise UserError(lambda flag: f"{flag('targets')} top-k trains each image for its top-K predicted classes: add {flag('target')} predicted")
        if cfg.init_from and cfg.init == "cam":
            raise UserError(lambda flag: f"give either {flag('init')} cam or {flag('init_from')} CHECKPOINT, not both ({flag('init_from')} sets the whole attention)")
    if method == "fm" and not cfg.cache:
        raise UserError(lambda flag: f"L-CAM-Fm trains from a feature cache: pass {flag('cache')} URL (make one with `lcam extract`)")
    if method == "fm":
        return
    if not cfg.shards:
        raise UserError(lambda flag: f"L-CAM-Img streams images: pass {flag('shards')} (a pattern or a folder with index.json)")
    if cfg.workers < 1:
        raise UserError(lambda flag: f"{flag('workers')} must be >= 1, got {cfg.workers}")
    augment = cfg.augment or (None if cfg.resume else "random")
    if cfg.cache and augment == "random":
        raise UserError(lambda flag: f"a feature cache holds the clean centre crop: L-CAM-Img's pass 1 can come from it only with {flag('augment')} center "
                                     f"(random crops need the backbone at every step); drop {flag('cache')} or use {flag('augment')} center")
    if not cfg.resume:
        batch = cfg.batch_size or default_recipe(cfg.backbone or "efficientnet_lite0", cfg.schedule or "step").batch_size
        if batch >= 1 and batch % cfg.workers:
            raise UserError(lambda flag: f"the batch size {batch} is the global batch: it must split evenly over {cfg.workers} workers; "
                                         f"change {flag('batch_size')} or {flag('workers')}")


def resolve_recipe(cfg: TrainConfig, method: str, backbone_name: str, ckpt: Mapping[str, Any] | None, samples: int | None = None):
    """The effective recipe and run config: defaults per backbone (SPEC 3) or by data size
    (``samples``: training samples), or the checkpoint's. Values were checked by :func:`check_config`."""
    from lcam.recipe import Recipe, default_recipe

    if cfg.top_k is not None and (cfg.targets or (ckpt or {}).get("config", {}).get("targets")) != "top-k":
        raise UserError(lambda flag: f"{flag('top_k')} needs {flag('targets')} top-k")
    if ckpt is None:
        from lcam.recipe import recipe_for_data

        rule = cfg.recipe_rule or "spec"
        if rule == "data-size":
            if samples is None:
                raise UserError(lambda flag: f"{flag('recipe_rule')} data-size needs the number of training samples (known for a cache and for indexed shards)")
            recipe = recipe_for_data(backbone_name, method, samples)
            if cfg.schedule is not None and cfg.schedule != recipe.schedule:
                recipe = default_recipe(backbone_name, cfg.schedule)
        else:
            recipe = default_recipe(backbone_name, cfg.schedule or "step")
        recipe = recipe.with_overrides(lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size)
        if recipe.lr <= 0 or recipe.epochs < 1 or recipe.batch_size < 1:
            raise UserError(lambda flag: f"{flag('lr')}, {flag('epochs')} and {flag('batch_size')} must be positive "
                                         f"(got lr {recipe.lr}, epochs {recipe.epochs}, batch size {recipe.batch_size})")
        targets = cfg.targets or "single"
        top_k = (cfg.top_k or 3) if targets == "top-k" else 1
        target = cfg.target or "label"
        run = {"method": method, "backbone": backbone_name, "lr": recipe.lr, "batch_size": recipe.batch_size, "schedule": recipe.schedule,
               "target": target, "seed": 0 if cfg.seed is None else cfg.seed, "view": cfg.view or "random",
               "augment": cfg.augment or "random", "recipe": recipe.to_dict(), "recipe_rule": rule,
               # The small-data recipe starts from CAM where the head allows it (initial_attention
               # resolves "auto"): on unseen classes a random row is noise, a CAM row Grad-CAM's equal
               # (benchmarks/generalisation.py). The SPEC's recipe keeps the SPEC's random draw: at its
               # lr 0.01 CAM-initialised rows barely move (loss 3.82 -> 3.80 in 6 epochs where the
               # random init falls by a third, tests/test_training.py's run), so it would not be the SPEC's training.
               "init": "checkpoint" if cfg.init_from else (cfg.init or ("auto" if rule == "data-size" else "random")), "init_from": cfg.init_from,
               "targets": targets, "top_k": top_k}
        return recipe, run
    run = dict(ckpt["config"])
    # runs saved before these options existed trained with the SPEC's choices
    run.setdefault("init", "random")
    run.setdefault("init_from", None)
    run.setdefault("targets", "single")
    run.setdefault("top_k", 1)
    run.setdefault("recipe_rule", "spec")
    given = {"method": method, "backbone": backbone_name, "lr": cfg.lr, "batch_size": cfg.batch_size, "schedule": cfg.schedule,
             "target": cfg.target, "seed": cfg.seed, "view": cfg.view if method == "fm" else run.get("view"),
             "augment": cfg.augment if method == "img" else run.get("augment"), "init": cfg.init, "init_from": cfg.init_from,
             "targets": cfg.targets, "top_k": cfg.top_k, "recipe_rule": cfg.recipe_rule}
    differ = [k for k, v in given.items() if v is not None and k in FIXED_ON_RESUME and run.get(k) != v]
    if differ:
        raise CheckpointMismatch(lambda flag: (
            "cannot resume: these options differ from the checkpoint's run, so it would not continue the same training:\n  "
            + "\n  ".join(f"{flag(k)}: checkpoint {run.get(k)!r}, now {given[k]!r}" for k in differ)
            + f"\nDrop them (the checkpoint's values are used) or start a new run with another {flag('out')}."
        ))
    recipe = Recipe(**run["recipe"])
    if cfg.epochs is not None and cfg.epochs != recipe.epochs:
        if recipe.schedule == "onecycle":
            raise CheckpointMismatch(lambda flag: f"the one-cycle schedule of this run spans {recipe.epochs} epochs; {flag('epochs')} cannot change it to {cfg.epochs} on resume")
        recipe = recipe.with_overrides(epochs=cfg.epochs)
        run["recipe"] = recipe.to_dict()
    return recipe, run


def backbone_for_cache(cache: Any, weights: str | None):
    """The backbone the cache was made with; refuses other weights (digest compared)."""
    from lcam import build_backbone

    ident = cache.identity
    name = ident.get("backbone")
    backbone = build_backbone(name, weights or ident.get("weights", "default"))
    mine = backbone.describe()
    if mine["weights_digest"] != ident.get("weights_digest"):
        raise UserError(lambda flag: (
            f"the cache {cache.url} holds features of {name} with weights {ident.get('weights')} (digest {str(ident.get('weights_digest'))[:12]}), "
            f"but {flag('weights')} {weights} gives digest {mine['weights_digest'][:12]}; pass the weights the cache was made with"
        ))
    return backbone


def initial_attention(backbone: Any, run_cfg: dict[str, Any], storage_options: StorageOptions = None) -> tuple[Any, torch.Tensor | None]:
    """The attention a new run starts from (``init``, ``init_from``) and the coverage it
    inherits (an ``init_from`` checkpoint's rows were trained by its samples). ``init``
    "auto" becomes "cam" when the backbone's head is pooling + linear, else "random", in
    ``run_cfg`` too (what the checkpoint records)."""
    from lcam.training import NoLinearClassifier, init_attention

    if run_cfg.get("init") == "auto":
        run_cfg["init"] = "cam" if backbone.linear_classifier() is not None else "random"
    url = run_cfg.get("init_from")
    if url:
        start = load_checkpoint(url, storage_options)
        check_backbone(start, backbone.describe(), f"this run's backbone (--init-from {url})")
        attention = init_attention(backbone, run_cfg["seed"])
        attention.load_state_dict(start["attention"])
        return attention, start.get("coverage")
    try:
        return init_attention(backbone, run_cfg["seed"], run_cfg.get("init", "random")), None
    except NoLinearClassifier as exc:
        raise UserError(str(exc)) from None


# ---------------------------------------------------------------- metrics records, console, plot
def epoch_record(epoch: int, step: int, sums: Any, lr: float, seconds: float, **extra: Any) -> dict[str, Any]:
    rec = {"kind": "epoch", "epoch": epoch, "step": step, "samples": int(sums.n), "lr": lr, "seconds": round(seconds, 3),
           "samples_per_s": round(sums.n / seconds, 2) if seconds > 0 else 0.0}
    rec.update({k: round(v, 6) for k, v in sums.means().items()})
    rec.update(extra)
    return rec


def _format_epoch(r: Mapping[str, Any]) -> str:
    return (f"epoch {r['epoch']}: loss {r['loss']:.4f} (ce {r['ce']:.4f}, area {r['area']:.4f}, tv {r['tv']:.4f}), "
            f"agreement {100 * r['agreement']:.1f}%, lr {r['lr']:.3g}, {r['samples']} samples in {r['seconds']:.1f}s "
            f"({r['samples_per_s']:.3g} samples/s)")


class StepWindow:
    """Averages steps between metrics records (``log_every`` steps each)."""

    def __init__(self) -> None:
        from lcam.training import MetricSums

        self._cls = MetricSums
        self.sums = MetricSums()
        self.t0 = time.perf_counter()

    def add(self, stats: Any) -> None:
        self.sums.add(stats.n, stats.loss, stats.ce, stats.area, stats.tv, stats.agree)

    def record(self, epoch: int, step: int, steps_per_epoch: int, lr: float) -> dict[str, Any]:
        dt = time.perf_counter() - self.t0
        rec = {"kind": "step", "epoch": epoch, "step": step, "epoch_progress": round(step / steps_per_epoch, 4), "lr": lr,
               "samples": int(self.sums.n), "samples_per_s": round(self.sums.n / dt, 2) if dt > 0 else 0.0}
        rec.update({k: round(v, 6) for k, v in self.sums.means().items()})
        self.sums, self.t0 = self._cls(), time.perf_counter()
        return rec


def plot_curves(history: Sequence[Mapping[str, Any]], title: str = "L-CAM training") -> bytes:
    """PNG: total loss, its three terms, agreement and lr against epochs (steps as thin lines)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    steps = [r for r in history if r.get("kind") == "step"]
    epochs = [r for r in history if r.get("kind") == "epoch"]
    fig = Figure(figsize=(13, 7), dpi=100)
    panels = [("loss", "total loss"), ("ce", "cross-entropy (masked)"), ("area", "area term"), ("tv", "total variation"),
              ("agreement", "agreement (masked argmax = target)"), ("lr", "learning rate (weights)")]
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(2, 3, i + 1)
        if steps:
            ax.plot([r["epoch_progress"] for r in steps], [r[key] for r in steps], lw=0.8, alpha=0.6, label="steps")
        if epochs:
            ax.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], "o-", lw=1.5, label="epoch mean")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key == "lr" and any(r.get("lr", 0) > 0 for r in history):
            ax.set_yscale("log")
        if i == 0 and steps and epochs:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()




def _say(enabled: bool, line: str) -> None:
    # the lcam logger (stderr by default): a training task's lines then reach the driver (placement.relayed_logs)
    say(line, enabled)


# ---------------------------------------------------------------- L-CAM-Fm from the cache
def fm_batches(loader: Any, start: int, top_k: int = 1) -> Iterator[Any]:
    """CacheLoader batches from ``start`` on, as :class:`lcam.training.TrainBatch`; with
    ``top_k`` > 1 without targets (the trainer takes the top-K of the head on F)."""
    from lcam.training import TrainBatch

    for feats, targets, _keys in loader.iter_from(start):
        yield TrainBatch(targets=targets if top_k == 1 else None, feats=feats)


def train_fm(cfg: TrainConfig) -> TrainSummary:
    """Train L-CAM-Fm from a feature cache (resumable at any step)."""
    from .cache import FeatureCache
    from .loader import CacheLoader

    t0 = time.perf_counter()
    check_config(dataclasses.replace(cfg, method="fm"))
    cache = FeatureCache.open(cfg.cache, cfg.cache_storage_options)
    if len(cache) == 0:
        raise UserError(f"the feature cache {cache.url} holds no finished shards yet; run (or finish) `lcam extract` first")
    backbone = backbone_for_cache(cache, cfg.weights)
    run_dir = RunFolder(cfg.out, cfg.storage_options)
    ckpt = run_dir.checkpoint_for_start(cfg.resume)
    if ckpt is not None:
        if ckpt["method"] != "fm":
            raise CheckpointMismatch(f"the checkpoint in {cfg.out} is an L-CAM-{ckpt['method'].capitalize()} run, not L-CAM-Fm")
        check_backbone(ckpt, backbone.describe(), f"the backbone of the cache {cache.url}")
        check_cache(ckpt, cache.fingerprint)
    recipe, run_cfg = resolve_recipe(cfg, "fm", backbone.name, ckpt, samples=len(cache))
    run_cfg.update(cache=cache.url, cache_fingerprint=cache.fingerprint, cache_views=list(cache.views))
    view: str | int = int(run_cfg["view"]) if str(run_cfg["view"]).isdigit() else run_cfg["view"]
    loader = CacheLoader(
        cache, recipe.batch_size, seed=run_cfg["seed"], target=run_cfg["target"], view=view,
        buffer_rows=cfg.buffer_rows, prefetch_chunks=cfg.prefetch_chunks, num_threads=cfg.loader_threads,
    )
    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        # Per-step work is small: more threads mostly spin, while the loader's threads need cores to decode.
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 2) // 2))
    try:
        return _train_fm_loop(cfg, cache, backbone, run_dir, ckpt, recipe, run_cfg, loader, device, t0)
    finally:
        torch.set_num_threads(threads_before)


def _train_fm_loop(cfg: TrainConfig, cache: Any, backbone: Any, run_dir: RunFolder, ckpt: Mapping[str, Any] | None, recipe: Any,
                   run_cfg: dict[str, Any], loader: Any, device: torch.device, t0: float) -> TrainSummary:
    from lcam import LCAM
    from lcam.training import LCAMTrainer

    attention, inherited = initial_attention(backbone, run_cfg, cfg.storage_options) if ckpt is None else (None, None)
    model = LCAM(backbone, attention)  # resuming: the checkpoint's attention is loaded below
    # Only the head runs per step: full precision unless bf16 is asked for explicitly.
    trainer = LCAMTrainer(model, "fm", recipe, len(loader), device=device,
                          autocast_dtype=autocast_dtype(cfg.precision, device, allow_fp16=False) if cfg.precision != "auto" else None,
                          top_k=int(run_cfg.get("top_k", 1)))
    if inherited is not None:
        trainer.max_counts = inherited.long().clone()
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        trainer.load_state_dict(trainer_state_from_checkpoint(ckpt))
        history = history_until(ckpt["metrics"], trainer.global_step)
    resumed_from = trainer.global_step
    ident = backbone.describe()

    last_save = [time.perf_counter()]

    def save(epoch_end: bool) -> None:
        last_save[0] = time.perf_counter()
        run_dir.save(trainer.state_dict(), method="fm", backbone=ident, cache_fingerprint=cache.fingerprint,
                     config=run_cfg, history=history, epoch_end=epoch_end)
        run_dir.write_metrics(history)

    _say(cfg.progress, f"L-CAM-Fm: {len(cache)} cached samples ({backbone.name}, views {list(cache.views)}), {len(loader)} steps/epoch, "
         f"batch {recipe.batch_size}, lr {recipe.lr:g} ({recipe.schedule}), target {run_cfg['target']}"
         + (f" (top-{trainer.top_k})" if trainer.top_k > 1 else "") + f", init {run_cfg.get('init', 'random')}, device {device}"
         + (f"; resuming at epoch {trainer.epoch + 1}, step {trainer.global_step}" if ckpt is not None else ""))
    stopped = False
    last: dict[str, Any] | None = next((r for r in reversed(history) if r["kind"] == "epoch"), None)
    while trainer.epoch < recipe.epochs:
        loader.set_epoch(trainer.epoch)
        window, t_epoch, lr_used = StepWindow(), time.perf_counter(), [trainer.lr]
        bar = Progress(trainer.steps_per_epoch, cfg.progress, what=f"epoch {trainer.epoch + 1}/{recipe.epochs}", unit="steps", every=30.0,
                       initial=trainer.batch_in_epoch)

        def on_step(tr: LCAMTrainer, stats: Any) -> None:
            window.add(stats)
            lr_used[0] = stats.lr
            bar.update(1, postfix=f"loss {stats.loss:.3f}")
            if cfg.log_every and tr.global_step % cfg.log_every == 0:
                history.append(window.record(tr.epoch, tr.global_step, tr.steps_per_epoch, stats.lr))
            if cfg.checkpoint_minutes and time.perf_counter() - last_save[0] > 60 * cfg.checkpoint_minutes and tr.batch_in_epoch < tr.steps_per_epoch:
                save(epoch_end=False)  # exact mid-epoch position: --resume continues from the next batch

        try:
            sums = trainer.train_epoch(fm_batches(loader, trainer.batch_in_epoch, trainer.top_k), max_steps=cfg.max_steps, on_step=on_step)
        finally:
            bar.close()
        if sums is None:  # max_steps: keep the exact position for --resume
            save(epoch_end=False)
            stopped = True
            break
        last = epoch_record(trainer.epoch, trainer.global_step, sums, lr_used[0], time.perf_counter() - t_epoch)
        history.append(last)
        save(epoch_end=True)
        _say(cfg.progress, _format_epoch(last))
    run_dir.write_metrics(history)
    run_dir.write_curves(history, f"L-CAM-Fm, {backbone.name}, cache {cache.fingerprint}")
    return TrainSummary(cfg.out, "fm", trainer.epoch, recipe.epochs, trainer.global_step, stopped, last, time.perf_counter() - t0,
                        run_dir.path(CHECKPOINT), run_dir.path(METRICS), run_dir.path(CURVES), resumed_from)


def _fm_task(cfg: TrainConfig, log_queue: Any) -> TrainSummary:
    """The Ray task of :func:`train_fm_placed`: the same training, its log lines relayed."""
    from .placement import node_id, relayed_logs

    with relayed_logs(log_queue):
        summary = train_fm(cfg)
    summary.ran_on = node_id()
    return summary


def train_fm_placed(cfg: TrainConfig) -> TrainSummary:
    """L-CAM-Fm where ``cfg.where`` says: in this process, or as one Ray task that asks for a
    GPU when the cluster has one (one CPU elsewhere), so that a job's driver on a CPU-only
    head never trains. The task writes the run folder itself; resume, checkpoints and
    metrics are those of :func:`train_fm`."""
    from .placement import model_resources, resolve_where, run_task
    from .raykit import ensure_ray

    if resolve_where(cfg.where) == "local":
        return train_fm(cfg)
    ensure_ray()
    resources = model_resources(cfg.device)
    what = "1 GPU" if resources.get("num_gpus") else f"{resources['num_cpus']:g} CPU"
    _say(cfg.progress, f"L-CAM-Fm: training in a Ray task ({what})")
    return run_task(_fm_task, cfg, resources=resources, progress=cfg.progress, name="lcam-train-fm")


# ---------------------------------------------------------------- L-CAM-Img: Ray Data stages
def crop_seed(seed: int, epoch: int, key: str) -> int:
    """Seed of one image's random crop and flip in one epoch: independent of workers and order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def crop_flip(resized: np.ndarray, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random ``crop`` x ``crop`` window of an already resized (H, W, 3) uint8 image,
    flipped with p=0.5: (3, crop, crop) in [0, 1]. Draws top, left, flip in the order of
    :func:`pipeline.images.random_crop_flip`, so both give the same view for the same generator."""
    h, w = resized.shape[:2]
    top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    out = torch.from_numpy(np.ascontiguousarray(resized[top : top + crop, left : left + crop])).permute(2, 0, 1).float().div_(255)
    return out.flip(-1) if flip else out


def read_training_rows(item: dict[str, Any], storage_options: StorageOptions = None, cache: Any = None, view_index: int = 0) -> list[dict[str, Any]]:
    """One shard -> one row per sample; with a cache, each row carries its cached F (clean centre crop)."""
    from .shards import ShardInfo, read_shard

    info = ShardInfo(url=item["url"], name=item["name"], count=item["count"] if item["count"] >= 0 else None)
    samples = read_shard(info, storage_options=storage_options)  # a damaged shard fails the run, loudly
    cached: dict[str, tuple[np.ndarray, int]] = {}
    if cache is not None:
        from .cache import shard_id_for

        sid = shard_id_for(item["url"])
        for ci in range(cache.num_chunks(sid)):
            chunk = cache.read_chunk(sid, ci, fields=["features", "top5_classes"])
            for k, f, t5 in zip(chunk["keys"], chunk["features"][:, view_index], chunk["top5_classes"]):
                cached[k] = (f, int(t5[0]))
    rows = []
    for s in samples:
        row = {"key": s.key, "label": int(s.label), "image": s.image, "top1": -1, "error": ""}
        if cache is not None:
            f, top1 = cached.get(s.key, (None, -1))
            if f is None:  # skipped at extraction (undecodable): it fails decoding here too
                f = np.zeros(cache.feature_shape, dtype=np.float16)
                row["error"] = "not in the feature cache (skipped at extraction)"
            row["features"], row["top1"] = f, top1
        rows.append(row)
    return rows


def decode_for_training(batch: dict[str, np.ndarray], preprocessing: Any, augment: str) -> dict[str, Any]:
    """CPU stage: bytes -> RGB -> the 256 resize (``random``: the worker crops) or centre crop 224, uint8."""
    from PIL import Image

    from .images import decode_pil, preprocess, resized_size

    n = len(batch["key"])
    errors = [str(e) for e in batch["error"]]
    pixels: list[np.ndarray] = []
    for i in range(n):
        out = None
        if not errors[i]:
            try:
                im = decode_pil(batch["image"][i])
                if augment == "center":
                    out = (preprocess(im, preprocessing, "center") * 255).round().byte().permute(1, 2, 0).numpy()
                else:
                    size = resized_size(im.width, im.height, preprocessing.resize)
                    out = np.asarray(im.resize(size, Image.BILINEAR))  # the resize of random_crop_flip
            except Exception as exc:  # DecodeError and whatever PIL raises on odd files
                errors[i] = f"decode: {exc}"
        pixels.append(out if out is not None else np.zeros((preprocessing.crop, preprocessing.crop, 3), dtype=np.uint8))
    res: dict[str, Any] = {k: batch[k] for k in batch if k not in ("image", "error")}
    if augment == "center":
        res["pixels"] = np.stack(pixels)
    else:  # variable sizes: an object array becomes a variable-shaped tensor column
        arr = np.empty(n, dtype=object)
        arr[:] = pixels
        res["pixels"] = arr
    res["error"] = np.array(errors, dtype=object).astype(str)
    return res


def build_image_dataset(shards: Sequence[Any], preprocessing: Any, augment: str, *, cache: Any = None, view_index: int = 0,
                        storage_options: StorageOptions = None, decode_batch_size: int = 16, data_cpus: float = 1.0):
    """Ray Dataset of training rows: shards in a new random order each epoch, read, decoded."""
    import ray

    items = [{"url": s.url, "name": s.name, "count": s.count if s.count is not None else -1} for s in shards]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .randomize_block_order()
        .flat_map(read_training_rows, fn_kwargs={"storage_options": storage_options, "cache": cache, "view_index": view_index}, num_cpus=data_cpus)
        .map_batches(decode_for_training, fn_kwargs={"preprocessing": preprocessing, "augment": augment},
                     batch_size=decode_batch_size, batch_format="numpy", num_cpus=data_cpus)
    )


def image_batches(rows: Iterable[Mapping[str, np.ndarray]], *, augment: str, crop: int, seed: int, epoch: int, target: str,
                  skipped: list[str], top_k: int = 1) -> Iterator[Any]:
    """Worker side: numpy row batches -> :class:`lcam.training.TrainBatch` (undecodable rows dropped and listed)."""
    from lcam.training import TrainBatch

    for b in rows:
        ok = np.array([not e for e in b["error"]], dtype=bool)
        keys = [str(k) for k in b["key"]]
        skipped.extend(k for k, good in zip(keys, ok) if not good)
        if not ok.any():  # skipping the step on one worker only would hang the others' gradient all-reduce
            raise UserError(f"every image of a training batch failed to decode ({', '.join(keys[:3])}, ...: {b['error'][0]}); "
                            "re-pack the shards (lcam shards) so that undecodable files are left out")
        if augment == "center":
            images = torch.from_numpy(np.ascontiguousarray(b["pixels"][ok])).permute(0, 3, 1, 2).float().div_(255)
        else:
            images = torch.stack([
                crop_flip(np.asarray(p), crop, torch.Generator().manual_seed(crop_seed(seed, epoch, k)))
                for p, k, good in zip(b["pixels"], keys, ok) if good
            ])
        feats = torch.from_numpy(np.asarray(b["features"][ok], dtype=np.float32)) if "features" in b else None
        if target == "label":
            labels = np.asarray(b["label"])[ok]
            if (labels < 0).any():
                bad = [k for k, good, lab in zip(keys, ok, b["label"]) if good and lab < 0][:3]
                raise UserError(lambda flag: f"sample {bad[0]!r} has no label; train with {flag('target')} predicted (the backbone's top-1) or give the data labels")
            targets = torch.from_numpy(labels.astype(np.int64))
        elif feats is not None and top_k == 1:
            targets = torch.from_numpy(np.asarray(b["top1"])[ok].astype(np.int64))  # the cache's top-1, as for L-CAM-Fm
        else:
            targets = None  # the trainer takes the top-1 (top-K) from its first pass
        yield TrainBatch(targets=targets, feats=feats, images=images)


# ---------------------------------------------------------------- L-CAM-Img: the Ray Train worker loop
def _img_worker_loop(config: dict[str, Any]) -> None:
    import itertools

    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from lcam import LCAM, build_backbone
    from lcam.recipe import Recipe
    from lcam.training import LCAMTrainer, MetricSums

    cfg: TrainConfig = config["cfg"]
    plan: dict[str, Any] = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    backbone = build_backbone(plan["backbone"], plan["weights"])
    if backbone.weights_digest() != plan["identity"]["weights_digest"]:
        raise RuntimeError(f"worker {rank} built other weights for {plan['backbone']} than the driver")
    recipe = Recipe(**plan["run"]["recipe"])
    attention, inherited = initial_attention(backbone, plan["run"], cfg.storage_options)
    model = LCAM(backbone, attention)

    def ddp(module: torch.nn.Module) -> torch.nn.Module:
        # The backbone's BatchNorm statistics never change: no buffer sync at every forward
        # (torch >= 2.14 names it forward_sync_buffers; broadcast_buffers is deprecated there).
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={key: False})

    trainer = LCAMTrainer(model, "img", recipe, plan["steps_per_epoch"], device=device,
                          autocast_dtype=autocast_dtype(cfg.precision, device, allow_fp16=False), wrap=ddp, top_k=int(plan["run"].get("top_k", 1)))
    if inherited is not None:
        trainer.max_counts = inherited.long().clone()
    if world > 1:
        def all_reduce_counts(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            dist.all_reduce(t)
            return t.cpu()

        trainer.reduce_counts = all_reduce_counts
    run_dir = RunFolder(cfg.out, cfg.storage_options)
    history: list[dict[str, Any]] = []
    ckpt = None
    ray_ckpt = ray.train.get_checkpoint()  # set when Ray Train restarted the workers after a failure
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            ckpt = load_checkpoint(os.path.join(d, CHECKPOINT))
    elif plan["resume"]:
        ckpt = load_checkpoint(run_dir.path(CHECKPOINT), cfg.storage_options)
    if ckpt is not None:
        trainer.load_state_dict(trainer_state_from_checkpoint(ckpt))
        history = history_until(ckpt["metrics"], trainer.global_step)
        if rank != 0:  # the saved partial-epoch sums are global: count them once in the all-reduce
            trainer.running = MetricSums()
    progress = config.get("progress_queue")
    shard = ray.train.get_dataset_shard("train")
    skipped: list[str] = []
    while trainer.epoch < recipe.epochs:
        window, t_epoch, last_sent, lr_used = StepWindow(), time.perf_counter(), 0.0, [trainer.lr]
        epoch = trainer.epoch

        def on_step(tr: LCAMTrainer, stats: Any) -> None:
            nonlocal last_sent
            window.add(stats)
            lr_used[0] = stats.lr
            if rank == 0 and cfg.log_every and tr.global_step % cfg.log_every == 0:
                history.append(window.record(tr.epoch, tr.global_step, tr.steps_per_epoch, stats.lr))
            if rank == 0 and progress is not None and time.perf_counter() - last_sent > 2.0:
                last_sent = time.perf_counter()
                progress.put_nowait({"epoch": tr.epoch, "batch": tr.batch_in_epoch, "steps": tr.steps_per_epoch,
                                     "loss": stats.loss, "t": last_sent - t_epoch, "global_batch": stats.n * world})

        rows = shard.iter_batches(batch_size=plan["worker_batch"], batch_format="numpy", prefetch_batches=2,
                                  local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                  local_shuffle_seed=crop_seed(plan["run"]["seed"], epoch, f"rank{rank}") % (2**31) if cfg.shuffle_buffer else None)
        batches = image_batches(rows, augment=plan["run"]["augment"], crop=backbone.preprocessing.crop, seed=plan["run"]["seed"],
                                epoch=epoch, target=plan["run"]["target"], skipped=skipped, top_k=trainer.top_k)
        # A mid-epoch checkpoint (max steps) resumes with the epoch's remaining number of steps;
        # which images those are is up to Ray Data's streaming split (not reproducible).
        batches = itertools.islice(batches, trainer.steps_per_epoch - trainer.batch_in_epoch)
        sums = trainer.train_epoch(batches, max_steps=cfg.max_steps, on_step=on_step)
        stopped = sums is None
        total = (trainer.running if stopped else sums).to_tensor()
        n_skipped = torch.tensor([float(len(skipped))], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(n_skipped)
        metrics: dict[str, Any] = {"epoch": trainer.epoch, "step": trainer.global_step, "stopped": stopped, "skipped": int(n_skipped.item())}
        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                if not stopped:
                    rec = epoch_record(trainer.epoch, trainer.global_step, MetricSums.from_tensor(total), lr_used[0],
                                       time.perf_counter() - t_epoch, workers=world, skipped=int(n_skipped.item()))
                    history.append(rec)
                    metrics.update(rec)
                state = trainer.state_dict()
                if stopped:
                    state["running"] = MetricSums.from_tensor(total).to_dict()
                kw = dict(method="img", backbone=plan["identity"], cache_fingerprint=plan["cache_fingerprint"], config=plan["run"], history=history)
                run_dir.save(state, epoch_end=not stopped, **kw)
                run_dir.write_metrics(history)
                RunFolder(tmp).save(state, epoch_end=False, **kw)  # the same file for Ray Train's own restarts
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if progress is not None:
                    progress.put_nowait({"epoch_done": metrics})
            ray.train.report(metrics, checkpoint=checkpoint)  # every worker: it is a barrier
        if stopped:
            break


# ---------------------------------------------------------------- L-CAM-Img: the driver
RAY_TRAIN_FOLDER = "ray-train"


def ray_train_storage(cfg: TrainConfig) -> tuple[str, Any]:
    """Ray Train's ``(storage_path, storage_filesystem)``: ``cfg.ray_storage``, by default
    ``<out>/ray-train``, the run's own URL.

    On a multi-node cluster Ray Train's checkpoints must land where every worker and the
    driver can reach them; the run folder is that place by construction (S3, GCS, or a
    local path on one machine or shared mount). Object stores get a pyarrow filesystem
    over the run's fsspec filesystem, so the run's storage options (endpoint, region,
    anonymous access) apply (tests/test_placement.py: nothing Ray Train writes there
    holds them).
    """
    import pyarrow.fs

    url = absolute(cfg.ray_storage or join(cfg.out, RAY_TRAIN_FOLDER))
    fs, path = get_fs(url, cfg.storage_options)
    if "://" not in url:
        return path, None  # local: Ray Train's own local filesystem
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _shard_counts(shards: Sequence[Any], storage_options: StorageOptions) -> list[Any]:
    """Counts from the index; shards without one are read once to count (reported)."""
    from concurrent.futures import ThreadPoolExecutor

    from .shards import ShardInfo, read_shard

    unknown = [s for s in shards if s.count is None]
    if not unknown:
        return list(shards)
    say(f"train: {len(unknown)} shard(s) have no index entry; reading them once to count their samples")
    with ThreadPoolExecutor(4) as pool:
        counts = dict(zip([s.url for s in unknown], pool.map(lambda s: len(read_shard(s, storage_options)), unknown)))
    return [s if s.count is not None else ShardInfo(s.url, s.name, counts[s.url], s.sha256) for s in shards]


def _img_cache(cfg: TrainConfig, augment: str, backbone: Any, shards: Sequence[Any]):
    """The feature cache that gives pass 1, checked to hold exactly these features; else None."""
    from .cache import FeatureCache

    if not cfg.cache:
        return None, 0
    assert augment == "center", "check_config refuses a cache with random crops"
    cache = FeatureCache.open(cfg.cache, cfg.cache_storage_options)
    ident, mine = cache.identity, backbone.describe()
    for fld in ("backbone", "weights_digest", "preprocessing", "feature_shape"):
        if json.dumps(ident.get(fld), sort_keys=True) != json.dumps(mine.get(fld), sort_keys=True):
            raise UserError(lambda flag: f"the feature cache {cache.url} was made for other features ({fld}: cache {ident.get(fld)}, "
                            f"training {mine.get(fld)}); use a cache of this backbone and preprocessing, or drop {flag('cache')}")
    if "center" not in cache.views:
        raise UserError(lambda flag: f"the feature cache {cache.url} holds views {list(cache.views)}, not the centre crop; drop {flag('cache')}")
    done = cache.done_sources()
    missing = [s.url for s in shards if s.url not in done]
    if missing:
        raise UserError(lambda flag: f"{len(missing)} of {len(shards)} shards are not in the feature cache {cache.url} (e.g. {missing[0]}); "
                        f"extract them first (`lcam extract` with the same shard URLs), or drop {flag('cache')}")
    return cache, cache.views.index("center")


class _ProgressPrinter(threading.Thread):
    """Driver side: prints what rank 0 sends (step progress with rate and ETA, epoch lines)."""

    def __init__(self, queue: Any, epochs: int, enabled: bool) -> None:
        super().__init__(daemon=True)
        self.queue, self.epochs, self.enabled = queue, epochs, enabled
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                msg = self.queue.get(timeout=1.0)
            except Exception:  # ray.util.queue.Empty, or the queue actor gone at shutdown
                continue
            if not self.enabled:
                continue
            if "epoch_done" in msg:
                m = msg["epoch_done"]
                if "loss" in m:
                    _say(True, _format_epoch(m))
                continue
            rate = msg["batch"] / max(msg["t"], 1e-9)
            eta = (msg["steps"] - msg["batch"]) / rate if rate > 0 else float("nan")
            _say(True, f"train: epoch {msg['epoch'] + 1}/{self.epochs} step {msg['batch']}/{msg['steps']}, loss {msg['loss']:.3f}, "
                       f"{rate * msg['global_batch']:.1f} images/s, ETA {eta:.0f}s")


def _worker_error(exc: BaseException) -> UserError | None:
    """The UserError a worker raised, if that is what failed the run."""
    from .placement import user_error_in

    return user_error_in(exc)


def train_img(cfg: TrainConfig) -> TrainSummary:
    """Train L-CAM-Img with Ray Train over ``cfg.workers`` data-parallel workers."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from lcam import build_backbone

    from .raykit import ensure_ray
    from .shards import require_shards

    t0 = time.perf_counter()
    check_config(dataclasses.replace(cfg, method="img"))
    run_dir = RunFolder(cfg.out, cfg.storage_options)
    ckpt = run_dir.checkpoint_for_start(cfg.resume)
    augment = cfg.augment or (ckpt["config"].get("augment") if ckpt else None) or "random"
    check_config(dataclasses.replace(cfg, method="img", augment=augment))  # a resumed run's augmentation against --cache
    shards = require_shards(cfg.shards, storage_options=cfg.shard_storage_options, index_url=cfg.index)
    name = cfg.backbone or (ckpt["backbone"]["backbone"] if ckpt else None)
    weights = cfg.weights or (ckpt["backbone"].get("weights") if ckpt else None)
    if name is None and cfg.cache:
        from .cache import FeatureCache

        ident = FeatureCache.open(cfg.cache, cfg.cache_storage_options).identity
        name, weights = ident["backbone"], weights or ident.get("weights")
    backbone = build_backbone(name or "efficientnet_lite0", weights or "default")
    ident = backbone.describe()
    cache, view_index = _img_cache(cfg, augment, backbone, shards)
    if ckpt is not None:
        if ckpt["method"] != "img":
            raise CheckpointMismatch(f"the checkpoint in {cfg.out} is an L-CAM-{ckpt['method'].capitalize()} run, not L-CAM-Img")
        check_backbone(ckpt, ident)
        if cache is not None:
            check_cache(ckpt, cache.fingerprint)
    shards = _shard_counts(shards, cfg.shard_storage_options)
    recipe, run_cfg = resolve_recipe(cfg, "img", backbone.name, ckpt, samples=sum(s.count for s in shards))
    if recipe.batch_size % cfg.workers:  # a resumed run's batch size (a new run's is checked by check_config)
        raise UserError(lambda flag: f"the batch size {recipe.batch_size} is the global batch: it must split evenly over {cfg.workers} workers; "
                                     f"change {flag('workers')}")
    total = sum(s.count for s in shards)
    worker_batch = recipe.batch_size // cfg.workers
    per_worker = total // cfg.workers  # Ray Train splits with equal=True: the remainder rows are dropped
    if per_worker < 1:
        raise UserError(lambda flag: f"{total} images cannot feed {cfg.workers} workers; lower {flag('workers')}")
    steps_per_epoch = math.ceil(per_worker / worker_batch)
    run_cfg.update(shards=[s.url for s in shards], cache=cache.url if cache else None, workers=cfg.workers)

    ensure_ray()
    use_gpu = bool(ray.cluster_resources().get("GPU", 0)) if cfg.use_gpu is None else cfg.use_gpu
    ds = build_image_dataset(shards, backbone.preprocessing, run_cfg["augment"], cache=cache, view_index=view_index,
                             storage_options=cfg.shard_storage_options, decode_batch_size=cfg.decode_batch_size, data_cpus=cfg.data_cpus)
    if ckpt is None:
        initial_attention(backbone, run_cfg, cfg.storage_options)  # a bad --init / --init-from fails here, before Ray starts
    del backbone  # the workers build their own
    queue = Queue(actor_options={"num_cpus": 0})
    plan = {"backbone": ident["backbone"], "weights": ident["weights"], "identity": ident, "run": run_cfg, "steps_per_epoch": steps_per_epoch,
            "worker_batch": worker_batch, "resume": ckpt is not None, "cache_fingerprint": cache.fingerprint if cache else None}
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    storage_path, storage_fs = ray_train_storage(cfg)
    trainer = TorchTrainer(
        _img_worker_loop,
        train_loop_config={"cfg": cfg, "plan": plan, "progress_queue": queue},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"lcam-img-{uuid.uuid4().hex[:8]}", storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=0), checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets={"train": ds},
    )
    _say(cfg.progress, f"L-CAM-Img: {total} images in {len(shards)} shards, {cfg.workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), "
         f"{steps_per_epoch} steps/epoch of {recipe.batch_size} ({worker_batch} per worker), lr {recipe.lr:g} ({recipe.schedule}), "
         f"augment {run_cfg['augment']}, pass 1 {'from the cache' if cache else 'by the backbone'}")
    printer = _ProgressPrinter(queue, recipe.epochs, cfg.progress)
    printer.start()
    try:
        trainer.fit()
    except Exception as exc:
        err = _worker_error(exc)
        if err is not None:
            raise err from None
        raise
    finally:
        printer.stop.set()
        printer.join(timeout=5)
        ray.kill(queue.actor)
    history = run_dir.read_metrics()
    run_dir.write_curves(history, f"L-CAM-Img, {ident['backbone']}, {cfg.workers} worker(s)")
    final = load_checkpoint(run_dir.path(CHECKPOINT), cfg.storage_options)
    pos = final["extra"]["position"]
    epochs_rec = [r for r in history if r["kind"] == "epoch"]
    return TrainSummary(cfg.out, "img", int(pos["epoch"]), recipe.epochs, int(pos["global_step"]), int(pos["batch_in_epoch"]) > 0,
                        epochs_rec[-1] if epochs_rec else None, time.perf_counter() - t0, run_dir.path(CHECKPOINT),
                        run_dir.path(METRICS), run_dir.path(CURVES), ckpt["step"] if ckpt else 0,
                        skipped=int(epochs_rec[-1].get("skipped", 0)) if epochs_rec else 0)


def train(cfg: TrainConfig) -> TrainSummary:
    """``lcam train``: L-CAM-Fm or L-CAM-Img; on --resume, what is not given comes from the checkpoint."""
    # Ray Train workers run in their own trial folders: a relative path would land there.
    cfg = dataclasses.replace(
        cfg, out=absolute(cfg.out), cache=cfg.cache and absolute(cfg.cache),
        shards=[absolute(s) for s in cfg.shards] if isinstance(cfg.shards, list) else (cfg.shards and absolute(cfg.shards)),
    )
    if cfg.resume:
        ckpt = RunFolder(cfg.out, cfg.storage_options).checkpoint_for_start(True)
        stored = ckpt["config"]
        cfg = dataclasses.replace(cfg, method=cfg.method or ckpt["method"], cache=cfg.cache or stored.get("cache"),
                                  shards=cfg.shards or stored.get("shards"))
    method = cfg.method or "fm"
    check_config(dataclasses.replace(cfg, method=method))
    return train_img(cfg) if method == "img" else train_fm_placed(cfg)


__all__ = [
    "RunFolder", "TrainConfig", "TrainSummary", "build_image_dataset", "crop_flip", "crop_seed", "decode_for_training",
    "fm_batches", "image_batches", "train_fm_placed", "plot_curves", "ray_train_storage", "read_training_rows", "resolve_recipe", "check_config", "train", "train_fm", "train_img",
]
