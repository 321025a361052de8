"""Small shared helpers for tests: real photos from scikit-image, preprocessed per SPEC."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import torch
from PIL import Image


def center_crop_tensor(rgb: np.ndarray, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """Resize shorter side, centre crop, to (3, crop, crop) in [0, 1] (independent of pipeline/)."""
    im = Image.fromarray(rgb).convert("RGB")
    w, h = im.size
    s = resize / min(w, h)
    im = im.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - crop) // 2, (h - crop) // 2
    im = im.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def skimage_photos(names=("chelsea", "coffee", "astronaut", "rocket")) -> dict[str, np.ndarray]:
    from skimage import data

    return {n: getattr(data, n)() for n in names}


def manifest_of(store: str, storage_options: dict | None = None) -> dict:
    """A store's manifest as its driver last wrote it (the attributes of its manifest group,
    pipeline.store.manifest.MANIFEST); {} before the first write. Polled while a run writes."""
    from pipeline.fs import join, read_json
    from pipeline.store.manifest import MANIFEST

    return (read_json(join(store, MANIFEST), storage_options, default={}) or {}).get("attributes", {})


def stop_ray_head(proc: subprocess.Popen, temp: str) -> None:
    """End a ``ray start --head --block`` a test started in its own session (``start_new_session``)
    with temp dir ``temp``: its process group, then the daemons that left the group (they name
    ``temp`` on their command line). Only this head's processes: never another Ray."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        time.sleep(2 if sig == signal.SIGTERM else 0)
    subprocess.run(["pkill", "-9", "-f", temp], check=False)
    proc.wait(timeout=30)
