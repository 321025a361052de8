"""The report in a real browser: headless Chromium opens it from a local server.

A harness page (same origin) loads report.html in an iframe, waits for it, and writes
what it finds into its own DOM, which Chromium's --dump-dom prints: how many images the
report has, how many actually loaded (naturalWidth > 0), and the metrics table's rows.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import pytest

from pipeline.fs import write_json_atomic
from pipeline.report.page import save_comparison_maps, write_report
from pipeline.train.run_folder import RunFolder

HARNESS = """<!doctype html><html><body><iframe id="r" src="report.html" style="width:1400px;height:3000px"></iframe>
<pre id="out">pending</pre><script>
document.getElementById('r').addEventListener('load', () => {
  const doc = document.getElementById('r').contentDocument;
  const imgs = Array.from(doc.images);
  const check = () => {
    if (imgs.some(i => !i.complete)) { setTimeout(check, 50); return; }
    const rows = Array.from(doc.querySelectorAll('table.metrics tr')).slice(1).map(r => r.cells[0].textContent);
    document.getElementById('out').textContent = JSON.stringify({
      images: imgs.length, loaded: imgs.filter(i => i.naturalWidth > 0).length,
      broken: imgs.filter(i => i.naturalWidth === 0).map(i => i.getAttribute('src')), rows: rows});
  };
  check();
});
</script></body></html>"""


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def make_report(folder, scorecam_on_last_only: bool = False) -> list[str]:
    """A report from the same inputs the pipeline's stages write (tiny, synthetic numbers).
    ``scorecam_on_last_only``: Score-CAM ran on image "c" only (NaN maps elsewhere), as a
    method limited to a subset leaves it."""
    methods = {
        "lcam-fm": "L-CAM-Fm",
        "lcam-img": "L-CAM-Img",
        "gradcam": "Grad-CAM",
        "gradcam++": "Grad-CAM++",
        "scorecam": "Score-CAM",
    }
    eval_dir = folder / "eval"
    results = {
        "protocol": {"ratios": [1.0, 0.5, 0.15], "tie_rule": "stable sort, smaller index first"},
        "data": {"evaluated": 4},
        "methods": {
            m: {
                "label": label,
                "n": 4,
                "per_ratio": {r: {"AD": 10.0 + i, "IC": 20.0 - i} for r in ("1", "0.5", "0.15")},
            }
            for i, (m, label) in enumerate(methods.items())
        },
    }
    write_json_atomic(str(eval_dir / "results.json"), results)
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (60, 40), "steelblue").save(buf, format="PNG")
    (eval_dir / "adic.png").write_bytes(buf.getvalue())
    rng = np.random.default_rng(0)
    images = (rng.random((3, 224, 224, 3)) * 255).astype(np.uint8)
    maps = {m: rng.random((3, 7, 7)) for m in methods}
    if scorecam_on_last_only:
        maps["scorecam"][:2] = np.nan
    save_comparison_maps(
        str(eval_dir / "maps.npz"),
        keys=["a", "b", "c"],
        images=images,
        class_ids=np.array([281, 967, 1]),
        probs=np.array([0.5, 0.9, 0.1]),
        maps=maps,
        labels=methods,
    )
    runs = {}
    for name in ("L-CAM-Fm", "L-CAM-Img"):
        run = RunFolder(str(folder / name))
        history = [
            {
                "epoch": e,
                "step": e * 10,
                "loss": 3.0 - e * 0.1,
                "ce": 1.0,
                "area": 0.9,
                "tv": 2.0,
                "agreement": 0.5,
                "lr": 0.01,
            }
            for e in range(1, 4)
        ]
        run.write_metrics(history)
        run.write_curves(history, name)
        runs[name] = run.url
    write_report(str(folder / "report.html"), eval_dir=str(eval_dir), train_runs=runs)
    return list(methods.values())


def test_report_loads_every_image_in_chromium(tmp_path):
    exe = browser()
    if exe is None:
        pytest.skip(
            "no Chromium here: install Debian's 'chromium' package (make test does when it may) to run the browser test"
        )
    expected_rows = make_report(tmp_path)
    (tmp_path / "harness.html").write_text(HARNESS)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        out = subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                f"http://127.0.0.1:{server.server_address[1]}/harness.html",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    m = re.search(r'<pre id="out">(.*?)</pre>', out.stdout, re.S)
    assert m, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(m.group(1).replace("&quot;", '"'))
    # adic.png + 2 curves + 3 originals + 3 x 5 overlays
    assert result["images"] == 1 + 2 + 3 + 15
    assert result["loaded"] == result["images"], result["broken"]
    assert result["rows"] == expected_rows


def test_gallery_shows_images_every_method_ran_on_first(tmp_path):
    """A costly method on a subset: its image leads the gallery, the others keep their order."""
    make_report(tmp_path, scorecam_on_last_only=True)
    page = (tmp_path / "report.html").read_text()
    gallery = page[page.index('<table class="gallery">') :]
    originals = re.findall(r'<td><img src="[^"]+" alt="([abc])">', gallery)
    assert originals == ["c", "a", "b"]
    assert gallery.count("not evaluated") == 2
