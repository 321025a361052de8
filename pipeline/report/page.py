"""The visual report: metrics table, training curves and a method-by-method gallery.

Reads what the earlier stages wrote (evaluation's ``results.json``/``adic.png``/``maps.npz``,
training runs' ``metrics.jsonl``/``curves.png``) and writes one self-contained page,
``report.html``, with its pictures in ``report_files/`` beside it. Pictures are written
first and the page last (atomically), so the page never links to a missing picture.
"""

from __future__ import annotations

import html
import io
import json
from typing import Any, Mapping, Sequence

import numpy as np

from ..classes import imagenet_classes
from ..fs import StorageOptions, get_fs, join, write_bytes_atomic
from ..render import overlay, png_bytes

ASSETS = "report_files"
MAPS_FILE = "maps.npz"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0}
table.metrics{border-collapse:collapse;margin:1rem 0} table.metrics th,table.metrics td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
table.metrics th{background:#f4f4f4} table.metrics td.m{text-align:left;font-weight:600} td.best{background:#e3f4e3}
.gallery{border-collapse:collapse} .gallery td,.gallery th{padding:4px;text-align:center;font-size:.8rem;vertical-align:top}
.gallery img{width:160px;height:160px;display:block} .note{color:#555;font-size:.9rem}
.curves img{max-width:560px;margin-right:1rem} code{background:#f4f4f4;padding:0 .2rem}
.warn{color:#b00;font-size:.75rem}
"""


def _read(url: str, storage_options: StorageOptions) -> bytes | None:
    fs, path = get_fs(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def save_comparison_maps(
    url: str,
    *,
    keys: Sequence[str],
    images: np.ndarray,
    class_ids: np.ndarray,
    probs: np.ndarray,
    maps: Mapping[str, np.ndarray],
    labels: Mapping[str, str],
    storage_options: StorageOptions = None,
) -> None:
    """Maps of every method for a few images, at each method's own resolution, for the gallery."""
    buf = io.BytesIO()
    arrays = {f"map__{m}": np.asarray(v, dtype=np.float32) for m, v in maps.items()}
    np.savez_compressed(
        buf,
        keys=np.asarray(list(keys)),
        images=np.asarray(images, dtype=np.uint8),
        class_ids=np.asarray(class_ids),
        probs=np.asarray(probs, dtype=np.float32),
        methods=np.asarray(list(maps)),
        labels=np.asarray([labels.get(m, m) for m in maps]),
        **arrays,
    )
    write_bytes_atomic(url, buf.getvalue(), storage_options)


def method_order() -> tuple[str, ...]:
    """Table order: the explainers under test first, then the registered methods in their
    rank order (baselines, then the sanity floors)."""
    from lcam.cam_methods.base import method_names

    return ("lcam-fm", "lcam-img", *method_names())


def _metrics_table(results: Mapping[str, Any]) -> str:
    ratios = [float(r) for r in results["protocol"].get("ratios", [1.0, 0.5, 0.15])]
    rank = {m: i for i, m in enumerate(method_order())}
    methods = [results["methods"][k] for k in sorted(results["methods"], key=lambda k: (rank.get(k, len(rank)), k))]
    cols = [(f"{r:g}", metric) for metric in ("AD", "IC") for r in ratios]
    best = {}
    for key in cols:
        vals = [m["per_ratio"][key[0]][key[1]] for m in methods if key[0] in m.get("per_ratio", {})]
        if vals:
            best[key] = min(vals) if key[1] == "AD" else max(vals)
    head = "".join(f"<th>{metric} {float(r) * 100:g}%{' ↓' if metric == 'AD' else ' ↑'}</th>" for r, metric in cols)
    rows = []
    for m in methods:
        cells = []
        for key in cols:
            v = m["per_ratio"].get(key[0], {}).get(key[1])
            cls = ' class="best"' if v is not None and v == best.get(key) else ""
            cells.append(f"<td{cls}>{'' if v is None else f'{v:.2f}'}</td>")
        rows.append(f'<tr><td class="m">{html.escape(m["label"])}</td><td>{m["n"]}</td>{"".join(cells)}</tr>')
    return f'<table class="metrics"><tr><th>method</th><th>N</th>{head}</tr>{"".join(rows)}</table>'


LOCALISATION = (
    ("pointing_game", "pointing game"),
    ("energy_pointing_game", "energy pointing game"),
    ("box_iou", "box IoU"),
)


def _ordered_methods(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rank = {m: i for i, m in enumerate(method_order())}
    return [results["methods"][k] for k in sorted(results["methods"], key=lambda k: (rank.get(k, len(rank)), k))]


def _localisation_table(results: Mapping[str, Any]) -> str:
    """The localisation metrics (``lcam eval`` on shards with boxes): percent, mean ± s.e.; '' without boxes."""
    methods = _ordered_methods(results)
    cols = [(k, t) for k, t in LOCALISATION if any((m.get(k) or {}).get("n") for m in methods)]
    if not cols:
        return ""
    best = {k: max((m[k]["mean"] for m in methods if (m.get(k) or {}).get("n")), default=None) for k, _ in cols}
    rows = []
    for m in methods:
        cells = []
        for k, _ in cols:
            s = m.get(k) or {}
            if not s.get("n"):
                cells.append("<td></td>")
                continue
            cls = ' class="best"' if s["mean"] == best[k] else ""
            se = "" if s.get("se") is None else f" ± {s['se']:.2f}"
            cells.append(f"<td{cls}>{s['mean']:.2f}{se}</td>")
        n = max((m.get(k) or {}).get("n", 0) for k, _ in cols)
        rows.append(f'<tr><td class="m">{html.escape(m["label"])}</td><td>{n}</td>{"".join(cells)}</tr>')
    head = "".join(f"<th>{t} ↑</th>" for _, t in cols)
    return (
        f'<table class="metrics" id="localisation"><tr><th>method</th><th>N</th>{head}</tr>{"".join(rows)}</table>'
        '<p class="note">Percent, mean ± standard error over the images whose object box lies in the crop. Pointing game: '
        "the map's maximum inside a box; energy pointing game (Score-CAM): the share of the map's sum inside the boxes; "
        "box IoU: the map's top 15% of pixels against the boxes. Boxes go through the model's resize and centre crop.</p>"
    )


def coverage_summary(coverage: Sequence[int]) -> str:
    """One line on the training samples behind an L-CAM checkpoint's class rows."""
    cov = np.asarray(coverage, dtype=np.int64)
    trained = cov[cov > 0]
    if not len(trained):
        return f"no class row of {len(cov)} trained"
    return (
        f"{len(trained)} of {len(cov)} class rows trained, on {int(trained.sum())} samples: per trained row median "
        f"{int(np.median(trained))}, min {int(trained.min())}, max {int(trained.max())}; the other rows never trained"
    )


def write_report(
    url: str,
    *,
    title: str = "L-CAM report",
    subtitle: str = "",
    eval_dir: str | None = None,
    train_runs: Mapping[str, str] | None = None,
    cams_gallery: str | None = None,
    audit_page: str | None = None,
    notes: Sequence[str] = (),
    colormap: str = "jet",
    opacity: float = 0.5,
    storage_options: StorageOptions = None,
) -> str:
    """Write ``url`` (an .html path or URL) and its pictures; returns the page's URL."""
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    assets = join(base, ASSETS)
    parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="sub">{html.escape(subtitle)}</p>')
    parts.append(
        "<p>L-CAM explains a frozen classifier with one 1x1 convolution trained on its last feature maps: "
        "after training, one forward pass gives a class activation map for every class. "
        "L-CAM-Fm applies the map to the feature maps during training (it trains from cached features); "
        "L-CAM-Img applies it to the image.</p>"
    )

    results = None
    if eval_dir:
        raw = _read(join(eval_dir, "results.json"), storage_options)
        results = json.loads(raw) if raw else None
    if results:
        p = results["protocol"]
        parts.append("<h2>Faithfulness: Average Drop and Increase in Confidence</h2>")
        parts.append(_metrics_table(results))
        covered = {
            m["label"]: m["info"]["coverage"]
            for m in _ordered_methods(results)
            if (m.get("info") or {}).get("coverage")
        }
        if covered:  # how many training samples stand behind each class's L-CAM map
            parts.append(
                '<p class="note" id="coverage">Training samples per class row: '
                + "; ".join(
                    f"{html.escape(label)}: {html.escape(coverage_summary(cov))}" for label, cov in covered.items()
                )
                + ". The gallery gives each map's count.</p>"
            )
        loc = _localisation_table(results)
        if loc:
            parts.append("<h2>Localisation against boxes</h2>" + loc)
        parts.append(
            f'<p class="note">N = {results["data"]["evaluated"]} images (per-method N in the table). '
            f"AD = 100/N Σ max(0, Y−O)/Y (lower is better); IC = 100/N Σ [O &gt; Y] (higher is better). "
            f"Y: softmax probability of the predicted class on the clean image; O: on the image masked by the CAM "
            f"keeping ceil(r·H·W) pixels with their soft values (pixel space, black). Tie rule: {html.escape(str(p.get('tie_rule', '')))}</p>"
        )
        chart = _read(join(eval_dir, "adic.png"), storage_options)
        if chart:
            write_bytes_atomic(join(assets, "adic.png"), chart, storage_options)
            parts.append(f'<p><img src="{ASSETS}/adic.png" alt="AD/IC bar chart" style="max-width:900px"></p>')

    if train_runs:
        parts.append('<h2>Training</h2><div class="curves">')
        for name, run in train_runs.items():
            curves = _read(join(run, "curves.png"), storage_options)
            raw = _read(join(run, "metrics.jsonl"), storage_options)
            last = json.loads(raw.decode().strip().splitlines()[-1]) if raw and raw.strip() else None
            if curves:
                fname = f"curves-{name.lower().replace(' ', '-')}.png"
                write_bytes_atomic(join(assets, fname), curves, storage_options)
                parts.append(
                    f'<figure style="display:inline-block"><img src="{ASSETS}/{fname}" alt="{html.escape(name)} training curves">'
                    f"<figcaption>{html.escape(name)}"
                    + (f": final loss {last.get('loss', float('nan')):.3f}" if last and "loss" in last else "")
                    + "</figcaption></figure>"
                )
        parts.append("</div>")

    maps_raw = _read(join(eval_dir, MAPS_FILE), storage_options) if eval_dir else None
    if maps_raw:
        parts.append("<h2>Gallery: the same images, every method</h2>")
        coverage = {mid: m.get("info", {}).get("coverage") for mid, m in (results or {}).get("methods", {}).items()}
        parts.append(_gallery(np.load(io.BytesIO(maps_raw)), assets, colormap, opacity, storage_options, coverage))
    if cams_gallery:
        parts.append(
            f'<p>All CAMs of the dataset: <a href="{html.escape(cams_gallery)}">gallery of the CAM store</a>.</p>'
        )
    if audit_page:
        parts.append(
            f"<p>The classifier audited over the whole dataset (errors explained, where each class's evidence lies): "
            f'<a href="{html.escape(audit_page)}" id="audit-link">audit</a>.</p>'
        )
    for n in notes:
        parts.append(f'<p class="note">{html.escape(n)}</p>')
    page = f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head><body>{"".join(parts)}</body></html>'
    write_bytes_atomic(url, page.encode(), storage_options)
    return url


def _gallery(
    data: Any,
    assets: str,
    colormap: str,
    opacity: float,
    storage_options: StorageOptions,
    coverage: Mapping[str, Sequence[int] | None] | None = None,
) -> str:
    """``coverage``: per L-CAM method, its checkpoint's training samples per class row; maps of
    untrained or barely trained rows are marked."""
    import torch

    from lcam.explain import minmax_normalize, upsample

    from ..cams.gallery import coverage_mark

    names = imagenet_classes()
    methods, labels = [str(m) for m in data["methods"]], [str(x) for x in data["labels"]]
    head = "<tr><th>image</th>" + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"
    rows = []
    # images that every method ran on first (costly methods run on a subset)
    evaluated = [
        sum(not np.isnan(np.asarray(data[f"map__{m}"][i], dtype=np.float32)).all() for m in methods)
        for i in range(len(data["keys"]))
    ]
    for i in sorted(range(len(data["keys"])), key=lambda i: -evaluated[i]):
        key = data["keys"][i]
        image = data["images"][i]
        cls, prob = int(data["class_ids"][i]), float(data["probs"][i])
        cname = names[cls] if 0 <= cls < len(names) else str(cls)
        fname = f"img-{i:03d}.png"
        write_bytes_atomic(join(assets, fname), png_bytes(image), storage_options)
        cells = [
            f'<td><img src="{ASSETS}/{fname}" alt="{html.escape(str(key))}">{html.escape(str(key))}<br>{html.escape(cname)} ({prob:.0%})</td>'
        ]
        for m, label in zip(methods, labels):
            raw = np.asarray(data[f"map__{m}"][i], dtype=np.float32)
            if np.isnan(raw).all():  # this method ran on a subset without this image
                cells.append('<td class="note">not evaluated<br>on this image</td>')
                continue
            cam = torch.from_numpy(raw)
            cam = upsample(minmax_normalize(cam), image.shape[:2]).numpy()
            oname = f"img-{i:03d}-{m.replace('+', 'p')}.png"
            write_bytes_atomic(join(assets, oname), png_bytes(overlay(image, cam, colormap, opacity)), storage_options)
            cov = (coverage or {}).get(m)
            known = cov is not None and 0 <= cls < len(cov)
            mark = coverage_mark(int(cov[cls])) if known else ""
            count = f'<span class="note">{int(cov[cls])} training samples</span>' if known and not mark else ""
            cells.append(
                f'<td><img src="{ASSETS}/{oname}" alt="{html.escape(label)} on {html.escape(str(key))}">'
                + (f'<span class="warn">{html.escape(mark)}</span>' if mark else count)
                + "</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="gallery">{head}{"".join(rows)}</table>'
