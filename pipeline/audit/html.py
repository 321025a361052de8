"""The audit page: aggregates and a bounded number of thumbnails, as one self-contained HTML file.

Only rendering: every number and every picture name comes from :mod:`pipeline.audit`. A
picture that was not drawn (the thumbnail budget) is never linked.
"""

from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

from .stats import STAT_NAMES

CONFUSIONS_SHOWN = 12  # rows of the confusion table in the page (confusions.csv has them all)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1250px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0} .note{color:#555;font-size:.9rem}
table.t{border-collapse:collapse;margin:.6rem 0;font-size:.85rem} table.t th,table.t td{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}
table.t th{background:#f4f4f4;cursor:pointer} table.t td.l{text-align:left}
table.t img{width:112px;height:112px;display:block}
.scroll{max-height:420px;overflow:auto;display:inline-block}
.strip{display:flex;gap:4px;align-items:flex-start;margin:.3rem 0 1rem} .strip figure{margin:0;font-size:.7rem;text-align:center}
.strip img{width:96px;height:96px;display:block} .strip .sep{width:14px}
.bar{display:inline-block;background:#c44;height:.7rem;vertical-align:middle}
code{background:#f4f4f4;padding:0 .2rem}
"""

# click a header to sort a table by that column (numbers numerically)
SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = [...body.rows];
  const val = r => { const t = r.cells[i].dataset.v ?? r.cells[i].textContent; const n = parseFloat(t); return isNaN(n) ? t : n; };
  const dir = th.dataset.dir === 'up' ? -1 : 1; th.dataset.dir = dir === 1 ? 'up' : 'down';
  rows.sort((a, b) => { const x = val(a), y = val(b); return (x > y ? 1 : x < y ? -1 : 0) * dir; }).forEach(r => body.appendChild(r));
}));
"""


def picture_name(what: str, shard_index: int, row: int, class_id: int) -> str:
    """The thumbnail file of one picture (the page and the drawing task agree through this)."""
    return f"{what}-{shard_index}-{row}" + (f"-{class_id}" if class_id >= 0 else "") + ".jpg"


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _num(v: Any, fmt: str = ".3f") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return ""
    return "" if f != f else format(f, fmt)


def _img(pictures: set[str], assets: str, name: str, alt: str) -> str:
    return (
        f'<img src="{_e(assets)}/{_e(name)}" alt="{_e(alt)}" loading="lazy">'
        if name in pictures
        else '<span class="note">not drawn</span>'
    )


def _cls(names: Sequence[str], c: int) -> str:
    return f"{_e(names[c]) if 0 <= c < len(names) else '?'} <code>#{c}</code>"


def render_audit(
    ctx: Mapping[str, Any],
    *,
    per_class: Sequence[Mapping[str, Any]],
    confusions: Sequence[Mapping[str, Any]],
    top_errors: Sequence[Mapping[str, Any]],
    strips: Sequence[Mapping[str, Any]],
    disagreements: Sequence[Mapping[str, Any]],
    pictures: set[str],
    assets: str,
) -> str:
    """The page; ``ctx`` holds the store's description and the run's settings."""

    names = ctx["names"]
    ck = ctx["checkpoint"]
    parts = [
        "<h1>Classifier audit</h1>",
        f'<p class="sub">CAM store <code>{_e(ctx["store"])}</code>: {ctx["samples"]} samples, maps of the {_e(ctx["classes_desc"])}; '
        f"checkpoint {_e(ck.get('url') or ck.get('fingerprint'))} ({_e(ck['backbone'].get('backbone', ''))})</p>",
        f"<p>{ctx['labelled']} samples have a label; {ctx['errors']} of them are misclassified"
        + (f" (accuracy {1 - ctx['errors'] / ctx['labelled']:.1%})" if ctx["labelled"] else "")
        + f'. Every figure below is in <a href="per_class.csv">per_class.csv</a>, <a href="confusions.csv">confusions.csv</a> '
        f"and <code>per_sample.parquet</code>; the page shows at most {ctx['max_thumbnails']} pictures.</p>",
    ]

    # 1. errors
    parts.append("<h2>Errors explained</h2>")
    if not ctx["labelled"]:
        parts.append('<p class="note">No sample of the store has a label: there are no errors to explain.</p>')
    elif not ctx["errors"]:
        parts.append('<p class="note">No labelled sample is misclassified.</p>')
    else:
        has_label_maps = "label" in ctx["columns"] or any(c.startswith("top-") for c in ctx["columns"])
        if not has_label_maps:
            parts.append(
                '<p class="note">The store holds no map of the true class; make it with <code>lcam cams --classes predicted,label</code> to see both maps.</p>'
            )
        rows = "".join(
            f'<tr><td class="l">{_cls(names, int(r["label"]))}</td><td class="l">{_cls(names, int(r["predicted"]))}</td><td>{int(r["count"])}</td></tr>'
            for r in confusions[:CONFUSIONS_SHOWN]
        )
        recurring = sum(1 for r in confusions if int(r["count"]) > 1)
        more = (
            f"; the first {CONFUSIONS_SHOWN} shown, all in confusions.csv" if len(confusions) > CONFUSIONS_SHOWN else ""
        )
        parts.append(f"<h3>Confusions, most frequent first ({len(confusions)} pairs, {recurring} recurring{more})</h3>")
        parts.append(
            f'<table class="t sortable" id="confusions"><thead><tr><th>true class</th><th>predicted</th><th>count</th></tr></thead><tbody>{rows}</tbody></table>'
        )
        parts.append(f"<h3>The most confident mistakes ({len(top_errors)} of {ctx['errors']})</h3>")
        parts.append(
            f'<p class="note">Sorted by the probability of the wrong class. IoU: overlap of the two maps\' top {ctx["top_fraction"]:.0%} regions '
            f"(low: the classifier looked elsewhere for the wrong class; high: the same evidence read as another class).</p>"
        )
        body = []
        for r in top_errors:
            si, row, p, t = int(r["shard_index"]), int(r["row"]), int(r["predicted"]), int(r["label"])
            body.append(
                f"<tr><td>{_img(pictures, assets, picture_name('image', si, row, -1), r['key'])}<code>{_e(r['key'])}</code></td>"
                f"<td>{_img(pictures, assets, picture_name('cam', si, row, p), 'map of the predicted class')}</td>"
                + (
                    f"<td>{_img(pictures, assets, picture_name('cam', si, row, t), 'map of the true class')}</td>"
                    if has_label_maps
                    else '<td><span class="note">not in this store</span></td>'
                )
                + f'<td class="l">{_cls(names, p)}<br>p = {_num(r["predicted_prob"])}</td><td class="l">{_cls(names, t)}<br>p = {_num(r["label_prob"])}</td>'
                f"<td>{_num(r['pred_label_iou'], '.2f')}</td></tr>"
            )
        parts.append(
            '<table class="t" id="errors"><thead><tr><th>image</th><th>map: predicted</th><th>map: true</th><th>predicted class</th>'
            f"<th>true class</th><th>IoU top {ctx['top_fraction']:.0%}</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
        )

    # 2. evidence per class
    parts.append("<h2>Where the evidence lies, per class</h2>")
    parts.append(
        f'<p class="note">Per predicted class, statistics of each sample\'s map of that class (measured at {ctx["grid"]}x{ctx["grid"]}): '
        f"<b>area</b> above half the maximum; <b>entropy</b> of the map as a distribution (0: one pixel, 1: even); "
        f"<b>border</b>: share of the map's mass within {ctx['band']:.0%} of the image side from an edge (an even map scores the band's area); "
        f"<b>centre</b> of mass (y, x; 0.5 = middle); <b>spread</b> around it (image sides). "
        "Classes ranked by border share: evidence at the border or spread thin is the classic symptom of a learned context bias "
        "(water for boats, snow for wolves). <b>training samples</b> (when the store's checkpoint records them): the samples "
        "that trained the class's L-CAM row; 0 is an untrained row, its map not learnt. Click a header to sort.</p>"
    )
    head = "<th>rank</th><th>class</th><th>n</th><th>precision</th>" + "".join(
        f"<th>{s}</th>" for s in ("area", "entropy", "border", "centre y", "centre x", "spread")
    )
    head += f"<th>ρ {_e(ctx['compare_label'])}</th>" if ctx["compare_label"] else ""
    from ..cams.gallery import coverage_mark  # imports torch: only here

    trained = any("train_samples" in r for r in per_class)  # the checkpoint's coverage: samples behind each class row
    head += "<th>training samples</th>" if trained else ""
    body = []
    for i, r in enumerate(per_class, 1):
        cells = "".join(
            f'<td data-v="{_num(r[f"{s}_mean"], ".6f")}">{_num(r[f"{s}_mean"])} ± {_num(r[f"{s}_std"], ".2f")}</td>'
            for s in STAT_NAMES
        )
        rho = f"<td>{_num(r['rho_mean'], '.2f')}</td>" if ctx["compare_label"] else ""
        if trained:
            k = int(r.get("train_samples", -1))
            rho += f'<td data-v="{k}">{k}{_e(coverage_mark(k, short=True))}</td>'
        body.append(
            f'<tr><td>{i}</td><td class="l">{_cls(names, int(r["class"]))}</td><td>{int(r["n"])}</td><td>{_num(r["precision"], ".2f")}</td>{cells}{rho}</tr>'
        )
    parts.append(
        f'<div class="scroll"><table class="t sortable" id="classes"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )
    if strips:
        parts.append(f"<h3>The {len(strips)} most border-reliant classes: typical and extreme samples</h3>")
        parts.append(
            '<p class="note">Left: the samples whose border share is nearest the class mean; right: the highest border shares.</p>'
        )
        for r in strips:
            c = int(r["class"])

            def figs(picks: Sequence[tuple[int, int]]) -> str:
                return "".join(
                    f"<figure>{_img(pictures, assets, picture_name('cam', si, row, c), 'map')}</figure>"
                    for si, row in picks
                )

            parts.append(
                f"<div><b>{_cls(names, c)}</b>: border {_num(r['border_mean'], '.2f')}, spread {_num(r['spread_mean'], '.2f')}, n = {int(r['n'])}"
                f'<div class="strip">{figs(r["typical"])}<span class="sep"></span>{figs(r["extreme"])}</div></div>'
            )

    # 3. agreement
    parts.append("<h2>Agreement with a second method</h2>")
    if not ctx["compare_label"]:
        parts.append(
            '<p class="note">No second method: give <code>--compare EVAL_DIR</code>, a folder written by <code>lcam eval --save-maps N</code>.</p>'
        )
    else:
        label = _e(ctx["compare_label"])
        parts.append(
            f"<p>Spearman rank correlation between the L-CAM map and the {label} map of the same class (the class the evaluation explained), "
            f"over the pixels at {ctx['grid']}x{ctx['grid']}, on the {ctx['compared']} samples <code>{_e(ctx['compare_dir'])}</code> kept maps for. "
            "Per class in the table above; below, where the two disagree most: where two methods disagree, a person should look.</p>"
        )
        body = []
        for r in disagreements:
            si, row, c = int(r["shard_index"]), int(r["row"]), int(r["compare_class"])
            body.append(
                f"<tr><td>{_img(pictures, assets, picture_name('image', si, row, -1), r['key'])}<code>{_e(r['key'])}</code></td>"
                f"<td>{_img(pictures, assets, picture_name('cam', si, row, c), 'L-CAM map')}</td>"
                f"<td>{_img(pictures, assets, picture_name('compare', si, row, c), label + ' map')}</td>"
                f'<td class="l">{_cls(names, c)}</td><td>{_num(r["compare_rho"], ".2f")}</td></tr>'
            )
        parts.append(
            f'<table class="t" id="disagreements"><thead><tr><th>image</th><th>L-CAM</th><th>{label}</th><th>class</th><th>ρ</th></tr></thead><tbody>{"".join(body)}</tbody></table>'
        )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>Classifier audit</title><style>{CSS}</style></head>'
        f"<body>{''.join(parts)}<script>{SCRIPT}</script></body></html>"
    )
