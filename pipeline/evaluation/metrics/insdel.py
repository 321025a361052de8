"""Insertion / deletion AUC (Petsiuk et al. 2018; as RISE and torch-cam report it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from lcam.cam_methods.base import Option

from .base import EvalMetric, EvalOutcome, MetricBatch, fmt, register_metric, standard_error

if TYPE_CHECKING:
    import numpy as np


def baseline_kind(text: str) -> str:
    if text not in ("black", "blur"):
        raise ValueError(f"baseline {text!r} must be black or blur")
    return text


def steps_count(text: str | int) -> int:
    steps = int(text)
    if steps < 1:
        raise ValueError(f"insertion/deletion steps must be at least 1, got {steps}")
    return steps


@register_metric
class InsertionDeletionAUC(EvalMetric):
    """Curves of the class's softmax while pixels are inserted into / deleted from the image in
    CAM order; the areas under them (insertion higher is better, deletion lower)."""

    name, title = "insdel", "Insertion / deletion AUC"
    help = "also insertion/deletion AUC (RISE's protocol; 2(S+1) forwards per image, S = --insdel-steps)"
    options = (
        Option(
            "steps", steps_count, 16, "insertion/deletion steps S (pixels change in S equal parts)", flag="insdel-steps"
        ),
        Option(
            "insertion_baseline",
            baseline_kind,
            "blur",
            "what insertion starts from: blur (RISE) or black",
            flag="insdel-insertion-baseline",
        ),
        Option(
            "deletion_baseline",
            baseline_kind,
            "black",
            "what deleted pixels become: black (RISE) or blur",
            flag="insdel-deletion-baseline",
        ),
    )

    def compute(self, batch: MetricBatch) -> dict[str, np.ndarray]:
        from lcam.metrics.insertion_deletion import insertion_deletion

        r = insertion_deletion(
            batch.model,
            batch.images,
            batch.cams,
            batch.class_ids,
            self.steps,
            self.insertion_baseline,
            self.deletion_baseline,
            batch_size=batch.forward_batch,
        )
        return {"insertion": r.insertion.numpy(), "deletion": r.deletion.numpy()}

    @staticmethod
    def aucs(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from lcam.metrics.insertion_deletion import area_under_curve

        return (
            area_under_curve(torch.from_numpy(arrays["insertion"])).numpy(),
            area_under_curve(torch.from_numpy(arrays["deletion"])).numpy(),
        )

    def summarize(self, Y: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        if "insertion" not in arrays or arrays["insertion"].shape[1] == 0:
            return {}
        ins, dele = self.aucs(arrays)
        return {
            "insertion_auc": float(ins.mean()),
            "deletion_auc": float(dele.mean()),
            "insertion_auc_se": standard_error(ins[None])[0] / 100,
            "deletion_auc_se": standard_error(dele[None])[0] / 100,
            "insertion_curve": arrays["insertion"].mean(1).tolist(),
            "deletion_curve": arrays["deletion"].mean(1).tolist(),
        }

    def protocol(self) -> dict[str, Any]:
        from lcam.metrics.insertion_deletion import protocol

        return protocol(self.steps, self.insertion_baseline, self.deletion_baseline)

    def markdown(self, res: EvalOutcome) -> list[str]:
        p = self.protocol()
        lines = [
            "## Insertion / deletion AUC",
            "",
            f"{p['steps']} steps (step s changes {p['pixels_changed_at_step_s']} pixels, highest CAM first); insertion "
            f"starts from {p['insertion_baseline']}, deletion replaces pixels by {p['deletion_baseline']}; score: "
            f"{p['score']}; AUC: {p['auc']}. Cost per image: {p['forwards_per_image']} forwards.",
            "",
            "| Method | N | insertion AUC ↑ | deletion AUC ↓ | seconds |",
            "|---|--:|--:|--:|--:|",
        ]
        for m in res.methods:
            s = m.metrics.get("insdel") or {}
            if "insertion_auc" in s:
                lines.append(
                    f"| {m.label} | {m.n} | {s['insertion_auc']:.4f} | {s['deletion_auc']:.4f} | {fmt(s['seconds'])} |"
                )
        return lines

    def csv_columns(self) -> list[str]:
        return ["insertion_auc", "deletion_auc"]

    def csv_cells(self, arrays: Mapping[str, np.ndarray], j: int) -> list[str]:
        ins, dele = self.aucs({k: arrays[k][:, j : j + 1] for k in ("insertion", "deletion")})
        return [f"{ins[0]:.9g}", f"{dele[0]:.9g}"]
