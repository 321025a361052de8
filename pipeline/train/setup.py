"""What both training methods start from: one :class:`TrainStart` built once from the config
(the config's checks, :func:`check_config`; the checkpoint to resume, read once; the recipe,
:func:`resolve_recipe`; the starting attention; the export rules), the backbone of a cache,
and the summary a run returns (:class:`TrainSummary`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..configs import TrainConfig  # torch-free, no loop with pipeline.train.run
from ..errors import FlagNamer, UserError, option_flag
from ..fs import StorageOptions
from .checkpoints import CheckpointMismatch, check_backbone, check_cache, load_checkpoint
from .run_folder import RunFolder, format_epoch

# Options that decide the trajectory of a run: a resumed run must keep them.
FIXED_ON_RESUME = (
    "method",
    "backbone",
    "lr",
    "batch_size",
    "schedule",
    "target",
    "seed",
    "view",
    "augment",
    "init",
    "targets",
    "top_k",
    "init_from",
    "recipe_rule",
)


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
    best: str | None = None  # best.pt: the epoch with the lowest validation loss (the last without validation)
    best_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self, flag: FlagNamer = option_flag) -> list[str]:
        """Console lines; ``flag`` spells options as the running command does (see :class:`UserError`)."""
        state = (
            f"stopped after step {self.steps} ({flag('max_steps')}); {flag('resume')} continues"
            if self.stopped_early
            else "done"
        )
        out = [
            f"L-CAM-{self.method.capitalize()}: {self.epochs_done}/{self.epochs} epochs, {self.steps} steps in {self.seconds:.1f}s: {state}"
        ]
        if self.last_epoch:
            out.append("last epoch: " + format_epoch(self.last_epoch))
        if self.skipped:
            out.append(f"skipped {self.skipped} undecodable images")
        if self.ran_on:
            out.append(f"trained in a Ray task on node {self.ran_on[:12]}")
        out += [f"checkpoint {self.checkpoint} (the last state)"]
        if self.best:
            out.append(
                f"best       {self.best}"
                + (f" (epoch {self.best_epoch}: the lowest validation loss)" if self.best_epoch else "")
            )
        out += [f"metrics    {self.metrics}", f"curves     {self.curves}"]
        return out


@dataclass
class TrainStart:
    """A run's start, built once from the config (:meth:`from_config`) and handed to the
    L-CAM-Fm and L-CAM-Img loops, which then only run their loops: the config checked once
    (a resumed run's method, data and augmentation taken from its checkpoint), the checkpoint
    to resume from read once (None for a new run), and what both methods derive from them:
    the recipe, the starting attention and the export rules."""

    cfg: TrainConfig
    method: str
    run_dir: RunFolder
    ckpt: dict[str, Any] | None
    augment: str  # L-CAM-Img's: given, else the resumed run's, else random

    @classmethod
    def from_config(cls, cfg: TrainConfig, method: str | None = None) -> "TrainStart":
        """Check ``cfg`` and read the checkpoint to resume (``cfg.resume``); ``method``: the
        loop that asks (a new run's method is ``cfg.method``, fm if not given)."""
        run_dir = RunFolder(cfg.out, cfg.storage_options)
        ckpt = run_dir.checkpoint_for_start(cfg.resume)  # None for a new run (refused where a run exists)
        stored = ckpt["config"] if ckpt is not None else {}
        method = method or cfg.method or (ckpt["method"] if ckpt is not None else "fm")
        cfg = dataclasses.replace(
            cfg, method=method, cache=cfg.cache or stored.get("cache"), shards=cfg.shards or stored.get("shards")
        )
        augment = cfg.augment or stored.get("augment") or "random"
        # L-CAM-Img: a resumed run's augmentation is checked against --cache too
        check_config(dataclasses.replace(cfg, augment=augment) if method == "img" else cfg)
        if ckpt is not None and ckpt["method"] != method:
            raise CheckpointMismatch(
                f"the checkpoint in {cfg.out} is an L-CAM-{ckpt['method'].capitalize()} run, "
                f"not L-CAM-{method.capitalize()}"
            )
        return cls(cfg, method, run_dir, ckpt, augment)

    def begin(
        self,
        backbone: Any,
        samples: int | None,
        data: Mapping[str, Any],
        cache_fingerprint: str | None = None,
        what: str = "this backbone",
    ) -> "RunPlan":
        """What the loop runs: a resumed run's backbone and cache checked against its checkpoint,
        the recipe and run config (:func:`resolve_recipe`, ``samples`` training samples, with the
        ``data`` fields the checkpoints record), a new run's starting attention and inherited
        coverage (:func:`initial_attention`), and the export rule for rows no sample trained
        (:func:`export_fill`, against the start, recomputed on resume)."""
        if self.ckpt is not None:
            check_backbone(self.ckpt, backbone.describe(), what)
            if cache_fingerprint is not None:
                check_cache(self.ckpt, cache_fingerprint)
        recipe, run_cfg = resolve_recipe(self.cfg, self.method, backbone.name, self.ckpt, samples=samples)
        run_cfg.update(data)
        # the start, computed once: a new run's attention before it trains, or (resume) recomputed
        # when the export (--uncovered, --row-prior) or the decay towards the start needs it
        attention, inherited = (
            (None, None) if self.ckpt is not None else initial_attention(backbone, run_cfg, self.cfg.storage_options)
        )
        needs_start = (
            recipe.decay_to == "start"
            or (run_cfg.get("uncovered") or "keep") != "keep"
            or bool(run_cfg.get("row_prior"))
        )
        start = attention
        if start is None and needs_start:
            start = initial_attention(backbone, run_cfg, self.cfg.storage_options)[0]
        fill = export_fill(run_cfg, start)
        decay_start = (
            {k: v.detach().clone() for k, v in start.state_dict().items()} if recipe.decay_to == "start" else None
        )
        # a finished run resumed with another export (--uncovered, --row-prior): export again, no step
        reexport = (
            self.ckpt is not None
            and int(self.ckpt["epoch"]) >= recipe.epochs
            and export_changed(self.ckpt["config"], run_cfg)
        )
        return RunPlan(recipe, run_cfg, attention, inherited, fill, reexport, decay_start)


@dataclass
class RunPlan:
    """:meth:`TrainStart.begin`'s answer: what a training loop runs with."""

    recipe: Any
    run_cfg: dict[str, Any]
    attention: Any  # a new run's starting attention; None when resuming (the checkpoint's is loaded)
    inherited: torch.Tensor | None  # coverage an --init-from checkpoint's rows bring
    fill: Any  # the export rule, (trained state, coverage) -> FillResult
    reexport_only: bool
    decay_start: dict[str, torch.Tensor] | None = None  # the attention recipe.decay_to "start" decays towards


def check_config(cfg: TrainConfig) -> None:
    """Refuse a config that cannot train, from its values alone (no data read, nothing written).

    :func:`train` runs it first; a job that trains after other stages (``lcam pipeline``)
    runs it before its first stage, so a bad combination fails before any work is done.
    Options left None are checked with the defaults a new run gets (on ``resume`` the
    checkpoint's values are checked when training starts).
    """
    from lcam.recipe import default_recipe
    from lcam.training import INITS
    from lcam.uncovered import FILLS, parse_ridge

    from ..placement import check_where

    method = cfg.method or "fm"
    if method not in ("fm", "img"):
        raise UserError(
            lambda flag: (
                f"unknown {flag('method')} {method!r}: use fm (from the feature cache) or img (from the shards)"
            )
        )
    check_where(cfg.where)
    for fld, allowed in (
        ("schedule", ("step", "onecycle")),
        ("target", ("label", "predicted")),
        ("augment", ("random", "center")),
        ("init", ("auto", *INITS)),
        ("targets", ("single", "top-k")),
        ("recipe_rule", ("spec", "data-size")),
    ):
        value = getattr(cfg, fld)
        if value not in (None, *allowed):
            raise UserError(lambda flag: f"{flag(fld)} must be {' or '.join(map(repr, allowed))}, got {value!r}")
    if cfg.max_steps is not None and cfg.max_steps < 0:  # 0: write the starting checkpoint only
        raise UserError(lambda flag: f"{flag('max_steps')} must be 0 or more, got {cfg.max_steps}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(lambda flag: f"{flag('top_k')} must be >= 1, got {cfg.top_k}")
    if cfg.uncovered not in (None, *FILLS):
        raise UserError(lambda flag: f"{flag('uncovered')} must be {' or '.join(FILLS)}, got {cfg.uncovered!r}")
    try:
        parse_ridge(cfg.transfer_ridge)
    except ValueError:
        raise UserError(
            lambda flag: f"{flag('transfer_ridge')} must be auto or a number >= 0, got {cfg.transfer_ridge!r}"
        ) from None
    if cfg.row_prior is not None and not cfg.row_prior >= 0:
        raise UserError(lambda flag: f"{flag('row_prior')} must be a number of samples >= 0, got {cfg.row_prior!r}")
    if not cfg.resume:
        check_start(
            cfg.uncovered, cfg.row_prior, cfg.init or ("random" if cfg.recipe_rule == "spec" else "auto"), cfg.init_from
        )
        if cfg.top_k is not None and cfg.targets != "top-k":
            raise UserError(lambda flag: f"{flag('top_k')} needs {flag('targets')} top-k")
        if cfg.targets == "top-k" and (cfg.target or "label") != "predicted":
            raise UserError(
                lambda flag: (
                    f"{flag('targets')} top-k trains each image for its top-K predicted classes: add {flag('target')} predicted"
                )
            )
        if cfg.init_from and cfg.init == "cam":
            raise UserError(
                lambda flag: (
                    f"give either {flag('init')} cam or {flag('init_from')} CHECKPOINT, not both ({flag('init_from')} sets the whole attention)"
                )
            )
    if method == "fm" and not cfg.cache:
        raise UserError(
            lambda flag: (
                f"L-CAM-Fm trains from a feature cache: pass {flag('cache')} URL (make one with `lcam extract`)"
            )
        )
    if method == "fm":
        return
    if not cfg.shards:
        raise UserError(
            lambda flag: f"L-CAM-Img streams images: pass {flag('shards')} (a pattern or a folder with index.json)"
        )
    if cfg.workers < 1:
        raise UserError(lambda flag: f"{flag('workers')} must be >= 1, got {cfg.workers}")
    augment = cfg.augment or (None if cfg.resume else "random")
    if cfg.cache and augment == "random":
        raise UserError(
            lambda flag: (
                f"a feature cache holds the clean centre crop: L-CAM-Img's pass 1 can come from it only with {flag('augment')} center "
                f"(random crops need the backbone at every step); drop {flag('cache')} or use {flag('augment')} center"
            )
        )
    if not cfg.resume:
        batch = (
            cfg.batch_size or default_recipe(cfg.backbone or "efficientnet_lite0", cfg.schedule or "step").batch_size
        )
        if batch >= 1 and batch % cfg.workers:
            raise UserError(
                lambda flag: (
                    f"the batch size {batch} is the global batch: it must split evenly over {cfg.workers} workers; "
                    f"change {flag('batch_size')} or {flag('workers')}"
                )
            )


def resolve_recipe(
    cfg: TrainConfig, method: str, backbone_name: str, ckpt: Mapping[str, Any] | None, samples: int | None = None
):
    """The effective recipe and run config: defaults per backbone (SPEC 3) or by data size
    (``samples``: training samples), or the checkpoint's. Values were checked by :func:`check_config`."""
    from lcam.recipe import Recipe, default_recipe

    if cfg.top_k is not None and (cfg.targets or (ckpt or {}).get("config", {}).get("targets")) != "top-k":
        raise UserError(lambda flag: f"{flag('top_k')} needs {flag('targets')} top-k")
    if ckpt is None:
        from lcam.recipe import recipe_for_data

        rule = cfg.recipe_rule or "data-size"  # the default of lcam train, lcam pipeline and lcam demo alike
        if rule == "data-size":
            if samples is None:
                raise UserError(
                    lambda flag: (
                        f"{flag('recipe_rule')} data-size needs the number of training samples (known for a cache and for indexed shards)"
                    )
                )
            recipe = recipe_for_data(backbone_name, method, samples)
            if cfg.schedule is not None and cfg.schedule != recipe.schedule:
                recipe = default_recipe(backbone_name, cfg.schedule)
        else:
            recipe = default_recipe(backbone_name, cfg.schedule or "step")
        recipe = recipe.with_overrides(
            lr=cfg.lr,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay,
            decay_to=cfg.decay_to,
        )
        if recipe.lr <= 0 or recipe.epochs < 1 or recipe.batch_size < 1:
            raise UserError(
                lambda flag: (
                    f"{flag('lr')}, {flag('epochs')} and {flag('batch_size')} must be positive "
                    f"(got lr {recipe.lr}, epochs {recipe.epochs}, batch size {recipe.batch_size})"
                )
            )
        targets = cfg.targets or "single"
        top_k = (cfg.top_k or 3) if targets == "top-k" else 1
        target = cfg.target or "label"
        run = {
            "method": method,
            "backbone": backbone_name,
            "lr": recipe.lr,
            "batch_size": recipe.batch_size,
            "schedule": recipe.schedule,
            "target": target,
            "seed": 0 if cfg.seed is None else cfg.seed,
            "view": cfg.view or "random",
            "augment": cfg.augment or "random",
            "recipe": recipe.to_dict(),
            "recipe_rule": rule,
            # The small-data recipe starts from CAM where the head allows it (initial_attention
            # resolves "auto"): on unseen classes a random row is noise, a CAM row Grad-CAM's equal
            # (benchmarks/generalisation.py). The SPEC's recipe keeps the SPEC's random draw: at its
            # lr 0.01 CAM-initialised rows barely move (loss 3.82 -> 3.80 in 6 epochs where the
            # random init falls by a third, tests/test_training.py's run), so it would not be the SPEC's training.
            "init": "checkpoint" if cfg.init_from else (cfg.init or ("auto" if rule == "data-size" else "random")),
            "init_from": cfg.init_from,
            "targets": targets,
            "top_k": top_k,
            # export only (not the trajectory): rows no sample trained, see lcam.uncovered
            "uncovered": cfg.uncovered or "init",
            "transfer_ridge": cfg.transfer_ridge or "auto",
            "row_prior": cfg.row_prior,
        }  # None: default_row_prior once init is resolved (initial_attention)
        return recipe, run
    run = dict(ckpt["config"])
    # runs saved before these options existed trained with the SPEC's choices
    run.setdefault("init", "random")
    run.setdefault("init_from", None)
    run.setdefault("targets", "single")
    run.setdefault("top_k", 1)
    run.setdefault("recipe_rule", "spec")
    # The export rule may change on resume (it leaves the trained state alone); runs saved
    # before it existed get the default.
    run["uncovered"] = cfg.uncovered or run.get("uncovered") or "init"
    run["transfer_ridge"] = cfg.transfer_ridge or run.get("transfer_ridge") or "auto"
    run["row_prior"] = cfg.row_prior if cfg.row_prior is not None else float(run.get("row_prior") or 0.0)
    given = {
        "method": method,
        "backbone": backbone_name,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "schedule": cfg.schedule,
        "target": cfg.target,
        "seed": cfg.seed,
        "view": cfg.view if method == "fm" else run.get("view"),
        "augment": cfg.augment if method == "img" else run.get("augment"),
        "init": cfg.init,
        "init_from": cfg.init_from,
        "targets": cfg.targets,
        "top_k": cfg.top_k,
        "recipe_rule": cfg.recipe_rule,
    }
    saved = Recipe(**run["recipe"])
    for fld in ("weight_decay", "decay_to"):  # part of the recipe: fixed on resume too
        if getattr(cfg, fld) is not None and getattr(cfg, fld) != getattr(saved, fld):
            raise CheckpointMismatch(
                lambda flag: (
                    f"cannot resume with {flag(fld)} {getattr(cfg, fld)}: the run trained with "
                    f"{getattr(saved, fld)}; drop it or start a new run with another {flag('out')}"
                )
            )
    differ = [k for k, v in given.items() if v is not None and k in FIXED_ON_RESUME and run.get(k) != v]
    if differ:
        raise CheckpointMismatch(
            lambda flag: (
                "cannot resume: these options differ from the checkpoint's run, so it would not continue the same training:\n  "
                + "\n  ".join(f"{flag(k)}: checkpoint {run.get(k)!r}, now {given[k]!r}" for k in differ)
                + f"\nDrop them (the checkpoint's values are used) or start a new run with another {flag('out')}."
            )
        )
    recipe = Recipe(**run["recipe"])
    if cfg.epochs is not None and cfg.epochs != recipe.epochs:
        if recipe.schedule == "onecycle":
            raise CheckpointMismatch(
                lambda flag: (
                    f"the one-cycle schedule of this run spans {recipe.epochs} epochs; {flag('epochs')} cannot change it to {cfg.epochs} on resume"
                )
            )
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
        raise UserError(
            lambda flag: (
                f"the cache {cache.url} holds features of {name} with weights {ident.get('weights')} (digest {str(ident.get('weights_digest'))[:12]}), "
                f"but {flag('weights')} {weights} gives digest {mine['weights_digest'][:12]}; pass the weights the cache was made with"
            )
        )
    return backbone


def initial_attention(
    backbone: Any, run_cfg: dict[str, Any], storage_options: StorageOptions = None
) -> tuple[Any, torch.Tensor | None]:
    """The attention a new run starts from (``init``, ``init_from``) and the coverage it
    inherits (an ``init_from`` checkpoint's rows were trained by its samples). ``init``
    "auto" becomes "cam" when the backbone's head is pooling + linear, else "random", in
    ``run_cfg`` too (what the checkpoint records)."""
    from lcam.training import NoLinearClassifier, init_attention

    if run_cfg.get("init") == "auto":
        run_cfg["init"] = "cam" if backbone.linear_classifier() is not None else "random"
    if run_cfg.get("row_prior") is None:
        run_cfg["row_prior"] = default_row_prior(run_cfg)
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


def check_start(uncovered: str | None, row_prior: float | None, init: str | None, init_from: str | None) -> None:
    """Refuse export rules that need a start row that explains: ``--uncovered transfer`` maps
    CAM rows (``init`` cam, or auto before the head is known); ``--row-prior`` pulls trained rows
    towards their start, which must not be a random draw. Checked up front from the options
    (``init`` auto passes) and again at export with ``init`` resolved."""
    if uncovered == "transfer" and (init_from or init not in ("cam", "auto")):
        raise UserError(
            lambda flag: (
                f"{flag('uncovered')} transfer maps CAM rows: it needs {flag('init')} cam (or auto on a pooling + "
                f"linear head); this run starts from "
                + (
                    f"its {flag('init_from')} checkpoint, whose own rows {flag('uncovered')} init keeps"
                    if init_from
                    else init
                )
                + f": use {flag('uncovered')} init"
            )
        )
    if row_prior and not init_from and init not in ("cam", "auto"):
        raise UserError(
            lambda flag: (
                f"{flag('row_prior')} pulls trained rows towards where they started, here a random draw: it needs "
                f"{flag('init')} cam or {flag('init_from')}; drop {flag('row_prior')}"
            )
        )


def default_row_prior(run_cfg: Mapping[str, Any]) -> float:
    """``--row-prior`` left out: 1 (the start row worth one sample) with the small-data recipe
    and a start that explains (CAM rows or an --init-from checkpoint), else 0. Measured in
    benchmarks/generalisation.py: on 600 images, one per class, rows fitted to one image
    explain new images worse than their CAM start; pulled half-way they keep most of their
    in-sample gain. At ImageNet scale (1,300 samples a class) the pull would be ~0.1%."""
    explains = bool(run_cfg.get("init_from")) or run_cfg.get("init") == "cam"
    return 1.0 if run_cfg.get("recipe_rule") == "data-size" and explains else 0.0


def export_changed(saved: Mapping[str, Any], run_cfg: Mapping[str, Any]) -> bool:
    """Whether a resumed run asks for another export (``--uncovered``, ``--transfer-ridge``,
    ``--row-prior``) than its checkpoint holds: a finished run is then re-exported, no step."""
    return any(
        saved.get(k, 0.0 if k == "row_prior" else None) != run_cfg.get(k)
        for k in ("uncovered", "transfer_ridge", "row_prior")
    )


def export_fill(run_cfg: Mapping[str, Any], start: Any) -> Any:
    """What :meth:`RunFolder.save` exports for rows no sample trained (``run_cfg["uncovered"]``,
    :func:`lcam.uncovered.fill_uncovered`), as a callable (trained state, coverage) -> FillResult;
    ``start``: the attention (module) the run started from, as :func:`initial_attention` gives
    it (recomputed on resume: it is a function of the backbone, seed and init/init_from)."""
    from lcam.uncovered import fill_uncovered, parse_ridge

    rule = run_cfg.get("uncovered") or "keep"
    prior = float(run_cfg.get("row_prior") or 0.0)
    check_start(rule, prior, run_cfg.get("init"), run_cfg.get("init_from"))
    start_state = {k: v.detach().cpu().clone() for k, v in start.state_dict().items()} if start is not None else {}
    ridge = parse_ridge(run_cfg.get("transfer_ridge"))

    def fill(trained: Mapping[str, torch.Tensor], coverage: torch.Tensor) -> Any:
        return fill_uncovered(trained, coverage, start_state, rule, ridge=ridge, prior=prior)

    return fill
