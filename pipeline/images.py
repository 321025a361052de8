"""Image decoding and the ImageNet-style preprocessing, matching torchvision exactly.

``decode_image`` turns the original bytes (JPEG/PNG/WebP, any PIL mode) into RGB uint8;
``preprocess`` reproduces ``Compose([Resize(256), CenterCrop(224), ToTensor()])`` on
the PIL image (sizes and the resize interpolation from the backbone's ``Preprocessing``). Resizing goes through PIL (the same calls torchvision makes for PIL
inputs), so the result is bit-identical, not merely close.

JPEG ``Image.draft`` (DCT-domain downscaling) is not used by default: measured on
the ImageNet sample it moves pixels by up to 134/255 against the reference, and only
~5% of ImageNet images are large enough (shorter side >= 512) for it to apply. The
``pil-draft`` decoder (:mod:`pipeline.decoders`) opts in through ``open_image(draft_to=...)``.

Mode conversions (documented choices):

* L, LA, P, PA, 1, CMYK, YCbCr, RGBA, RGBX ... -> PIL's ``convert("RGB")``. Alpha is
  **dropped** (the stored colour channels are kept, not composited on black); this is
  what torchvision's default loader does, so it is what ImageNet classifiers saw.
* I;16 / I;16B / I;16L / I (16-bit grey, e.g. 16-bit PNG) -> scaled to 8 bits with
  rounding, ``round(v * 255 / 65535)``: 65535 -> 255, 257*k -> k. PIL's own
  ``convert("L")`` would clip everything above 255 to white.
* F (float) -> clipped to [0, 255].
* EXIF orientation is not applied (neither does torchvision's loader).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# torch-free (as is everything here up to crop_pixels): a decode task imports no torch
from lcam.backbones.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch

# Never set ImageFile.LOAD_TRUNCATED_IMAGES: a truncated file must fail, not be padded grey.


class DecodeError(ValueError):
    """The bytes are not a decodable image; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-f]+>")
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def error_text(exn: BaseException) -> str:
    """An exception's message without object reprs (``<_io.BytesIO object at 0x...>``):
    skip reasons are grouped and counted by their text."""
    return _OBJECT_REPR.sub("", str(exn)).strip() or type(exn).__name__


