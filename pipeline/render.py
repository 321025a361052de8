"""Pictures people look at: CAM overlays with captions."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def colorize(cam: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H, W) map in [0, 1] -> (H, W, 3) uint8 through a matplotlib colormap."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](np.clip(cam, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-mapped CAM over an RGB uint8 image of the same size."""
    if image.shape[:2] != cam.shape:
        raise ValueError(f"image {image.shape[:2]} and CAM {cam.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {alpha}")
    heat = colorize(cam, cmap).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return out.round().clip(0, 255).astype(np.uint8)


def with_caption(image: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    """Add a white caption band with ``text`` under the image."""
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w, h + height), "white")
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    while text and draw.textlength(text, font=font) > w - 6:
        text = text[:-2] + "…"
    draw.text((3, h + 4), text, fill="black", font=font)
    return np.asarray(canvas)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def overlay_panels(
    image: np.ndarray, cams: np.ndarray, captions: list[str], cmap: str = "jet", alpha: float = 0.5, gap: int = 4
) -> np.ndarray:
    """One captioned overlay per map, side by side: (T, H, W) maps in [0, 1] over one RGB image."""
    if len(cams) != len(captions):
        raise ValueError(f"{len(cams)} maps but {len(captions)} captions")
    panels = [with_caption(overlay(image, cam, cmap, alpha), text) for cam, text in zip(cams, captions)]
    if len(panels) == 1:
        return panels[0]
    spacer = np.full((panels[0].shape[0], gap, 3), 255, dtype=np.uint8)
    out: list[np.ndarray] = []
    for p in panels:
        out += [p, spacer]
    return np.concatenate(out[:-1], axis=1)
