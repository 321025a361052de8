"""Training the attention mechanism (SPEC sections 2-3): step, epoch loop, resumable state.

Pure PyTorch and data-agnostic: :class:`LCAMTrainer` consumes any iterable of
:class:`TrainBatch` (cached feature maps for L-CAM-Fm, images for L-CAM-Img, or both),
so the same loop runs from a feature cache, from images end to end, or inside a
data-parallel worker (pass ``wrap``, e.g. DDP: the whole training forward goes
through the wrapped module so that gradient synchronisation sees it).

The state (:meth:`LCAMTrainer.state_dict`) holds everything that decides the next
step: attention weights, optimizer and scheduler, position (epoch, batch within the
epoch, global step), the metric sums of the unfinished epoch and the RNG state. With
a data source whose order is a function of (seed, epoch), restoring it and feeding
the batches from the same position reproduces the uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .attention import AttentionMechanism
from .backbones.base import Backbone
from .loss import LCAMLoss
from .model import LCAM, Method
from .recipe import Recipe, make_optimizer, make_scheduler

METRIC_NAMES = ("loss", "ce", "area", "tv", "agreement")


@dataclass
class TrainBatch:
    """One step's input. ``targets`` None: the backbone's top-1 on the clean image (SPEC 3, ``predicted``),
    or its top-K with a trainer's ``top_k`` K > 1; (B,) one class per sample, (B, K) K classes per sample.

    L-CAM-Fm needs ``feats`` or ``images``; L-CAM-Img needs ``images`` (``feats``, when
    given, replace its first pass).
    """

    targets: torch.Tensor | None = None
    feats: torch.Tensor | None = None
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        for t in (self.targets, self.feats, self.images):
            if t is not None:
                return int(t.shape[0])
        return 0


@dataclass
class MetricSums:
    """Sample-weighted sums of the loss terms and of the agreement, for one epoch."""

    n: float = 0.0
    loss: float = 0.0
    ce: float = 0.0
    area: float = 0.0
    tv: float = 0.0
    agree: float = 0.0
    steps: int = 0

    def add(self, n: int, loss: float, ce: float, area: float, tv: float, agree: int) -> None:
        self.n += n
        self.loss += loss * n
        self.ce += ce * n
        self.area += area * n
        self.tv += tv * n
        self.agree += agree
        self.steps += 1

    def to_tensor(self) -> torch.Tensor:
        """float64 vector, e.g. for an all-reduce across data-parallel workers."""
        return torch.tensor(
            [self.n, self.loss, self.ce, self.area, self.tv, self.agree, self.steps], dtype=torch.float64
        )

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "MetricSums":
        v = [float(x) for x in t.tolist()]
        return cls(*v[:6], steps=int(round(v[6])))

    def means(self) -> dict[str, float]:
        """Per-sample means: loss, ce, area, tv and agreement (fraction of samples whose
        masked prediction is the target)."""
        n = max(self.n, 1.0)
        return {
            "loss": self.loss / n,
            "ce": self.ce / n,
            "area": self.area / n,
            "tv": self.tv / n,
            "agreement": self.agree / n,
        }

    def to_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "loss": self.loss,
            "ce": self.ce,
            "area": self.area,
            "tv": self.tv,
            "agree": self.agree,
            "steps": self.steps,
        }


@dataclass
class StepStats:
    """What one optimizer step did (unweighted batch means)."""

    n: int
    loss: float
    ce: float
    area: float
    tv: float
    agree: int
    lr: float  # weight learning rate used by this step


class _TrainingForward(nn.Module):
    """The whole training forward as one module call, so a DDP wrapper sees it."""

    def __init__(self, model: LCAM, method: Method) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(
        self, targets: torch.Tensor, feats: torch.Tensor | None, images: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.training_forward(self.method, targets, feats=feats, images=images)


INITS = ("random", "cam")


class NoLinearClassifier(ValueError):
    """``init='cam'`` asked for a backbone whose head is not global pooling + one linear layer."""


def init_attention(backbone: Backbone, seed: int, init: str = "random") -> AttentionMechanism:
    """The attention mechanism, initialised as ``init`` says.

    ``random``: PyTorch's default init drawn from ``seed`` (global RNG untouched; SPEC).
    ``cam``: row k and bias k copied from the classifier (:meth:`AttentionMechanism.init_from_classifier`),
    so an untrained row gives class k's CAM; only for pooling + linear heads (others raise
    :class:`NoLinearClassifier`: CAM itself is undefined for a fully connected head).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: use {' or '.join(INITS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attention = AttentionMechanism(backbone.feature_shape[0], backbone.num_classes)
    if init == "cam":
        fc = backbone.linear_classifier()
        if fc is None:
            raise NoLinearClassifier(
                f"--init cam needs a head of global average pooling + one linear classifier; {backbone.name}'s head is not "
                "(e.g. VGG-16's fully connected layers), so there is no CAM to start from: use --init random"
            )
        attention.init_from_classifier(*fc)
    return attention


def expand_targets(targets: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(B, K) targets -> B*K single-target samples, sample-major: each of ``tensors`` (B, ...)
    repeated K times per sample. The L-CAM loss of the expanded batch is the mean over k of
    the K single-target losses (CE and area are means over B*K maps, TV divides by 2*B*K)."""
    k = targets.shape[1]
    out = [targets.reshape(-1)]
    out += [None if t is None else t.repeat_interleave(k, dim=0) for t in tensors]
    return tuple(out)


class LCAMTrainer:
    """Optimizer steps on the attention mechanism of ``model``; the backbone stays frozen.

    ``steps_per_epoch`` sizes the schedules (step: lr changes at epoch boundaries;
    one-cycle: total steps). ``autocast_dtype`` (e.g. ``torch.bfloat16`` on GPU) runs
    the backbone passes under autocast; the loss is computed in float32. ``wrap`` wraps
    the training-forward module (DDP); the optimizer still updates the attention
    parameters in place.
    """

    def __init__(
        self,
        model: LCAM,
        method: Method,
        recipe: Recipe,
        steps_per_epoch: int,
        *,
        loss: LCAMLoss | None = None,
        device: torch.device | str | None = None,
        autocast_dtype: torch.dtype | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        top_k: int = 1,
        start: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if method not in ("fm", "img"):
            raise ValueError(f"unknown method {method!r}: use 'fm' or 'img'")
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1 (is the training data empty?)")
        if not 1 <= top_k <= model.backbone.num_classes:
            raise ValueError(f"top_k must be between 1 and the number of classes, got {top_k}")
        self.top_k = int(top_k)
        self.device = torch.device(device) if device is not None else next(model.attention.parameters()).device
        self.model = model.to(self.device)
        self.method: Method = method
        self.recipe = recipe
        self.steps_per_epoch = int(steps_per_epoch)
        self.loss_fn = loss or LCAMLoss()
        self.autocast_dtype = autocast_dtype
        forward = _TrainingForward(self.model, method)
        self.forward = wrap(forward) if wrap is not None else forward
        if recipe.decay_to not in ("zero", "start"):
            raise ValueError(f"unknown decay_to {recipe.decay_to!r}: use 'zero' or 'start'")
        # recipe.decay_to "start": weight decay pulls towards these weights (default: the attention as given, i.e. the start of a new run;
        # a resumed run passes its start again). The gradient gets weight_decay * (p - start), as SGD's own decay adds weight_decay * p.
        self.start: dict[str, torch.Tensor] | None = None
        if recipe.decay_to == "start" and recipe.weight_decay:
            src = start if start is not None else self.model.attention.state_dict()
            self.start = {k: v.detach().to(self.device, torch.float32).clone() for k, v in src.items()}
        self.optimizer = make_optimizer(self.model.attention, recipe)
        self.scheduler = make_scheduler(self.optimizer, recipe, self.steps_per_epoch)
        self.epoch = 0  # the epoch in progress (or next to start)
        self.batch_in_epoch = 0  # batches of that epoch already done
        self.global_step = 0
        self.running = MetricSums()
        # Coverage: (sample, target) pairs per class row in the epoch in progress, and the most
        # of any epoch so far; see :attr:`coverage`.
        num_classes = model.attention.num_classes
        self.epoch_counts = torch.zeros(num_classes, dtype=torch.int64)
        self.max_counts = torch.zeros(num_classes, dtype=torch.int64)
        # Data-parallel training: sums a worker's epoch counts over all workers (e.g. an all-reduce).
        self.reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def coverage(self) -> torch.Tensor:
        """Per class row, how many samples trained it in one epoch (the most of any epoch,
        the one in progress included): with fixed targets, the number of distinct training
        samples whose target (one of their top-K) is that class. 0: the row never trained."""
        return torch.maximum(self.max_counts, self.epoch_counts)

    # ---- one step
    def _targets(
        self, batch: TrainBatch, feats: torch.Tensor | None, images: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Targets and (for 'predicted' without targets) the F computed to find them."""
        if batch.targets is not None:
            if self.top_k > 1 and (batch.targets.dim() != 2 or batch.targets.shape[1] != self.top_k):
                raise ValueError(
                    f"top_k={self.top_k} needs (B, {self.top_k}) targets or none (the top-{self.top_k} "
                    f"is then computed), got shape {tuple(batch.targets.shape)}"
                )
            return batch.targets.to(self.device, non_blocking=True).long(), feats
        backbone = self.model.backbone
        with torch.no_grad(), self._autocast():
            if feats is None:
                if images is None:
                    raise ValueError("a batch needs targets, feature maps or images")
                feats = backbone.features(backbone.normalize(images))
            logits = backbone.head(feats)
            targets = logits.argmax(1) if self.top_k == 1 else logits.topk(self.top_k, dim=1).indices
        return targets, feats

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def step(self, batch: TrainBatch) -> StepStats:
        """Forward, loss, backward, optimizer and scheduler step for one batch."""
        feats = batch.feats.to(self.device, non_blocking=True) if batch.feats is not None else None
        images = batch.images.to(self.device, non_blocking=True) if batch.images is not None else None
        targets, feats = self._targets(batch, feats, images)
        if self.method == "fm" and feats is None:
            # End-to-end L-CAM-Fm: the frozen backbone at every step (no graph needed).
            backbone = self.model.backbone
            with torch.no_grad(), self._autocast():
                feats = backbone.features(backbone.normalize(images))
        if feats is not None:
            feats = feats.float() if self.method == "fm" else feats
        if targets.dim() == 2:  # K targets per sample: K single-target samples each
            targets, feats, images = expand_targets(targets, feats, images)
        self.epoch_counts += torch.bincount(targets.cpu(), minlength=self.epoch_counts.numel())
        self.model.attention.train()
        lr = float(self.optimizer.param_groups[0]["lr"])
        with self._autocast():
            masked_logits, maps = self.forward(targets, feats, images)
        terms = self.loss_fn(masked_logits, targets, maps)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if self.start is not None:
            with torch.no_grad():
                for name, p in self.model.attention.named_parameters():
                    if p.grad is not None:
                        p.grad.add_(p - self.start[name], alpha=self.recipe.weight_decay)
        self.optimizer.step()
        self.scheduler.step()
        agree = int((masked_logits.detach().argmax(1) == targets).sum())
        n = int(targets.shape[0])
        stats = StepStats(
            n,
            float(terms.total.detach()),
            float(terms.ce.detach()),
            float(terms.area.detach()),
            float(terms.tv.detach()),
            agree,
            lr,
        )
        if not math.isfinite(stats.loss):
            raise FloatingPointError(
                f"the loss became {stats.loss} at epoch {self.epoch}, batch {self.batch_in_epoch}: lower the learning rate ({lr:g})"
            )
        self.running.add(n, stats.loss, stats.ce, stats.area, stats.tv, agree)
        self.batch_in_epoch += 1
        self.global_step += 1
        return stats

    # ---- the epoch loop
    def train_epoch(
        self,
        batches: Iterable[TrainBatch],
        *,
        max_steps: int | None = None,
        on_step: Callable[["LCAMTrainer", StepStats], None] | None = None,
    ) -> MetricSums | None:
        """Run this epoch's remaining batches (``batches`` starts at :attr:`batch_in_epoch`).

        Returns the epoch's metric sums and moves to the next epoch; returns None when
        ``max_steps`` (a global step count) stopped it first, keeping the position so a
        later call (or a resumed run) continues from the next batch.
        """
        for batch in batches:
            if max_steps is not None and self.global_step >= max_steps:
                return None
            stats = self.step(batch)
            if on_step is not None:
                on_step(self, stats)
        return self.finish_epoch()  # the data ran out: the epoch is complete

    def finish_epoch(self) -> MetricSums:
        sums = self.running
        self.running = MetricSums()
        counts = self.reduce_counts(self.epoch_counts) if self.reduce_counts is not None else self.epoch_counts
        self.max_counts = torch.maximum(self.max_counts, counts.cpu().long())
        self.epoch_counts = torch.zeros_like(self.max_counts)
        self.epoch += 1
        self.batch_in_epoch = 0
        return sums

    def evaluate(
        self, batches: Iterable[TrainBatch], attention_state: Mapping[str, torch.Tensor] | None = None
    ) -> MetricSums:
        """The loss terms and agreement on ``batches`` without a step (validation): nothing of the
        trainer's state changes (no optimizer step, no coverage count, no RNG draw).
        ``attention_state``: evaluate these attention weights instead of the trained ones (e.g.
        the exported checkpoint's, whose untrained rows are filled); the trained ones are put back."""
        attention = self.model.attention
        saved = (
            {k: v.detach().clone() for k, v in attention.state_dict().items()} if attention_state is not None else None
        )
        sums = MetricSums()
        was_training = attention.training
        try:
            if attention_state is not None:
                attention.load_state_dict({k: v.to(self.device) for k, v in attention_state.items()})
            attention.eval()
            with torch.no_grad():
                for batch in batches:
                    feats = batch.feats.to(self.device, non_blocking=True) if batch.feats is not None else None
                    images = batch.images.to(self.device, non_blocking=True) if batch.images is not None else None
                    targets, feats = self._targets(batch, feats, images)
                    if self.method == "fm" and feats is None:
                        backbone = self.model.backbone
                        with self._autocast():
                            feats = backbone.features(backbone.normalize(images))
                    if feats is not None and self.method == "fm":
                        feats = feats.float()
                    if targets.dim() == 2:
                        targets, feats, images = expand_targets(targets, feats, images)
                    with self._autocast():
                        masked_logits, maps = self.model.training_forward(
                            self.method, targets, feats=feats, images=images
                        )
                    terms = self.loss_fn(masked_logits, targets, maps)
                    sums.add(
                        int(targets.shape[0]),
                        float(terms.total),
                        float(terms.ce),
                        float(terms.area),
                        float(terms.tv),
                        int((masked_logits.argmax(1) == targets).sum()),
                    )
        finally:
            if saved is not None:
                attention.load_state_dict(saved)
            attention.train(was_training)
        return sums

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---- resumable state
    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "attention": {k: v.detach().cpu().clone() for k, v in self.model.attention.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "position": {
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch,
            },
            "running": self.running.to_dict(),
            "rng": rng,
            "coverage": {"epoch": self.epoch_counts.clone(), "max": self.max_counts.clone()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pos = state["position"]
        if int(pos["steps_per_epoch"]) != self.steps_per_epoch:
            raise ValueError(
                f"the saved run had {pos['steps_per_epoch']} steps per epoch, this one has {self.steps_per_epoch}: "
                "the data or the batch size changed, so the run cannot continue exactly"
            )
        self.model.attention.load_state_dict(state["attention"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch_in_epoch, self.global_step = (
            int(pos["epoch"]),
            int(pos["batch_in_epoch"]),
            int(pos["global_step"]),
        )
        r = state["running"]
        self.running = MetricSums(r["n"], r["loss"], r["ce"], r["area"], r["tv"], r["agree"], int(r["steps"]))
        cov = state.get("coverage")  # absent in states saved before coverage was counted
        if cov is not None:
            self.epoch_counts, self.max_counts = cov["epoch"].clone().long(), cov["max"].clone().long()
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu() if hasattr(rng["torch"], "cpu") else rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)


__all__ = [
    "INITS",
    "LCAMTrainer",
    "METRIC_NAMES",
    "MetricSums",
    "NoLinearClassifier",
    "StepStats",
    "TrainBatch",
    "expand_targets",
    "init_attention",
]
