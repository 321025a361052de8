"""The backbone's image preprocessing (SPEC section 4 step 1) as a plain record.

Torch-free on purpose: the pipeline's decode tasks receive a :class:`Preprocessing` and
unpickling it must not import torch in a fresh Ray worker (~1 s of CPU each, on the cores
the model runs on). :mod:`lcam.backbones.base` re-exports everything here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class Preprocessing:
    """SPEC section 4 step 1: resize shorter side (with ``interpolation``), centre crop, [0, 1], mean/std.

    ``crop_pct`` (timm's name) is ``crop / resize``; :meth:`from_crop_pct` builds one the
    way timm's eval transform does (``resize = floor(crop / crop_pct)``).
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")

    @property
    def crop_pct(self) -> float:
        return self.crop / self.resize

    @classmethod
    def from_crop_pct(
        cls,
        crop: int,
        crop_pct: float,
        mean: Any = IMAGENET_MEAN,
        std: Any = IMAGENET_STD,
        interpolation: str = "bilinear",
    ) -> "Preprocessing":
        return cls(
            int(math.floor(crop / crop_pct)),
            int(crop),
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
            interpolation,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        """Inverse of :meth:`to_dict`; identities written before ``interpolation`` existed mean bilinear."""
        return cls(
            int(d["resize"]), int(d["crop"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bilinear")
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
