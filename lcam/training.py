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
from .backbones import Backbone
from .loss import LCAMLoss
from .model import LCAM, Method
from .recipe import Recipe, make_optimizer, make_scheduler

METRIC_NAMES = ("loss", "ce", "area", "tv", "agreement")


@dataclass
class TrainBatch:
    """One step's input. ``targets`` None: the backbone's top-1 on the clean image (SPEC 3, ``predicted``).

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
        return torch.tensor([self.n, self.loss, self.ce, self.area, self.tv, self.agree, self.steps], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "MetricSums":
        v = [float(x) for x in t.tolist()]
        return cls(*v[:6], steps=int(round(v[6])))

    def means(self) -> dict[str, float]:
        """Per-sample means: loss, ce, area, tv and agreement (fraction of samples whose
        masked prediction is the target)."""
        n = max(self.n, 1.0)
        return {"loss": self.loss / n, "ce": self.ce / n, "area": self.area / n, "tv": self.tv / n, "agreement": self.agree / n}

    def to_dict(self) -> dict[str, float]:
        return {"n": self.n, "loss": self.loss, "ce": self.ce, "area": self.area, "tv": self.tv, "agree": self.agree, "steps": self.steps}


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

    def forward(self, targets: torch.Tensor, feats: torch.Tensor | None, images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.training_forward(self.method, targets, feats=feats, images=images)


def init_attention(backbone: Backbone, seed: int) -> AttentionMechanism:
    """The attention mechanism with PyTorch's default init drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AttentionMechanism(backbone.feature_shape[0], backbone.num_classes)


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
    ) -> None:
        if method not in ("fm", "img"):
            raise ValueError(f"unknown method {method!r}: use 'fm' or 'img'")
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1 (is the training data empty?)")
        self.device = torch.device(device) if device is not None else next(model.attention.parameters()).device
        self.model = model.to(self.device)
        self.method: Method = method
        self.recipe = recipe
        self.steps_per_epoch = int(steps_per_epoch)
        self.loss_fn = loss or LCAMLoss()
        self.autocast_dtype = autocast_dtype
        forward = _TrainingForward(self.model, method)
        self.forward = wrap(forward) if wrap is not None else forward
        self.optimizer = make_optimizer(self.model.attention, recipe)
        self.scheduler = make_scheduler(self.optimizer, recipe, self.steps_per_epoch)
        self.epoch = 0  # the epoch in progress (or next to start)
        self.batch_in_epoch = 0  # batches of that epoch already done
        self.global_step = 0
        self.running = MetricSums()

    # ---- one step
    def _targets(self, batch: TrainBatch, feats: torch.Tensor | None, images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Targets and (for 'predicted' without targets) the F computed to find them."""
        if batch.targets is not None:
            return batch.targets.to(self.device, non_blocking=True).long(), feats
        backbone = self.model.backbone
        with torch.no_grad(), self._autocast():
            if feats is None:
                if images is None:
                    raise ValueError("a batch needs targets, feature maps or images")
                feats = backbone.features(backbone.normalize(images))
            targets = backbone.head(feats).argmax(1)
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
        self.model.attention.train()
        lr = float(self.optimizer.param_groups[0]["lr"])
        with self._autocast():
            masked_logits, maps = self.forward(targets, feats, images)
        terms = self.loss_fn(masked_logits, targets, maps)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self.optimizer.step()
        self.scheduler.step()
        agree = int((masked_logits.detach().argmax(1) == targets).sum())
        n = int(targets.shape[0])
        stats = StepStats(n, float(terms.total.detach()), float(terms.ce.detach()), float(terms.area.detach()), float(terms.tv.detach()), agree, lr)
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
        self.epoch += 1
        self.batch_in_epoch = 0
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
            "position": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch},
            "running": self.running.to_dict(),
            "rng": rng,
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
        self.epoch, self.batch_in_epoch, self.global_step = int(pos["epoch"]), int(pos["batch_in_epoch"]), int(pos["global_step"])
        r = state["running"]
        self.running = MetricSums(r["n"], r["loss"], r["ce"], r["area"], r["tv"], r["agree"], int(r["steps"]))
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu() if hasattr(rng["torch"], "cpu") else rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)


__all__ = ["LCAMTrainer", "METRIC_NAMES", "MetricSums", "StepStats", "TrainBatch", "init_attention"]
