"""results.md, per_image.csv and the charts: the shared frame, each metric's part from its plug-in."""

from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Sequence

from .results import EvalResults


def render_markdown(res: EvalResults, report: Mapping[str, Any]) -> str:
    n_all = len(res.keys)
    data = report["data"]
    bb = report["backbone"]
    lines = [
        "# Average Drop / Increase in Confidence",
        "",
        f"Backbone `{bb['backbone']}` (weights `{bb['weights']}`, digest `{bb['weights_digest'][:12]}`); "
        f"{n_all} images from `{data['shards']}`"
        + (
            f" (seeded random subset, seed {data['seed']}, of {data['available']})"
            if data["limit"]
            else f" (all {data['available']})"
        )
        + "; the class explained is the backbone's top-1 on the clean image.",
        "",
    ]
    for i, metric in enumerate(res.metrics):
        lines += ([] if i == 0 else [""]) + metric.markdown(res)
    t = report["timings"]
    names = [m.name for m in res.metrics]
    lines += [
        "",
        "## Cost",
        "",
        f"Engine {report['engine']['name']} on {report['engine']['device']}, batches of {report['engine']['batch_size']}; "
        f"wall time {t['total_seconds']:.1f} s; one clean forward per image ({res.clean_forwards} in all, "
        f"{res.clean_seconds:.1f} s) shared by every method.",
        "",
        f"| Method | N | seconds | images/s | forwards per image (map + {' + '.join(names)}) |",
        "|---|--:|--:|--:|--:|",
    ]
    for m in res.methods:
        if m.n:
            rate = m.n / m.seconds if m.seconds > 0 else float("inf")
            parts = [m.map_forwards / m.n] + [m.metrics[k]["forwards"] / m.n for k in names]
            lines.append(
                f"| {m.label} | {m.n} | {m.seconds:.1f} | {rate:.2f} | "
                f"{sum(parts):.1f} ({' + '.join(f'{p:.1f}' for p in parts)}) |"
            )
    if res.skipped:
        lines += ["", f"Skipped {len(res.skipped)} image(s) that did not decode (not in N):", ""]
        lines += [f"- `{s['shard']}` / `{s['key']}`: {s['reason']}" for s in res.skipped[:20]]
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.", ""]
    return "\n".join(lines)


def render_csv(res: EvalResults, class_names: Sequence[str] | None) -> bytes:
    """One row per image and method: Y, then every metric's per-image columns."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "key",
            "shard",
            "label",
            "predicted",
            "predicted_name",
            "rank",
            "method",
            "Y",
            *[c for metric in res.metrics for c in metric.csv_columns()],
        ]
    )
    for m in res.methods:
        e = res.per_method[m.id]
        for j, i in enumerate(e["rows"]):
            c = int(res.class_ids[i])
            row = [
                res.keys[i],
                res.shards[i],
                int(res.labels[i]),
                c,
                class_names[c] if class_names else "",
                int(res.ranks[i]),
                m.id,
                f"{res.Y[i]:.9g}",
            ]
            for metric in res.metrics:
                row += metric.csv_cells(e[metric.name], j)
            w.writerow(row)
    return buf.getvalue().encode()


def render_charts(res: EvalResults) -> dict[str, bytes]:
    """file name -> PNG for every metric that draws one (AD/IC: adic.png)."""
    out = {}
    for metric in res.metrics:
        if metric.chart_file:
            png = metric.chart(res)
            if png is not None:
                out[metric.chart_file] = png
    return out
