"""Rows no sample trained: what an exported attention holds for them.

Row k of the attention trains only from samples whose target is class k (its coverage,
:attr:`lcam.training.LCAMTrainer.coverage`). A row with coverage 0 gets a dense zero
gradient, yet SGD's weight decay still shrinks it (and its bias) every step: after a few
thousand steps it is ~1e9 times smaller than where it started. Its min-max normalised map
is unchanged in float32, but a float16 attention underflows it and the raw Z no longer is
the start (for ``--init cam``: no longer CAM). :func:`fill_uncovered` replaces those rows
in an attention that is being *exported* (the trained state itself stays as trained, so
training stays equal to the SPEC's and resumes exactly) by a rule:

``init``
    the row and bias it started from: the decay undone exactly (for ``--init cam`` the
    classifier's row, so the map is CAM's by construction);
``transfer``
    (start rows = CAM rows) one linear feature-space map fitted by ridge regression on the
    covered rows (their start row -> the direction of their trained row) and applied to the
    uncovered rows' start rows; the ridge comes from k-fold cross-validation on the covered
    rows (held-out cosine), never from evaluation images, unless given;
``keep``
    the trained state as it is (the decayed rows).

Rows some samples trained can be pulled back towards their start too (``prior`` N, "the
start row is worth N samples"): a row trained by n samples is exported pointing
n / (n + N) of the way from its start row's direction to its trained row's direction (norm
and bias interpolated alike). On small data a row fitted to one or two images explains
*new* images of its class worse than the CAM row it started from (it points at what was
particular to those images); on ImageNet-sized data (~1,300 samples per class) the pull is
negligible. ``prior`` 0 exports the trained rows as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

FILLS = ("init", "transfer", "keep")
# Candidate ridges for the cross-validation, as multiples of the mean eigenvalue of the
# covered start rows' Gram matrix (so the grid does not depend on the rows' scale).
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
CV_FOLDS = 5


@dataclass
class FillResult:
    """The exported attention state and what made it."""

    state: dict[str, torch.Tensor]
    rule: str
    rows: list[int]  # the class rows this rule replaced (coverage 0)
    ridge: float | None = None  # transfer: the ridge used (multiple of the mean eigenvalue)
    cv: dict[str, float] = field(default_factory=dict)  # transfer with ridge auto: held-out cosine per candidate ridge
    note: str = ""
    prior: float = 0.0  # trained rows pulled towards their start (see the module's docstring)
    blended: list[int] = field(default_factory=list)  # the trained rows the prior moved

    @property
    def replaced(self) -> list[int]:
        """Every row whose exported value is not the trained one (their trained values go to
        the checkpoint's ``trained_rows``, so a resume continues from the trained state)."""
        return sorted((self.rows if self.rule != "keep" else []) + self.blended)

    def record(self) -> dict[str, Any]:
        """JSON-able summary for the checkpoint: which rule filled which rows."""
        out: dict[str, Any] = {"rule": self.rule, "rows": list(self.rows)}
        if self.prior:
            out["prior"] = self.prior
            out["blended"] = len(self.blended)
        if self.ridge is not None:
            out["ridge"] = self.ridge
        if self.cv:
            out["cv_cosine"] = dict(self.cv)
        if self.note:
            out["note"] = self.note
        return out


def _rows(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = state["conv.weight"], state["conv.bias"]
    return weight.reshape(weight.shape[0], -1), bias


def fill_uncovered(
    trained: Mapping[str, torch.Tensor],
    coverage: torch.Tensor,
    start: Mapping[str, torch.Tensor],
    rule: str = "init",
    ridge: float | str = "auto",
    folds: int = CV_FOLDS,
    grid: Sequence[float] = RIDGE_GRID,
    prior: float = 0.0,
) -> FillResult:
    """The attention state (``AttentionMechanism.state_dict()`` layout) whose rows with
    ``coverage`` 0 are filled by ``rule``; covered rows are the trained ones, bit for bit.

    ``trained``: the trained attention state; ``start``: the state training started from
    (for ``transfer`` its rows must be the classifier's, i.e. ``--init cam``).
    ``ridge``: ``transfer`` only, "auto" (cross-validated over ``grid``) or a multiple of the
    mean eigenvalue of the covered start rows' Gram matrix.
    ``prior``: pulls the covered rows towards their start rows (:func:`pull_to_start`).
    """
    if rule not in FILLS:
        raise ValueError(f"unknown rule {rule!r}: use {', '.join(FILLS)}")
    if not prior >= 0:
        raise ValueError(f"a row prior must be >= 0, got {prior!r}")
    result = _fill(trained, coverage, start, rule, ridge, folds, grid)
    if prior > 0:
        weight, bias = _rows(result.state)
        w0, b0 = _rows(start)
        result.blended = pull_to_start(weight, bias, w0, b0, coverage.reshape(-1), prior)
        result.prior = float(prior)
    return result


def _fill(
    trained: Mapping[str, torch.Tensor],
    coverage: torch.Tensor,
    start: Mapping[str, torch.Tensor],
    rule: str,
    ridge: float | str,
    folds: int,
    grid: Sequence[float],
) -> FillResult:
    out = {k: v.detach().clone() for k, v in trained.items()}
    weight, bias = _rows(out)
    if coverage.numel() != weight.shape[0]:
        raise ValueError(f"coverage has {coverage.numel()} rows, the attention {weight.shape[0]}")
    uncovered = (coverage.reshape(-1) <= 0).nonzero().flatten()
    if rule == "keep" or uncovered.numel() == 0:
        return FillResult(out, rule, uncovered.tolist())
    w0, b0 = _rows(start)
    covered = (coverage.reshape(-1) > 0).nonzero().flatten()
    if rule == "init" or covered.numel() < 2:
        # transfer with fewer than 2 trained rows (e.g. a checkpoint before or right after the
        # first step) has nothing to fit: those exports get the start rows, and say so
        weight[uncovered] = w0[uncovered].to(weight.dtype)
        bias[uncovered] = b0[uncovered].to(bias.dtype)
        return FillResult(
            out,
            "init",
            uncovered.tolist(),
            note=""
            if rule == "init"
            else f"transfer asked, {covered.numel()} row trained (at least 2 are needed): filled by init",
        )
    w_start = w0.double()
    goal = _goal(w_start[covered], weight[covered].double())
    cv: dict[str, float] = {}
    if ridge == "auto":
        cv = cross_validate(w_start[covered], goal, folds, grid)
        ridge = max(cv, key=lambda r: cv[r])  # first of equals: the grid's order
        ridge_value = float(ridge)
    else:
        ridge_value = float(ridge)
    pred = transfer_rows(w_start[covered], goal, w_start[uncovered], ridge_value)
    weight[uncovered] = pred.to(weight.dtype)
    # Bias: the start's (the classifier's). The rows keep the start's norm (see _goal), so
    # Z_k keeps CAM's scale and its offset relative to that scale: only where the map
    # points changes, which is all the covered rows can teach about a class they never saw.
    bias[uncovered] = b0[uncovered].to(bias.dtype)
    return FillResult(out, rule, uncovered.tolist(), ridge_value, {f"{r:g}": c for r, c in cv.items()})


def pull_to_start(
    weight: torch.Tensor, bias: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, coverage: torch.Tensor, prior: float
) -> list[int]:
    """In place: each row with coverage n > 0 moves to s = n / (n + prior) of the way from its
    start: direction ``normalize((1 - s) w0/|w0| + s w/|w|)``, norm ``(1 - s)|w0| + s|w|``, bias
    ``(1 - s) b0 + s b``. Directions, not raw rows: a trained row's norm reflects the lr and the
    weight decay, so a raw interpolation would let the larger row decide where the map points.
    Returns the rows moved."""
    rows = (coverage > 0).nonzero().flatten()
    if rows.numel() == 0:
        return []
    n = coverage[rows].double()[:, None]
    s = n / (n + prior)
    w, w_start = weight[rows].double(), w0[rows].double()
    norm, norm0 = w.norm(dim=1, keepdim=True), w_start.norm(dim=1, keepdim=True)
    direction = (1 - s) * w_start / norm0.clamp_min(1e-30) + s * w / norm.clamp_min(1e-30)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-30)
    weight[rows] = (direction * ((1 - s) * norm0 + s * norm)).to(weight.dtype)
    bias[rows] = ((1 - s[:, 0]) * b0[rows].double() + s[:, 0] * bias[rows].double()).to(bias.dtype)
    return rows.tolist()


def _goal(w_start: torch.Tensor, w_trained: torch.Tensor) -> torch.Tensor:
    """The trained rows' directions at their start rows' norms. Why not the trained rows
    themselves: their norms come from one class's few samples, the lr and the weight
    decay (a per-class calibration of the sigmoid), not from a feature-space map shared by
    classes; a fit to raw rows would also be dominated by the largest of them."""
    return w_trained / w_trained.norm(dim=1, keepdim=True).clamp_min(1e-30) * w_start.norm(dim=1, keepdim=True)


def transfer_rows(w_fit: torch.Tensor, goal: torch.Tensor, w_new: torch.Tensor, ridge: float) -> torch.Tensor:
    """Rows ``w_new (I + M)`` rescaled to ``|w_new|``, with M the ridge solution of
    ``w_fit (I + M) ~ goal``: ``M = w_fit^T (G + lam I)^-1 (goal - w_fit)``, ``G = w_fit w_fit^T``
    (the dual solve: n_fit x n_fit, not C x C), ``lam = ridge * mean eigenvalue of G``."""
    gram = w_fit @ w_fit.T
    lam = ridge * float(gram.diagonal().mean())
    coef = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), goal - w_fit)
    pred = w_new + (w_new @ w_fit.T) @ coef
    return pred / pred.norm(dim=1, keepdim=True).clamp_min(1e-30) * w_new.norm(dim=1, keepdim=True)