def open_image(data: bytes, draft_to: int | None = None) -> Image.Image:
    """PIL image with every pixel loaded (so truncation surfaces here), any mode.

    ``draft_to``: a JPEG whose shorter side is at least twice this is decoded at 1/2, 1/4
    or 1/8 scale in the DCT domain (``Image.draft``), the largest that keeps the shorter side
    at least ``draft_to``: the resize that follows then starts from fewer pixels.
    """
    if not data:
        raise DecodeError("empty data (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except Exception as exn:  # PIL raises assorted types for broken headers
        # without object reprs such as <_io.BytesIO object at 0x...>: reasons are grouped by text
        raise DecodeError(f"unreadable image header: {error_text(exn)}") from None
    if draft_to is not None and im.format == "JPEG" and min(im.size) >= 2 * draft_to:
        im.draft("RGB", resized_size(im.width, im.height, draft_to))
    try:
        im.load()
    except Exception as exn:  # OSError("image file is truncated"), SyntaxError, ...
        raise DecodeError(
            f"corrupt or truncated {im.format or ''} image: {error_text(exn)}".replace("  ", " ")
        ) from None
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """A loaded PIL image in any mode -> mode RGB (see the module docstring)."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.uint32)  # I;16* arrives as uint16, I as int32
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(np.repeat(a.astype(np.uint8)[:, :, None], 3, axis=2), "RGB")
    if im.mode == "F":
        a = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(a[:, :, None], 3, axis=2), "RGB")
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA"
        warnings.simplefilter("ignore", UserWarning)
        return im.convert("RGB")


def decode_pil(data: bytes, draft_to: int | None = None) -> Image.Image:
    """Bytes -> loaded PIL image in mode RGB; raises :class:`DecodeError` (``draft_to``: :func:`open_image`)."""
    return to_rgb(open_image(data, draft_to))


def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB array; raises :class:`DecodeError` for empty/corrupt/truncated data."""
    return np.asarray(decode_pil(data))


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(w, h) after torchvision ``Resize(resize)``: shorter side -> resize, longer truncated."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


# Preprocessing.interpolation -> the PIL filter torchvision's Resize passes for PIL images
# (timm's eval transform is torchvision's Resize too), so bicubic models stay bit-identical.
_PIL_FILTERS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


def _resize_crop(im: Image.Image, prep: Preprocessing, top: int, left: int) -> Image.Image:
    """Full resize, then crop: exactly torchvision's calls on a PIL image.

    ``im.resize(..., box=crop_in_source_coords)`` is ~1 ms faster per image but its
    rounding differs by one grey level on most images; bit-identical results win.
    """
    rw, rh = resized_size(im.width, im.height, prep.resize)
    c = prep.crop
    return im.resize((rw, rh), _PIL_FILTERS[prep.interpolation]).crop((left, top, left + c, top + c))


def _as_pil(rgb: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(rgb, Image.Image):
        return rgb if rgb.mode == "RGB" else to_rgb(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    return Image.fromarray(rgb, "RGB")


def _chw(im: Image.Image) -> np.ndarray:
    # one copy, contiguous and writable (torch warns about read-only memory)
    return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1))


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float32 in [0, 1]: torchvision ToTensor's arithmetic (k / 255),
    so ``round(t * 255)`` gives the pixels back exactly."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255)


def _check(prep: Preprocessing) -> None:
    if prep.crop > prep.resize:
        raise ValueError(f"crop {prep.crop} is larger than resize {prep.resize}")


def crop_pixels(rgb: np.ndarray | Image.Image, prep: Preprocessing, view: str = "center") -> np.ndarray:
    """(3, crop, crop) uint8, contiguous: Resize(prep.resize) + CenterCrop(prep.crop), before ToTensor
    (:func:`preprocess` is this / 255). Torch-free: what the pipeline's decode tasks ship.

    ``view="hflip"`` is the mirror image of the centre crop. Accepts the array from
    :func:`decode_image` or an RGB PIL image (from :func:`decode_pil`, saves a copy).
    """
    if view not in ("center", "hflip"):
        raise ValueError(f"unknown view {view!r}; expected 'center' or 'hflip'")
    _check(prep)
    im = _as_pil(rgb)
    rw, rh = resized_size(im.width, im.height, prep.resize)
    top = int(round((rh - prep.crop) / 2.0))  # torchvision CenterCrop's rounding
    left = int(round((rw - prep.crop) / 2.0))
    out = _chw(_resize_crop(im, prep, top, left))
    return np.ascontiguousarray(out[..., ::-1]) if view == "hflip" else out


def preprocess(rgb: np.ndarray | Image.Image, prep: Preprocessing, view: str = "center") -> torch.Tensor:
    """(3, crop, crop) float32 in [0, 1]: Resize(prep.resize) + CenterCrop(prep.crop) + ToTensor,
    bit-identical to torchvision's; ``view`` and inputs as :func:`crop_pixels`."""
    return pixels_to_tensor(crop_pixels(rgb, prep, view))


def random_crop_flip(rgb: np.ndarray | Image.Image, prep: Preprocessing, generator: torch.Generator) -> torch.Tensor:
    """Training view: Resize(prep.resize), a uniformly random crop, horizontal flip with p=0.5.

    Draws, in order, the crop top, the crop left and the flip from ``generator``, so a
    seeded generator gives the same view every time.
    """
    import torch

    _check(prep)
    im = _as_pil(rgb)
    rw, rh = resized_size(im.width, im.height, prep.resize)
    top = int(torch.randint(0, rh - prep.crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, rw - prep.crop + 1, (1,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    out = pixels_to_tensor(_chw(_resize_crop(im, prep, top, left)))
    return out.flip(-1) if flip else out


def boxes_in_crop(boxes: object, width: int, height: int, prep: Preprocessing) -> np.ndarray:
    """Boxes of a ``width`` x ``height`` image -> (k, 4) float32 on the centre crop's grid.

    In: ``x0 y0 x1 y1`` pixel indices of the original image, inclusive (Tiny ImageNet's
    labels, ImageNet's LOC files), so a box covers [x0, x1 + 1) x [y0, y1 + 1). Out: the
    same region through :func:`preprocess`'s resize and centre crop, continuous and end
    exclusive, clipped to the crop; boxes cut away by the crop are dropped (k may be 0).
    """
    a = np.asarray(boxes if boxes is not None else [], dtype=np.float64).reshape(-1, 4)
    rw, rh = resized_size(width, height, prep.resize)
    top = int(round((rh - prep.crop) / 2.0))  # preprocess's centre crop
    left = int(round((rw - prep.crop) / 2.0))
    sx, sy = rw / width, rh / height
    out = np.stack([a[:, 0] * sx - left, a[:, 1] * sy - top, (a[:, 2] + 1) * sx - left, (a[:, 3] + 1) * sy - top], 1)
    out = np.clip(out, 0, prep.crop)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep].astype(np.float32)


def is_one_image(x: Any) -> bool:
    """A single image (a path, encoded bytes, an RGB array, a PIL image), not a batch."""
    import os

    if isinstance(x, (str, os.PathLike, bytes, bytearray)):
        return True
    if isinstance(x, np.ndarray):
        return x.ndim == 3
    return hasattr(x, "convert") and hasattr(x, "size")  # a PIL image, without importing PIL


def load_image(x: Any, prep: Preprocessing) -> torch.Tensor:
    """One image -> (3, crop, crop) float32 in [0, 1] on the CPU, the backbone's preprocessing applied
    (a tensor is taken as already preprocessed)."""
    import os

    import torch

    if isinstance(x, torch.Tensor):
        return x.float().cpu() if x.dtype != torch.uint8 else x.float().div(255.0)
    if isinstance(x, (str, os.PathLike)):
        from .fs import get_fs

        fs, path = get_fs(os.fspath(x))
        x = fs.cat_file(path)
    if isinstance(x, (bytes, bytearray)):
        x = decode_image(bytes(x))
    elif hasattr(x, "convert"):
        x = x.convert("RGB")
    return preprocess(x, prep)
