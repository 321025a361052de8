"""ROAD (Rong et al. 2022) via pytorch-grad-cam: MoRF/LeRF curves with noisy linear imputation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from lcam.cam_methods.base import Option, int_list

from .base import EvalMetric, EvalOutcome, MetricBatch, batch_seed, register_metric

if TYPE_CHECKING:
    import numpy as np


@register_metric
class ROAD(EvalMetric):
    """Per percentile p: the softmax after imputing the pixels above (MoRF) or below (LeRF) it."""

    name, title = "road", "ROAD (pytorch-grad-cam)"
    help = "also ROAD MoRF/LeRF via pytorch-grad-cam (costly: 2P+1 forwards and 2P sparse solves per image)"
    options = (
        Option(
            "percentiles",
            int_list,
            (10, 20, 30, 40, 50, 60, 70, 80, 90),
            "ROAD percentiles, comma-separated",
            flag="road-percentiles",
        ),
        Option(
            "seed", int, 0, "seed of ROAD's imputation noise (per batch: SeedSequence([seed, batch]))", flag="road-seed"
        ),
    )

    def compute(self, batch: MetricBatch) -> dict[str, np.ndarray]:
        from lcam.metrics.road import road_scores

        r = road_scores(
            batch.backbone,
            batch.images,
            batch.cams,
            batch.class_ids.cpu(),
            self.percentiles,
            seed=batch_seed(self.seed, batch.batch_id),
        )
        return {"morf": r.morf.numpy(), "lerf": r.lerf.numpy(), "clean": r.clean.numpy()}

    def summarize(self, Y: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        if "morf" not in arrays or arrays["morf"].shape[1] == 0:
            return {}
        morf, lerf = arrays["morf"], arrays["lerf"]
        return {
            "morf_mean": morf.mean(1).tolist(),
            "lerf_mean": lerf.mean(1).tolist(),
            "combined": float(((lerf - morf) / 2).mean()),
        }

    def protocol(self) -> dict[str, Any]:
        p = len(self.percentiles)
        return {
            "percentiles": list(self.percentiles),
            "seed": self.seed,
            "cost_per_image": f"{2 * p + 1} forwards + {2 * p} sparse linear solves",
            "imputation": "NoisyLinearImputer (noise 0.01) in pixel space [0, 1]",
            "score": "softmax probability of the target class",
            "combined": "mean over percentiles of (LeRF - MoRF) / 2",
        }

    def markdown(self, res: EvalOutcome) -> list[str]:
        import numpy as np

        p = list(self.percentiles)
        lines = [
            "## ROAD (pytorch-grad-cam)",
            "",
            f"Percentiles {p}: MoRF removes the most relevant pixels first (lower is better), LeRF the least "
            "relevant first (higher is better), imputed with NoisyLinearImputer; combined = mean over percentiles of (LeRF - MoRF)/2. "
            f"Cost per image: {2 * len(p) + 1} forwards + {2 * len(p)} sparse linear solves.",
            "",
            "| Method | N | MoRF mean ↓ | LeRF mean ↑ | combined ↑ | seconds |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for m in res.methods:
            s = m.metrics.get("road") or {}
            if "morf_mean" in s:
                lines.append(
                    f"| {m.label} | {m.n} | {np.mean(s['morf_mean']):.4f} | {np.mean(s['lerf_mean']):.4f} | "
                    f"{s['combined']:.4f} | {s['seconds']:.1f} |"
                )
        return lines

    def csv_columns(self) -> list[str]:
        return ["road_morf_mean", "road_lerf_mean"]

    def csv_cells(self, arrays: Mapping[str, np.ndarray], j: int) -> list[str]:
        return [f"{arrays['morf'][:, j].mean():.9g}", f"{arrays['lerf'][:, j].mean():.9g}"]