def cross_validate(
    w_fit: torch.Tensor, goal: torch.Tensor, folds: int = CV_FOLDS, grid: Sequence[float] = RIDGE_GRID
) -> dict[float, float]:
    """Ridge -> mean cosine between predicted and trained directions on held-out covered
    rows (``folds``-fold; rows assigned to folds by index modulo, deterministic)."""
    n = w_fit.shape[0]
    folds = max(2, min(folds, n))
    fold_of = torch.arange(n) % folds
    scores: dict[float, float] = {}
    for r in grid:
        total = 0.0
        for f in range(folds):
            test, fit = fold_of == f, fold_of != f
            pred = transfer_rows(w_fit[fit], goal[fit], w_fit[test], float(r))
            total += float(torch.nn.functional.cosine_similarity(pred, goal[test], dim=1).sum())
        scores[float(r)] = total / n
    return scores


def parse_ridge(text: str | float | None) -> float | str:
    """``auto`` or a non-negative number; raises ValueError otherwise."""
    if text is None or text == "auto":
        return "auto"
    value = float(text)
    if not value >= 0:
        raise ValueError(f"a ridge must be >= 0 or auto, got {text!r}")
    return value


__all__ = [
    "CV_FOLDS",
    "FILLS",
    "FillResult",
    "RIDGE_GRID",
    "cross_validate",
    "fill_uncovered",
    "parse_ridge",
    "pull_to_start",
    "transfer_rows",
]
