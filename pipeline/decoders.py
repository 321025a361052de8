"""Which library turns a sample's bytes into the preprocessed crop: the ``--decoder`` choice.

* ``pil`` (the default): :func:`pipeline.images.decode_pil` + :func:`pipeline.images.preprocess`,
  bit-identical to torchvision's ``Resize + CenterCrop + ToTensor`` on a PIL image.
* ``pil-draft``: the same, but a JPEG whose shorter side is at least twice the resize is
  decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (``Image.draft``), never below the
  resize size. Other images are untouched; the large ones move (benchmarks/RESULTS.md,
  "Decoders"), so a cache made with it records it.
* ``torchvision``: ``torchvision.io.decode_jpeg`` on the whole batch of JPEG byte tensors
  at once, on the GPU (nvJPEG) when the decoding process has one. On the CPU both it and PIL
  run libjpeg-turbo's default (islow) IDCT and fancy upsampling, and the resize + crop
  after it is PIL's, so the crop equals ``pil``'s bit for bit (checked at run time by
  :func:`torchvision_matches_pil`). On a GPU, nvJPEG's IDCT and the tensor resize differ by
  a few grey levels. PNG, WebP, CMYK/odd-mode JPEGs and anything decode_jpeg refuses go
  through ``pil``.
* ``auto``: ``torchvision`` when the decoding process has a GPU, else :data:`CPU_AUTO`.

Where a shard stage (extraction, CAMs from shards) decodes is ``--decode-on``
(:func:`stage_decoding`): in CPU tasks beside the model's actors (Ray gives them no GPU, so
``auto`` and ``torchvision`` take their CPU form there), or inside the model's actor, which
then gets the shard's compressed bytes and, with a GPU, decodes and resizes them there with
nvJPEG. ``auto`` decodes in the actor when the actors have GPUs and the decoder is
``torchvision`` or ``auto``, else in tasks. The stage resolves the choice once and hands the
concrete :class:`Decoder` to whoever decodes, so what the store's identity records is what ran.

Torch-free at import (pipeline.configs reads :data:`DECODERS` for ``--help``).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from .errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from lcam.backbones.preprocessing import Preprocessing

DECODERS = ("pil", "pil-draft", "torchvision", "auto")
DEFAULT_DECODER = "pil"
# What ``auto`` picks on a CPU, from benchmarks/decode.py on the 800-image ImageNet sample
# (RESULTS.md, "Decoders"; 2 loaded cores): pil-draft applies to 42 of the 800 (shorter side
# >= 512), 1.8x cheaper on those, 1.05x over the sample by their share (1.14x as the loaded
# whole-sample passes measured it), but it moves those images' features by a relative L2 of
# 0.13 (median) to 0.39 with EfficientNet-Lite0 and flipped 1 of 42 top-1 classes: outside the
# 0.05 tolerance. torchvision's CPU decode gives pil's crops exactly and is 1.05x faster
# (spread 1.02-1.10): not worth a dependency on two libjpeg builds agreeing. So ``pil``.
CPU_AUTO = "pil"
DECODER_HELP = (
    "how images are decoded: pil (default; bit-identical to torchvision's transforms), pil-draft (JPEGs at "
    "least twice the resize decoded at 1/2-1/8 scale: faster on large photos, slightly different features), "
    "torchvision (batched decode_jpeg; nvJPEG on a GPU, else bit-identical to pil), auto (torchvision on a GPU, "
    "else pil)"
)
DECODE_SITES = ("auto", "tasks", "actor")
DECODE_SITE_HELP = (
    "where a shard stage decodes: tasks (CPU tasks beside the model's actors), actor (inside the model's actor: "
    "its GPU decodes with nvJPEG under --decoder torchvision/auto), auto (default: actor when the actors have a GPU "
    "and --decoder is torchvision or auto, else tasks)"
)
# Tensor resizes the GPU path can do on the device (the other filters resize through PIL).
_TENSOR_FILTERS = ("nearest", "bilinear", "bicubic")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class Decoder:
    """A resolved decoder: ``name`` in pil / pil-draft / torchvision, ``device`` where
    torchvision decodes (``cpu`` or ``cuda[:n]``; ignored by the PIL ones)."""

    name: str = DEFAULT_DECODER
    device: str = "cpu"

    @property
    def on_gpu(self) -> bool:
        return self.name == "torchvision" and self.device.startswith("cuda")

    def identity(self) -> str | None:
        """What a feature cache records about the decoder: None when the crops equal ``pil``'s
        (so caches made before the choice existed, and with ``pil``, still match), else a name."""
        if self.name == "pil":
            return None
        if self.name == "torchvision":
            if self.on_gpu:
                return "torchvision-cuda"
            return None if torchvision_matches_pil() else "torchvision-cpu"
        return self.name

    def pixels(self, datas: Sequence[bytes], prep: Preprocessing) -> list[np.ndarray | Exception]:
        """Each sample's (3, crop, crop) uint8 centre crop, as :func:`pipeline.images.crop_pixels`
        gives it, or the exception that stopped it (a :class:`pipeline.images.DecodeError` for
        bad bytes): one bad image never fails the batch. ``pil`` and ``pil-draft`` import no
        torch (the pipeline's decode tasks run this); a GPU crop is rounded to the grey level."""
        if self.name == "torchvision":
            return [
                c if isinstance(c, Exception) else _to_uint8(c) for c in _torchvision_crops(datas, prep, self.device)
            ]
        draft_to = prep.resize if self.name == "pil-draft" else None
        return [_pil_pixels(d, prep, draft_to) for d in datas]

    def crops(self, datas: Sequence[bytes], prep: Preprocessing) -> list[torch.Tensor | Exception]:
        """:meth:`pixels` as (3, crop, crop) float32 in [0, 1] on the CPU, as
        :func:`pipeline.images.preprocess` gives it (a GPU crop unrounded)."""
        if self.name == "torchvision":
            return _torchvision_crops(datas, prep, self.device)
        from .images import pixels_to_tensor

        return [p if isinstance(p, Exception) else pixels_to_tensor(p) for p in self.pixels(datas, prep)]

    def rgb(self, data: bytes, prep: Preprocessing) -> Any:
        """One sample -> RGB PIL image before any resize (L-CAM-Img's random crops resize it
        themselves). ``torchvision`` decodes on the CPU here: one image, nothing to batch."""
        from .images import decode_pil

        if self.name == "pil-draft":
            return decode_pil(data, draft_to=prep.resize)
        if self.name == "torchvision":
            img = _decode_jpegs([data], "cpu")[0]
            if img is not None:
                return _tensor_to_pil(img)
        return decode_pil(data)


def resolve_decoder(name: str, device: str | None = None) -> Decoder:
    """``--decoder`` -> the :class:`Decoder` a process with ``device`` runs (None: this
    process's, i.e. CUDA when torch sees a GPU). Unknown names are one :class:`UserError`."""
    if name not in DECODERS:
        raise UserError(f"--decoder: {name!r} is not one of {', '.join(DECODERS)}")
    if device is None:
        device = "cuda" if _cuda_available() else "cpu"
    gpu = device.startswith("cuda")
    if name == "auto":
        return Decoder("torchvision", device) if gpu else Decoder(CPU_AUTO)
    if name == "torchvision":
        return Decoder("torchvision", device)
    return Decoder(name)


def site_needs_gpus(name: str, site: str) -> bool:
    """Whether :func:`stage_decoding` needs the actors' GPU count (the cluster must be up to know it)."""
    return site != "tasks" and name in ("auto", "torchvision")


def stage_decoding(name: str, site: str, actor_gpus: float) -> tuple[Decoder, bool]:
    """(the decoder, whether the model's actors decode) of a shard stage whose actors have
    ``actor_gpus`` GPUs each: see the module docstring. Unknown names are one :class:`UserError`."""
    if site not in DECODE_SITES:
        raise UserError(f"--decode-on: {site!r} is not one of {', '.join(DECODE_SITES)}")
    in_actor = site == "actor" or (site == "auto" and actor_gpus > 0 and name in ("auto", "torchvision"))
    return resolve_decoder(name, device="cuda" if in_actor and actor_gpus > 0 else "cpu"), in_actor


def _pil_pixels(data: bytes, prep: Preprocessing, draft_to: int | None) -> np.ndarray | Exception:
    from .images import crop_pixels, decode_pil

    try:
        return crop_pixels(decode_pil(data, draft_to), prep)
    except Exception as exc:  # DecodeError and anything PIL raises on odd files
        return exc


def _to_uint8(crop: torch.Tensor) -> np.ndarray:
    """A [0, 1] float crop back to grey levels: exact for ToTensor's k / 255."""
    return (crop * 255).round_().byte().numpy()


def _jpeg_for_torchvision(data: bytes) -> bool:
    """A baseline/progressive JPEG in a colour space decode_jpeg and PIL agree on (YCbCr, grey);
    CMYK/YCCK and anything odd go through PIL, whose conversions the module docstring of
    pipeline.images fixes. Reads the header only (~20 us)."""
    from PIL import Image

    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format == "JPEG" and im.mode in ("RGB", "L")
    except Exception:  # an unreadable header: PIL reports it with its own reason
        return False


def _decode_jpegs(datas: Sequence[bytes], device: str) -> list[Any]:
    """decode_jpeg on the JPEGs of ``datas`` in one batched call: (3, H, W) uint8 tensors on
    ``device``, None for the samples PIL must decode (not a JPEG for it, or refused by it)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[Any] = [None] * len(datas)
    idx = [i for i, d in enumerate(datas) if _jpeg_for_torchvision(d)]
    if not idx:
        return out
    # bytearray: a writable buffer (torch warns about read-only ones); the copy is the compressed size
    tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in idx]
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one corrupt or truncated file fails the whole call: one by one, to find it
        images = []
        for t in tensors:
            try:
                images.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)  # PIL decodes it again and gives the reason (DecodeError)
    for i, img in zip(idx, images):
        out[i] = img
    return out


def _tensor_to_pil(img: torch.Tensor) -> Any:
    from PIL import Image

    return Image.fromarray(img.permute(1, 2, 0).contiguous().cpu().numpy(), "RGB")


def tensor_resize_crop(img: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """(3, H, W) uint8 on any device -> (3, crop, crop) float32 in [0, 1] on the CPU: the
    resize (antialiased, torchvision's tensor Resize) and centre crop of ``preprocess``, done
    on the tensor's device. Within a few grey levels of PIL's resize, not bit-identical."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    from .images import resized_size

    h, w = img.shape[-2:]
    rw, rh = resized_size(w, h, prep.resize)
    top = int(round((rh - prep.crop) / 2.0))  # torchvision CenterCrop's rounding, as preprocess
    left = int(round((rw - prep.crop) / 2.0))
    out = F.resize(img, [rh, rw], interpolation=InterpolationMode(prep.interpolation), antialias=True)
    out = out[:, top : top + prep.crop, left : left + prep.crop]
    return out.float().div_(255).cpu()


class DecoderUnavailable(RuntimeError):
    """A resolved decoder that cannot run in this process (nvJPEG without a CUDA device)."""


def _torchvision_crops(datas: Sequence[bytes], prep: Preprocessing, device: str) -> list[Any]:
    from .images import pixels_to_tensor, preprocess

    if device.startswith("cuda") and not _cuda_available():
        # never PIL's crops under a cache identity that says nvJPEG: the shard fails, saying why
        raise DecoderUnavailable(
            f"--decoder torchvision on {device}: torch sees no CUDA device in this process (a GPU resource "
            "without a usable GPU?); run with --decode-on tasks or --decoder pil"
        )

    on_gpu = device.startswith("cuda") and prep.interpolation in _TENSOR_FILTERS
    out: list[Any] = []
    for data, img in zip(datas, _decode_jpegs(datas, device)):
        if img is None:
            px = _pil_pixels(data, prep, None)
            out.append(px if isinstance(px, Exception) else pixels_to_tensor(px))
        elif on_gpu:
            out.append(tensor_resize_crop(img, prep))
        else:  # PIL's resize on the decoded pixels: the exact crop of pil
            out.append(preprocess(_tensor_to_pil(img), prep))
    return out


@functools.lru_cache(maxsize=1)
def torchvision_matches_pil() -> bool:
    """Whether torchvision's CPU decode_jpeg gives PIL's pixels in this install (both bundle a
    libjpeg-turbo; a build with another libjpeg would differ): three small JPEGs (4:2:0, 4:4:4,
    progressive 4:2:2) with edges and gradients, compared exactly. Decides whether a cache made
    with ``torchvision`` on the CPU may share ``pil``'s identity."""
    import numpy as np
    from PIL import Image

    from .images import decode_pil

    y, x = np.mgrid[0:61, 0:83]
    rgb = np.stack([(x * 3) % 256, (y * 4) % 256, ((x // 8 + y // 8) % 2) * 255], axis=2).astype(np.uint8)
    for opts in ({"subsampling": 2}, {"subsampling": 0}, {"subsampling": 1, "progressive": True}):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=90, **opts)
        data = buf.getvalue()
        img = _decode_jpegs([data], "cpu")[0]
        if img is None or not np.array_equal(img.permute(1, 2, 0).numpy(), np.asarray(decode_pil(data))):
            return False
    return True
