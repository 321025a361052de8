"""Average Drop / Increase in Confidence (SPEC section 5): the protocol's metric, always on."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Mapping

from .base import EvalMetric, EvalOutcome, MetricBatch, fmt, register_metric, standard_error

if TYPE_CHECKING:
    import numpy as np


def pct(r: float) -> str:
    return f"{r * 100:g}%"


def subset_table(res: EvalOutcome, limit: int) -> list[dict[str, Any]]:
    """AD/IC of every method on the images of rank < ``limit`` (the images a limited method saw)."""
    import torch

    from lcam.metrics.adic import average_drop, increase_in_confidence

    out = []
    for m in res.methods:
        e = res.per_method[m.id]
        keep = res.ranks[e["rows"]] < limit
        if keep.sum() < min(limit, len(res.keys)):
            continue  # the method did not see all of these images
        y, o = torch.from_numpy(res.Y[e["rows"][keep]]), torch.from_numpy(e["adic"]["O"][:, keep].astype("float64"))
        out.append(
            {
                "id": m.id,
                "label": m.label,
                "n": int(keep.sum()),
                "AD": average_drop(y, o).tolist(),
                "IC": increase_in_confidence(y, o).tolist(),
            }
        )
    return out


@register_metric
class AverageDropIncrease(EvalMetric):
    """O (R, m): the class's softmax on the image masked by the map's top ceil(r H W) pixels."""

    name, title, always, chart_file = "adic", "Average Drop / Increase in Confidence", True, "adic.png"

    def compute(self, batch: MetricBatch) -> dict[str, np.ndarray]:
        from lcam.metrics.adic import confidence_scores

        scores = confidence_scores(
            batch.model,
            batch.images,
            batch.cams,
            self.ratios,
            batch_size=batch.forward_batch,
            clean_probs=batch.clean_probs,
        )
        return {"O": scores.O.cpu().numpy()}

    def summarize(self, Y: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        import numpy as np
        import torch

        from lcam.metrics.adic import average_drop, increase_in_confidence

        O = np.asarray(arrays.get("O", np.zeros((len(self.ratios), 0))), dtype=np.float64)
        if O.shape[1] == 0:
            ad = ic = ad_se = ic_se = [float("nan")] * len(self.ratios)
        else:
            ad = average_drop(torch.from_numpy(Y), torch.from_numpy(O)).tolist()
            ic = increase_in_confidence(torch.from_numpy(Y), torch.from_numpy(O)).tolist()
            ad_se = standard_error(np.maximum(0.0, Y[None] - O) / Y[None])  # what average_drop averages
            ic_se = standard_error((O > Y[None]).astype(np.float64))
        return {
            "ad": ad,
            "ic": ic,
            "ad_se": ad_se,
            "ic_se": ic_se,
            "per_ratio": {
                f"{r:g}": {"AD": a, "IC": i, "AD_se": s, "IC_se": t}
                for r, a, i, s, t in zip(self.ratios, ad, ic, ad_se, ic_se)
            },
        }

    def markdown(self, res: EvalOutcome) -> list[str]:
        from lcam.metrics.adic import AD_FORMULA, IC_FORMULA, TIE_RULE

        ratios, n_all = self.ratios, len(res.keys)
        head = ["Method", "N"] + [f"AD {pct(r)} ↓" for r in ratios] + [f"IC {pct(r)} ↑" for r in ratios]
        rule = "|" + "|".join(["---", "--:"] + ["--:"] * (2 * len(ratios))) + "|"
        lines = ["| " + " | ".join(head) + " |", rule]
        for m in res.methods:
            s = m.metrics["adic"]
            lines.append(
                "| " + " | ".join([m.label, str(m.n)] + [fmt(v) for v in s["ad"]] + [fmt(v) for v in s["ic"]]) + " |"
            )
        lines += [
            "",
            f"- {AD_FORMULA}  (lower is better; the drop is divided by Y_i: pytorch-grad-cam's DropInConfidence is not)",
            f"- {IC_FORMULA}  (higher is better)",
            "- Y_i = softmax(model(x_i))[c_i], O_i = softmax(model(x_i * m_i))[c_i], c_i the top-1 class of the clean image.",
            "- m_i: the method's map for c_i, min-max normalised at its own resolution (a constant map becomes zeros), "
            "bilinearly upsampled (align_corners=False) to 224 x 224, then all but the ceil(r x H x W) highest pixels zeroed; "
            "kept pixels keep their soft values.",
            f"- Ties: {TIE_RULE}.",
            "- Masking in pixel space [0, 1] before the backbone's normalisation (removed pixels are black); softmax scores.",
            "- Standard errors of every number are in results.json; per-image Y and O in per_image.csv.",
        ]
        limits = sorted({m.info.get("limit") for m in res.methods if m.info.get("limit")})
        if limits:
            lines += ["", "## Methods on subsets", ""]
            lines += [
                f"- {m.label}: {m.n} images (the first {m.info['limit']} of a seeded random ranking of the {n_all})"
                for m in res.methods
                if m.info.get("limit")
            ]
            for lim in limits:
                rows = subset_table(res, lim)
                n = rows[0]["n"] if rows else 0
                lines += [
                    "",
                    f"All methods on the same {n} images (ranks < {lim}):",
                    "",
                    "| " + " | ".join(head) + " |",
                    rule,
                ]
                lines += [
                    "| "
                    + " | ".join([r["label"], str(r["n"])] + [fmt(v) for v in r["AD"]] + [fmt(v) for v in r["IC"]])
                    + " |"
                    for r in rows
                ]
        return lines

    def csv_columns(self) -> list[str]:
        return [f"O@{r:g}" for r in self.ratios]

    def csv_cells(self, arrays: Mapping[str, np.ndarray], j: int) -> list[str]:
        return [f"{v:.9g}" for v in arrays["O"][:, j]]

    def chart(self, res: EvalOutcome) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        methods = [m for m in res.methods if m.n]
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(methods) + 5), 4.2))
        width = 0.8 / max(1, len(methods))
        x = np.arange(len(self.ratios))
        colors = plt.get_cmap("tab10")
        for ax, what, title in ((axes[0], "ad", "Average Drop (%) ↓"), (axes[1], "ic", "Increase in Confidence (%) ↑")):
            for j, m in enumerate(methods):
                s = m.metrics["adic"]
                bars = ax.bar(
                    x + (j - (len(methods) - 1) / 2) * width,
                    s[what],
                    width,
                    yerr=np.nan_to_num(s[f"{what}_se"]),
                    capsize=2,
                    color=colors(j % 10),
                    label=f"{m.label} (N={m.n})",
                )
                ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
            ax.set_xticks(x, [f"{pct(r)} kept" for r in self.ratios])
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(f"AD / IC on {len(res.keys)} images (error bars: standard error)", fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        return buf.getvalue()
