"""``lcam eval --split-coverage``: the table split by whether L-CAM's class row was trained.

A checkpoint records, per class row, how many training samples trained it (its coverage).
An image whose explained class (the backbone's top-1) has coverage 0 is explained by a row
that never trained: with ``--init random`` its map is noise, with ``--init cam`` it is CAM.
For each L-CAM checkpoint with a coverage, every method's AD/IC is recomputed on the images
whose class that checkpoint covers and on the others, so methods compare on the same images.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lcam.metrics.adic import average_drop, increase_in_confidence

from ..errors import UserError


def check_coverage(loaded: Sequence[tuple[str | None, str, Mapping[str, Any]]]) -> None:
    """Refuse ``--split-coverage`` before any work when no checkpoint records a coverage."""
    if not any(ckpt.get("coverage") is not None for _, _, ckpt in loaded):
        raise UserError(
            "--split-coverage needs an L-CAM checkpoint that records its coverage (trained by this version of "
            "`lcam train`); give one with --checkpoint, or drop --split-coverage"
        )


def coverage_split(
    res: Any, specs: Sequence[Any], loaded: Sequence[tuple[str | None, str, Mapping[str, Any]]]
) -> list[dict[str, Any]]:
    """Per L-CAM checkpoint with a coverage: AD/IC of every method on covered / uncovered images.

    ``res``: the evaluation's aggregated results (per-image Y, O and class ids); ``specs``:
    its methods, the L-CAM ones first in the order of ``loaded`` (as ``method_specs`` makes them).
    """
    lcam_specs = [s for s in specs if s.kind == "lcam"]
    out = []
    for spec, (_, url, ckpt) in zip(lcam_specs, loaded):
        cov = ckpt.get("coverage")
        if cov is None:
            continue
        covered_image = np.asarray(cov)[res.class_ids[:, 0] if res.class_ids.ndim == 2 else res.class_ids] > 0
        groups = []
        for name, want in (("covered", True), ("uncovered", False)):
            rows = []
            for m in res.methods:
                e = res.per_method[m.id]
                keep = covered_image[e["rows"]] == want
                n = int(keep.sum())
                if n:
                    y, o = (
                        torch.from_numpy(res.Y[e["rows"][keep]]),
                        torch.from_numpy(e["adic"]["O"][:, keep].astype("float64")),
                    )
                    ad, ic = average_drop(y, o).tolist(), increase_in_confidence(y, o).tolist()
                else:
                    ad = ic = [float("nan")] * len(res.ratios)
                rows.append({"id": m.id, "label": m.label, "n": n, "AD": ad, "IC": ic})
            groups.append({"group": name, "rows": rows})
        out.append(
            {
                "checkpoint": url,
                "method": spec.id,
                "label": spec.label,
                "rows_trained": int((np.asarray(cov) > 0).sum()),
                "groups": groups,
            }
        )
    return out


def coverage_markdown(split: Sequence[Mapping[str, Any]], ratios: Sequence[float]) -> str:
    """The section of results.md with the split tables."""
    if not split:
        return ""
    pct = [f"{r * 100:g}%" for r in ratios]
    head = ["Method", "N"] + [f"AD {p} ↓" for p in pct] + [f"IC {p} ↑" for p in pct]

    def fmt(v: float) -> str:
        return "n/a" if v != v else f"{v:.2f}"

    lines = ["", "## Split by coverage (--split-coverage)", ""]
    for s in split:
        lines += [
            f"{s['label']} ({s['checkpoint']}): {s['rows_trained']} class rows trained. Covered: images whose explained "
            "class row trained on at least one sample; uncovered: the others (an untrained row).",
            "",
        ]
        for g in s["groups"]:
            lines += [
                f"{g['group']}:",
                "",
                "| " + " | ".join(head) + " |",
                "|" + "|".join(["---", "--:"] + ["--:"] * (2 * len(ratios))) + "|",
            ]
            lines += [
                "| "
                + " | ".join([r["label"], str(r["n"])] + [fmt(v) for v in r["AD"]] + [fmt(v) for v in r["IC"]])
                + " |"
                for r in g["rows"]
            ]
            lines.append("")
    return "\n".join(lines)
