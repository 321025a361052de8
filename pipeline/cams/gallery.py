"""Pictures of a CAM store: overlay PNGs and a self-contained HTML gallery.

The images come from the source shards the store records (a store made from a feature
cache names the original shards too), decoded and centre-cropped exactly as the model
saw them, so each map lies on its own pixels. Layout under the gallery URL::

    index.html        originals beside overlays; sort by source order, class, confidence
    img/<n>-<key>.png the centre crop the model saw
    cam/<n>-<key>.png one captioned overlay per explained class, side by side

Every file is written atomically and ``index.html`` last, so a reader never follows a
link to a half-written picture.
"""

from __future__ import annotations

import html
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..fs import StorageOptions, join, write_bytes_atomic


@dataclass
class GalleryResult:
    url: str
    index_url: str
    count: int
    items: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def pick_rows(counts: Sequence[int], n: int) -> list[tuple[int, int]]:
    """``n`` rows spread evenly over the store (all when it has fewer): (shard index, row) pairs.

    Evenly spaced rather than the first ``n``: the gallery then covers every part of the
    dataset, not only its first shard. Deterministic.
    """
    total = int(sum(counts))
    if n <= 0 or total == 0:
        return []
    picks = sorted({(i * total) // n for i in range(n)}) if n < total else list(range(total))
    out, start, s = [], 0, 0
    for g in picks:
        while g >= start + counts[s]:
            start += counts[s]
            s += 1
        out.append((s, g - start))
    return out


BARELY_TRAINED = 5  # class rows trained by fewer samples than this are marked


def coverage_mark(samples: int | None, short: bool = False) -> str:
    """The mark of a map whose class row was untrained (0 samples) or barely trained; '' otherwise."""
    if samples is None or samples < 0 or samples >= BARELY_TRAINED:
        return ""
    if samples == 0:
        return " [untrained]" if short else "untrained class row: its map was not learnt"
    return (
        f" [{samples} sample{'s' if samples > 1 else ''}]"
        if short
        else f"class row trained on {samples} sample{'s' if samples > 1 else ''} only"
    )


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "sample"


def _source_images(url: str, keys: set[str], storage_options: StorageOptions) -> dict[str, bytes]:
    """Encoded images of ``keys`` from one source shard, reading only as far as needed."""
    from ..shards.read import iter_samples

    found: dict[str, bytes] = {}
    try:
        for s in iter_samples(url, storage_options):
            if s.key in keys:
                found[s.key] = s.image
                if len(found) == len(keys):
                    break
    except Exception as exc:  # missing file, no access, damaged tar
        raise UserError(
            f"overlays need the original images, read from the source shard {url}, which is unreadable "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); make it readable there "
            "(--source-storage-option for its credentials) or drop --overlays"
        ) from None
    lost = sorted(keys - set(found))
    if lost:
        raise UserError(
            f"overlays: the source shard {url} no longer holds {len(lost)} of the samples in the CAM store (e.g. {lost[:3]}); it changed since the CAMs were made"
        )
    return found


def write_gallery(
    store: Any,
    n: int,
    *,
    out_url: str | None = None,
    colormap: str = "jet",
    opacity: float = 0.5,
    class_names_url: str | None = None,
    source_storage_options: StorageOptions = None,
    out_storage_options: StorageOptions = None,
    progress: bool = True,
) -> GalleryResult:
    """Write ``n`` overlay PNGs (image + colour map, class name and probability in the
    caption), the matching originals and ``index.html`` for a :class:`~pipeline.cams.run.CamStore`."""
    from lcam.backbones.preprocessing import Preprocessing
    from lcam.explain import upsampled_uint8

    from ..classes import class_names_options, load_class_names
    from ..images import crop_pixels, decode_image
    from ..progress import Progress, say
    from ..render import overlay_panels, png_bytes

    t0 = time.perf_counter()
    out_url = (out_url or join(store.url, "gallery")).rstrip("/")
    options = out_storage_options if out_storage_options is not None else store.storage_options
    if "://" not in out_url or out_url.startswith("file://"):
        options = None  # a local gallery beside a remote store: the store's options are not for it
    backbone = store.identity["checkpoint"]["backbone"]
    names = load_class_names(
        class_names_url, class_names_options(class_names_url, source_storage_options), int(backbone["num_classes"])
    )
    prep = backbone["preprocessing"]
    preprocessing = Preprocessing.from_dict(prep)
    view = store.identity["source"].get("view", "center")
    entries = store.entries()
    picks = pick_rows([int(e["count"]) for e in entries], n)
    if not picks:
        raise UserError(f"the CAM store {store.url} holds no samples: nothing to draw")
    by_shard: dict[int, list[int]] = {}
    for s, row in picks:
        by_shard.setdefault(s, []).append(row)

    items: list[dict[str, Any]] = []
    jobs: list[tuple[str, bytes]] = []
    drawn = Progress(len(picks), progress, what="gallery", unit="overlays")
    fields = (
        ["labels", "class_ids", "probs", "raw", "predicted", "predicted_prob"]
        + (["upsampled"] if store.upsampled_size else [])
        + (["coverage"] if store.class_coverage is not None else [])
    )
    for s, rows in sorted(by_shard.items()):
        entry = entries[s]
        data = store.read_shard(entry["shard_id"], fields=fields, normalized=False)
        images = _source_images(entry["url"], {data["keys"][r] for r in rows}, source_storage_options)
        for r in rows:
            key = data["keys"][r]
            crop = crop_pixels(decode_image(images[key]), preprocessing, view).transpose(1, 2, 0)
            if "upsampled" in data:
                maps = data["upsampled"][r].astype(np.float32) / 255.0
            else:
                maps = (
                    upsampled_uint8(torch.from_numpy(data["raw"][r].astype(np.float32)), crop.shape[0])
                    .numpy()
                    .astype(np.float32)
                    / 255.0
                )
            ids, probs = [int(c) for c in data["class_ids"][r]], [float(p) for p in data["probs"][r]]
            coverage = [int(v) for v in data["coverage"][r]] if "coverage" in data else [None] * len(ids)
            present = [t for t, c in enumerate(ids) if c >= 0]  # -1: a label column of an unlabelled sample
            ids, probs, coverage, maps = (
                [ids[t] for t in present],
                [probs[t] for t in present],
                [coverage[t] for t in present],
                maps[present],
            )
            captions = [f"{names[c]} ({p:.1%})" + coverage_mark(n, short=True) for c, p, n in zip(ids, probs, coverage)]
            stem = f"{len(items):05d}-{_safe_name(key)}.png"
            jobs += [
                (f"img/{stem}", png_bytes(crop)),
                (f"cam/{stem}", png_bytes(overlay_panels(crop, maps, captions, colormap, opacity))),
            ]
            label = int(data["labels"][r])
            items.append(
                {
                    "order": len(items),
                    "key": key,
                    "shard": entry["url"],
                    "class_ids": ids,
                    "class_names": [names[c] for c in ids],
                    "probs": probs,
                    "coverage": coverage,
                    "label": label,
                    "label_name": names[label] if 0 <= label < len(names) else "",
                    "predicted": int(data["predicted"][r]),
                    "original": f"img/{stem}",
                    "overlay": f"cam/{stem}",
                }
            )
            drawn.update(1)
    # PNGs in parallel (object stores: one PUT each, latency-bound), the page last.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: write_bytes_atomic(join(out_url, job[0]), job[1], options), jobs))
    info = store.info()
    page = gallery_html(items, title=f"L-CAM explanations: {store.url}", subtitle=_subtitle(info, colormap, opacity))
    index_url = join(out_url, "index.html")
    write_bytes_atomic(index_url, page.encode(), options)
    seconds = time.perf_counter() - t0
    if progress:
        say(f"gallery: {len(items)} overlays and index.html at {index_url} in {seconds:.1f}s")
    return GalleryResult(out_url, index_url, len(items), items, seconds)


def _subtitle(info: Mapping[str, Any], colormap: str, opacity: float) -> str:
    from ..classes import describe_classes

    ck, src, cls = info["checkpoint"], info["source"], info["classes"]
    what = describe_classes(cls)
    return (
        f"{info['samples']} samples in the store; checkpoint {ck.get('url') or ck['fingerprint']} "
        f"(L-CAM-{str(ck.get('method', '')).capitalize()}, {ck['backbone']['backbone']}); source: {src['kind']} {src.get('url', '')}; "
        f"maps of the {what}; colormap {colormap}, opacity {opacity}"
    )


_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:20px;margin:0 0 4px} p.sub{color:#555;margin:0 0 12px;font-size:13px}
.bar button{margin-right:6px;padding:4px 10px;cursor:pointer}
.bar button.on{background:#224;color:#fff}
#grid{display:flex;flex-wrap:wrap;gap:12px;margin-top:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px}
.card.off{border-color:#d33}
.pics{display:flex;gap:6px;align-items:flex-start} .pics img{display:block;max-height:246px}
.meta{margin-top:4px;line-height:1.45} .meta code{font-size:11px;color:#555}
.warn{color:#c22;font-weight:600}
"""

_SCRIPT = """
function sortCards(by, btn){
  const grid=document.getElementById('grid');
  const cards=[...grid.children];
  const num=(c,k)=>parseFloat(c.dataset[k]);
  const cmp={order:(a,b)=>num(a,'order')-num(b,'order'),
    cls:(a,b)=>a.dataset.cls.localeCompare(b.dataset.cls)||num(b,'conf')-num(a,'conf'),
    confdown:(a,b)=>num(b,'conf')-num(a,'conf'),
    confup:(a,b)=>num(a,'conf')-num(b,'conf')}[by];
  cards.sort(cmp).forEach(c=>grid.appendChild(c));
  document.querySelectorAll('.bar button').forEach(b=>b.classList.toggle('on',b===btn));
}
"""


def gallery_html(items: Sequence[Mapping[str, Any]], title: str = "L-CAM explanations", subtitle: str = "") -> str:
    """A self-contained page: relative links to the PNGs, a few lines of inline JS to sort."""
    e = html.escape
    cards = []
    for it in items:
        cover = it.get("coverage") or [None] * len(it["class_ids"])
        classes = "<br>".join(
            f"{e(n)} <code>#{c}</code> {p:.1%}"
            + (f" <span class='warn'>{e(coverage_mark(k))}</span>" if coverage_mark(k) else "")
            for n, c, p, k in zip(it["class_names"], it["class_ids"], it["probs"], cover)
        )
        label = ""
        off = False
        if it["label"] >= 0:
            off = it["label"] != it["predicted"]
            label = f"<br>label: {e(it['label_name'])} <code>#{it['label']}</code>" + (
                " <span class='warn'>&ne; predicted</span>" if off else ""
            )
        cards.append(
            f"<div class='card{' off' if off else ''}' data-order='{it['order']}' data-cls='{e(it['class_names'][0], quote=True)}' data-conf='{it['probs'][0]:.6f}'>"
            f"<div class='pics'><a href='{e(it['original'], quote=True)}'><img src='{e(it['original'], quote=True)}' alt='original' loading='lazy'></a>"
            f"<a href='{e(it['overlay'], quote=True)}'><img src='{e(it['overlay'], quote=True)}' alt='overlay' loading='lazy'></a></div>"
            f"<div class='meta'><code>{e(it['key'])}</code><br>{classes}{label}</div></div>"
        )
    # script content is not HTML-decoded: only "</" must not appear in it
    data = json.dumps(
        [
            {k: it[k] for k in ("key", "shard", "class_ids", "probs", "label", "predicted", "original", "overlay")}
            for it in items
        ]
    ).replace("</", "<\\/")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{e(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        f"<h1>{e(title)}</h1><p class='sub'>{e(subtitle)}</p>"
        "<div class='bar'>sort: <button class='on' onclick=\"sortCards('order',this)\">source order</button>"
        "<button onclick=\"sortCards('cls',this)\">class</button>"
        "<button onclick=\"sortCards('confdown',this)\">confidence &darr;</button>"
        "<button onclick=\"sortCards('confup',this)\">confidence &uarr;</button></div>"
        f"<div id='grid'>{''.join(cards)}</div>"
        f"<script type='application/json' id='items'>{data}</script>"
        "</body></html>"
    )
