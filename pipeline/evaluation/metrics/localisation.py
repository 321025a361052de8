"""Localisation against bounding boxes (:mod:`lcam.metrics.localisation`): pointing game,
energy-based pointing game (Score-CAM) and box IoU of the map's top 15%.

Three metrics of one kind: each needs boxes (``needs_boxes``), so ``lcam eval`` switches
them on by itself when the shards carry boxes, and one table in results.md shows them all.
Per image a fraction in [0, 1], NaN for an image without a box inside the crop (left out of
its N); summaries in percent (mean, standard error, N).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from lcam.cam_methods.base import Option

from .base import EvalMetric, EvalOutcome, MetricBatch, fmt, register_metric

if TYPE_CHECKING:
    import numpy as np
    import torch


def fraction_value(text: str | float) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"box IoU's top fraction must be in (0, 1], got {value}")
    return value


class BoxMetric(EvalMetric):
    """A per-image score of the map against the image's boxes (the subclasses say which)."""

    needs_boxes = True
    short: ClassVar[str]  # the table's column
    meaning: ClassVar[str]

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, batch: MetricBatch) -> dict[str, np.ndarray]:
        import numpy as np

        from lcam.metrics.adic import prepare_cams
        from lcam.metrics.localisation import box_masks

        m = batch.cams.shape[0]
        if batch.boxes is None:
            return {"score": np.full(m, np.nan)}
        size = tuple(batch.images.shape[-2:])
        maps = prepare_cams(batch.cams, size).cpu()  # as AD/IC see them: min-max, then bilinear to the input grid
        return {"score": self.score(maps, box_masks(batch.boxes, size)).numpy()}

    def summarize(self, Y: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        import math

        import numpy as np

        if "score" not in arrays:
            return {}
        s = arrays["score"][np.isfinite(arrays["score"])]
        n = len(s)
        return {
            "n": n,
            "mean": float(100 * s.mean()) if n else float("nan"),
            "se": float(100 * s.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        }

    def protocol(self) -> dict[str, Any]:
        return {
            "meaning": self.meaning,
            "percent": "mean over the images with a box inside the crop, x 100",
            "maps": "min-max at their own resolution, bilinear (align_corners=False) to the input grid, as AD/IC",
            "boxes": "mapped through the model's resize and centre crop; pixel in a box when its centre is; several boxes: their union",
        }

    def markdown(self, res: EvalOutcome) -> list[str]:
        box = [m for m in res.metrics if getattr(m, "needs_boxes", False)]
        if not box or box[0] is not self:  # one table for every box metric, by the first
            return []
        n_boxed = max((m.metrics.get(b.name, {}).get("n", 0) for m in res.methods for b in box), default=0)
        lines = [
            "## Localisation against boxes",
            "",
            "Maps (min-max, bilinear to the input grid, as for AD/IC) against the objects' bounding boxes mapped "
            "through the model's resize and centre crop; several boxes count as their union. "
            + " ".join(f"{b.short}: {b.meaning}." for b in box)
            + f" Percent, mean ± standard error over the images with a box inside the crop (N; at most {n_boxed}).",
            "",
            "| Method | N | " + " | ".join(f"{b.short} ↑" for b in box) + " |",
            "|---|--:|" + "--:|" * len(box),
        ]
        for m in res.methods:
            cells = []
            for b in box:
                s = m.metrics.get(b.name) or {}
                cells.append(f"{fmt(s['mean'])} ± {fmt(s['se'])}" if s.get("n") else "n/a")
            n = max((m.metrics.get(b.name, {}).get("n", 0) for b in box), default=0)
            lines.append(f"| {m.label} | {n} | " + " | ".join(cells) + " |")
        return lines

    def csv_columns(self) -> list[str]:
        return [self.name]

    def csv_cells(self, arrays: Mapping[str, np.ndarray], j: int) -> list[str]:
        v = float(arrays["score"][j])
        return ["" if v != v else f"{v:.9g}"]


@register_metric
class PointingGame(BoxMetric):
    name, title, short = "pointing_game", "Pointing game", "pointing game"
    meaning = "the map's maximum inside a box (ties: the share of the tied pixels inside)"
    help = "pointing game against the shards' boxes (on by itself when the shards carry boxes)"

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        from lcam.metrics.localisation import pointing_game

        return pointing_game(maps, masks)


@register_metric
class EnergyPointingGame(BoxMetric):
    name, title, short = "energy_pointing_game", "Energy-based pointing game", "energy pointing game"
    meaning = "the share of the map's energy (sum) inside the boxes, Score-CAM's energy-based pointing game"
    help = "energy-based pointing game (Score-CAM) against the shards' boxes (on by itself when the shards carry boxes)"

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        from lcam.metrics.localisation import energy_pointing_game

        return energy_pointing_game(maps, masks)


@register_metric
class BoxIoU(BoxMetric):
    name, title, short = "box_iou", "Box IoU", "box IoU"
    help = "IoU of the map's top pixels with the shards' boxes (on by itself when the shards carry boxes)"
    options = (
        Option(
            "fraction",
            fraction_value,
            0.15,
            "box IoU: the map's top share of pixels against the boxes",
            flag="box-iou-fraction",
        ),
    )

    @property
    def meaning(self) -> str:  # type: ignore[override]
        return f"IoU of the map's top {self.fraction * 100:g}% pixels with the boxes"

    def score(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        from lcam.metrics.localisation import box_iou

        return box_iou(maps, masks, self.fraction)
