"""The held-back split of a training run's shards, the same rule for L-CAM-Fm (the cache's
shards) and L-CAM-Img (the image shards): the last ``--val-shards`` shards in sorted order are
held back for validation (default 1 in 20 when there are 20 or more), the first
``--limit-shards`` of the rest train. Both sort by the shard's source URL, so the two methods
hold back the same images when the cache was extracted from the same shards. A resumed run
keeps the split its checkpoint records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..configs import TrainConfig
from ..errors import UserError
from .checkpoints import CheckpointMismatch

# 1 shard in this many is held back by default, when there are at least this many shards
DEFAULT_HOLD_BACK_ONE_IN = 20


def default_val_shards(n_shards: int) -> int:
    """How many shards a run holds back when ``--val-shards`` is not given."""
    return n_shards // DEFAULT_HOLD_BACK_ONE_IN if n_shards >= DEFAULT_HOLD_BACK_ONE_IN else 0


@dataclass(frozen=True)
class HeldBack:
    """A run's split: the ids it trains on, the ids it holds back, and the ``--limit-shards`` it records."""

    train: list[str]
    held: list[str]
    limit: int | None

    def run_fields(self) -> dict[str, Any]:
        """What the run's checkpoints record, so that a resume splits the same way."""
        return {"val_shards": len(self.held), "train_shards_limit": self.limit, "val_shard_ids": self.held}


def split_held_back(ids: Sequence[str], cfg: TrainConfig, ckpt: Mapping[str, Any] | None, where: str) -> HeldBack:
    """The split of ``ids`` (in the order given: sorted by source URL); ``where`` names them in
    errors ("the feature cache s3://..."). On resume, the checkpoint's held-back ids
    (``val_shard_ids``) and training limit."""
    ids = list(ids)
    if ckpt is not None:
        run = ckpt.get("config", {})
        held = list(run.get("val_shard_ids") or [])  # runs saved before validation existed: none
        if cfg.val_shards is not None and cfg.val_shards != len(held):
            raise CheckpointMismatch(
                lambda flag: (
                    f"cannot resume with {flag('val_shards')} {cfg.val_shards}: the run holds back "
                    f"{len(held)} shards; drop the option or start a new run"
                )
            )
        missing = [s for s in held if s not in ids]
        if missing:
            raise UserError(f"the run's validation shards {missing[:3]} are no longer in {where}; start a new run")
        rest = [s for s in ids if s not in set(held)]
        limit = run.get("train_shards_limit")
        return HeldBack(rest[:limit] if limit else rest, held, limit)
    n_val = cfg.val_shards if cfg.val_shards is not None else default_val_shards(len(ids))
    if n_val >= len(ids):
        raise UserError(
            lambda flag: (
                f"{flag('val_shards')} {n_val} holds back every shard of {where} ({len(ids)}): leave some to train on"
            )
        )
    held = ids[len(ids) - n_val :] if n_val else []
    rest = ids[: len(ids) - n_val]
    if cfg.train_shards_limit is not None and cfg.train_shards_limit > len(rest):
        raise UserError(
            lambda flag: (
                f"{flag('train_shards_limit')} {cfg.train_shards_limit}: {where} has only {len(rest)} "
                "training shards (after the validation shards)"
            )
        )
    limit = cfg.train_shards_limit
    return HeldBack(rest[:limit] if limit else rest, held, limit)
