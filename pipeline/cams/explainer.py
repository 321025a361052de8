"""The public Python API of a trained L-CAM: :class:`Explainer` (images in memory), the
class selection of a bulk run (:class:`ClassSelection`), the checkpoint's fingerprint, and
:func:`explain_rows` (the CAM store's columns for a batch of feature maps), which both bulk
sources (:mod:`pipeline.cams.from_cache`, :mod:`pipeline.cams.from_shards`) share."""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lcam import LCAM, Explanation, Preprocessing
from lcam.explain import choose_targets, explain_from_features, upsampled_uint8
from lcam.model import upsample_size

from ..device import autocast_dtype, resolve_device
from ..errors import UserError
from ..fs import StorageOptions

MODES = ("predicted", "label", "top-k", "ids")


# ---------------------------------------------------------------- which classes
@dataclass(frozen=True)
class ClassSelection:
    """Which classes to explain per sample: ``predicted`` (top-1), ``label`` (ground truth),
    ``top-k`` (the k most probable) or ``ids`` (the same list of class ids for every sample);
    or ``combined``: several of those side by side (``--classes predicted,label``,
    ``top5,label``), ``parts`` in the order given, ``k`` the total columns.

    A combination de-duplicates nothing: a sample whose label equals its prediction stores
    that class (and its map) in both columns, so column t always means the same thing. In a
    combination, a sample without a label is kept (its other columns are useful) and its
    label column holds class id -1, probability 0 and an all-zero raw map.
    """

    mode: str = "predicted"
    k: int = 1
    ids: tuple[int, ...] = ()
    parts: tuple["ClassSelection", ...] = ()

    @classmethod
    def parse(cls, classes: str | None = None, top_k: int | None = None, class_ids: str | Sequence[int] | None = None) -> "ClassSelection":
        """From command-line style settings; ``classes`` is inferred from ``top_k``/``class_ids`` when absent."""
        if isinstance(class_ids, str):
            try:
                class_ids = [int(c) for c in class_ids.replace(" ", "").split(",") if c]
            except ValueError:
                raise UserError(f"class ids {class_ids!r} must be integers separated by commas, e.g. 281,285") from None
        if classes and "," in classes:
            return cls._combined(classes, top_k, class_ids)
        mode = classes or ("ids" if class_ids else "top-k" if top_k is not None else "predicted")
        short = re.fullmatch(r"top-?(\d+)", mode)
        if short:  # top5 = top-k with k 5
            if top_k is not None and top_k != int(short.group(1)):
                raise UserError(f"classes {mode!r} and top-k {top_k} disagree; give one of them")
            mode, top_k = "top-k", int(short.group(1))
        if mode not in MODES:
            raise UserError(f"unknown class selection {mode!r}; choose from {', '.join(MODES)}, top5 (any k), or a combination such as predicted,label")
        if mode == "ids":
            if not class_ids:
                raise UserError("classes 'ids' needs the class ids (e.g. --class-ids 281,285)")
            if top_k is not None:
                raise UserError("give either class ids or top-k, not both")
            return cls("ids", len(class_ids), tuple(int(c) for c in class_ids))
        if class_ids:
            raise UserError(f"class ids were given but the class selection is {mode!r}; use classes 'ids'")
        if mode == "top-k":
            k = 5 if top_k is None else int(top_k)
            if k < 1:
                raise UserError(f"top-k must be at least 1, got {k}")
            return cls("top-k", k)
        if top_k is not None and top_k != 1:
            raise UserError(f"top-k {top_k} was given but the class selection is {mode!r}; use classes 'top-k'")
        return cls(mode, 1)

    @classmethod
    def _combined(cls, classes: str, top_k: int | None, class_ids: Sequence[int] | None) -> "ClassSelection":
        names = [c.strip() for c in classes.split(",") if c.strip()]
        parts = []
        for name in names:  # --top-k goes to a 'top-k' part, --class-ids to an 'ids' part
            parts.append(cls.parse(name, top_k if name == "top-k" else None, class_ids if name == "ids" else None))
        if top_k is not None and not any(p.mode == "top-k" and n == "top-k" for p, n in zip(parts, names)):
            raise UserError(f"top-k {top_k} was given but the classes {classes!r} have no 'top-k' part; write e.g. top5,label")
        if class_ids and not any(p.mode == "ids" for p in parts):
            raise UserError(f"class ids were given but the classes {classes!r} have no 'ids' part; write e.g. predicted,ids")
        kinds = [p.mode for p in parts]
        dup = sorted({m for m in kinds if kinds.count(m) > 1})
        if dup:
            raise UserError(f"classes {classes!r} name {dup[0]!r} twice; give each kind once")
        if "predicted" in kinds and "top-k" in kinds:
            raise UserError(f"classes {classes!r}: top-k already starts with the predicted class; drop 'predicted'")
        return cls("combined", sum(p.width for p in parts), (), tuple(parts))

    @property
    def width(self) -> int:
        """T: classes explained per sample."""
        return self.k

    def columns(self) -> list[str]:
        """What each of the T columns holds: predicted, top-2, ..., label, id:281."""
        out: list[str] = []
        for p in self.parts or (self,):
            if p.mode == "top-k":
                out += ["predicted"] + [f"top-{i + 1}" for i in range(1, p.k)]
            elif p.mode == "ids":
                out += [f"id:{c}" for c in p.ids]
            else:
                out.append(p.mode)
        return out

    def validate(self, num_classes: int) -> None:
        for p in self.parts:
            p.validate(num_classes)
        if self.mode == "top-k" and not 1 <= self.k <= num_classes:
            raise UserError(f"top-k {self.k} must be between 1 and the number of classes ({num_classes})")
        bad = [c for c in self.ids if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"class id {bad[0]} is out of range: the classifier has {num_classes} classes (0..{num_classes - 1})")
        if len(set(self.ids)) != len(self.ids):
            raise UserError(f"class ids {list(self.ids)} repeat an id; give each class once")

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "k": self.k, "ids": list(self.ids)}
        if self.parts:  # only combinations carry it: single selections keep their old fingerprint
            out["parts"] = [p.identity() for p in self.parts]
            out["columns"] = self.columns()
        return out


def checkpoint_fingerprint(checkpoint: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex) of the method, the backbone's weights digest and the attention weights.

    Where the file lives does not matter: a copy of the checkpoint has the same fingerprint.
    """
    h = hashlib.sha256()
    h.update(str(checkpoint.get("method")).encode())
    h.update(str(checkpoint["backbone"].get("weights_digest")).encode())
    for name, value in sorted(checkpoint["attention"].items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the Python API
class Explainer:
    """A trained L-CAM, loaded once, called on image tensors.

    >>> explain = Explainer.from_checkpoint("s3://bucket/run/checkpoint.pt", device="cuda")
    >>> e = explain(images)                    # (B, 3, H, W) in [0, 1], any device
    >>> e.class_ids, e.probs, e.maps           # tensors on the model's device
    >>> explain(image, targets=281, upsample=True).upsampled   # one (3, H, W) image

    Results stay on the model's device (nothing is copied to the CPU); a single
    (3, H, W) image gives a batch of one.
    """

    def __init__(self, model: LCAM, checkpoint: Mapping[str, Any] | None = None, autocast: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.checkpoint = dict(checkpoint or {})
        self.autocast = autocast

    @classmethod
    def from_checkpoint(
        cls,
        url: str,
        *,
        device: str | torch.device = "auto",
        weights: str | None = None,
        storage_options: StorageOptions = None,
        precision: str = "fp32",
    ) -> "Explainer":
        """Load an L-CAM-Fm or L-CAM-Img checkpoint (they explain the same way).

        ``device``: "auto" picks CUDA when present. ``weights`` overrides where the
        backbone's weights come from (the digest must still match). ``precision``:
        fp32 (default), or fp16/bf16/auto autocast for the backbone on a GPU.
        """
        from ..train.checkpoints import load_lcam
        dev = resolve_device(device)
        model, ckpt = load_lcam(url, storage_options, weights=weights, device=dev)
        return cls(model, ckpt, autocast_dtype(precision, dev))

    @property
    def device(self) -> torch.device:
        return next(self.model.attention.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.model.backbone.num_classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.backbone.preprocessing

    @property
    def fingerprint(self) -> str:
        return checkpoint_fingerprint({"method": self.checkpoint.get("method"), "backbone": self.model.backbone.describe(), "attention": self.model.attention.state_dict()})

    def preprocess(self, image: bytes | np.ndarray | Any) -> torch.Tensor:
        """Encoded bytes, an RGB array or a PIL image -> (3, crop, crop) in [0, 1] on the model's device."""
        from ..images import decode_image, preprocess

        rgb = decode_image(image) if isinstance(image, (bytes, bytearray)) else image
        return preprocess(rgb, self.preprocessing).to(self.device)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch tensor (B, 3, H, W) or (3, H, W) in [0, 1], got {type(images).__name__}")
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            return images.float().div_(255.0)
        lo, hi = torch.aminmax(images)
        if float(lo) < -1e-3 or float(hi) > 1.0 + 1e-3:  # normalised or 0..255 input gives nonsense maps
            raise ValueError(f"images must be in pixel space [0, 1] (got values in [{float(lo):.3g}, {float(hi):.3g}]); the backbone normalises inside")
        return images.float()

    def __call__(
        self,
        images: torch.Tensor,
        targets: int | Sequence[int] | torch.Tensor | None = None,
        top_k: int | None = None,
        upsample: bool | int = False,
        all_classes: bool = False,
    ) -> Explanation:
        """CAMs from one forward pass: the predicted class, or ``targets`` (one id per
        image, or (B, T) ids), or the ``top_k`` classes; ``upsample`` adds maps at the input
        size (True) or at that size (an int), as :meth:`lcam.model.LCAM.explain`."""
        images = self._images(images)
        if isinstance(targets, int):
            targets = [targets]
        if targets is not None and not isinstance(targets, torch.Tensor):
            targets = torch.as_tensor(targets)
        if isinstance(targets, torch.Tensor):
            targets = targets.to(self.device)
        with torch.inference_mode(), self.autocast_context():
            feats, logits = self.model.backbone.extract(images)
        size = upsample_size(upsample, images.shape[-2:])
        with torch.inference_mode():  # maps in fp32 whatever the backbone ran in: the product is tiny
            return explain_from_features(self.model.attention, feats.float(), logits.float(), targets, top_k, size, all_classes)

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """Autocast for the backbone's forward when a reduced precision was asked for."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def explain_features(
        self,
        feats: torch.Tensor,
        targets: int | Sequence[int] | torch.Tensor | None = None,
        top_k: int | None = None,
        upsample: bool | int = False,
    ) -> Explanation:
        """From feature maps F (B, C, h, w), e.g. read from a feature cache: no image needed;
        ``upsample`` True is the backbone's input crop."""
        if feats.dim() == 3:
            feats = feats.unsqueeze(0)
        if isinstance(targets, int):
            targets = [targets]
        return self.model.explain_features(feats.to(self.device).float(), targets, top_k, upsample)


# ---------------------------------------------------------------- maps for a batch of rows
def explain_rows(
    model: LCAM,
    feats: torch.Tensor,
    selection: ClassSelection,
    *,
    logits: torch.Tensor | None = None,
    labels: np.ndarray | None = None,
    top5: np.ndarray | None = None,
    top5_probs: np.ndarray | None = None,
    upsample_to: int | None = None,
) -> dict[str, np.ndarray]:
    """The store's columns for a batch of F (B, C, h, w): class ids, probs, raw maps, ...

    With the stored top-5 (a cache) and ``predicted``/``top-k`` up to 5, the classes and
    probabilities are the extraction's own (from float32 features), so they agree with
    explaining the images; otherwise the clean logits (given, or ``head(F)``) decide.
    """
    b = feats.shape[0]
    dev = feats.device
    parts = selection.parts or (selection,)
    ranked_k = max((p.k for p in parts if p.mode in ("predicted", "top-k")), default=0)
    all_probs: list[torch.Tensor] = []

    def softmax() -> torch.Tensor:  # the clean probabilities of every class, computed once when needed
        if not all_probs:
            all_probs.append((logits if logits is not None else model.backbone.head(feats)).float().softmax(1))
        return all_probs[0]

    if ranked_k and top5 is not None and ranked_k <= top5.shape[1]:
        ranked_ids = torch.from_numpy(np.ascontiguousarray(top5[:, :ranked_k], dtype=np.int64)).to(dev)
        ranked_probs = torch.from_numpy(np.ascontiguousarray(top5_probs[:, :ranked_k], dtype=np.float32)).to(dev)
        predicted, predicted_prob = top5[:, 0].astype(np.int32), top5_probs[:, 0].astype(np.float32)
    else:
        if logits is None:
            logits = model.backbone.head(feats)
        p = softmax()
        ranked_ids = choose_targets(logits, None, ranked_k) if ranked_k else None
        ranked_probs = p.gather(1, ranked_ids) if ranked_k else None
        top_p, top_c = p.max(1)
        predicted, predicted_prob = top_c.cpu().numpy().astype(np.int32), top_p.cpu().numpy().astype(np.float32)
    ids_cols: list[torch.Tensor] = []
    prob_cols: list[torch.Tensor] = []
    for part in parts:
        if part.mode in ("predicted", "top-k"):
            ids_cols.append(ranked_ids[:, : part.k])
            prob_cols.append(ranked_probs[:, : part.k])
        elif part.mode == "label":  # -1 (no label) stays -1: probability 0, map zeroed below
            lab = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(dev)[:, None]
            known = lab >= 0
            ids_cols.append(torch.where(known, lab, -1))
            prob_cols.append(softmax().gather(1, lab.clamp_min(0)) * known)
        else:
            fixed = torch.tensor(part.ids, device=dev).expand(b, len(part.ids))
            ids_cols.append(fixed)
            prob_cols.append(softmax().gather(1, fixed))
    class_ids = torch.cat(ids_cols, 1)
    probs = torch.cat(prob_cols, 1).float().cpu().numpy()
    raw = model.attention.selected_many(feats.float(), class_ids.clamp_min(0)).float()
    raw = raw * (class_ids >= 0)[:, :, None, None]  # a missing label's column: an all-zero map
    out = {
        "class_ids": class_ids.cpu().numpy().astype(np.int32),
        "probs": probs,
        "raw": raw.cpu().numpy().astype(np.float16),
        "predicted": predicted,
        "predicted_prob": predicted_prob,
    }
    if upsample_to:
        out["upsampled"] = upsampled_uint8(raw, upsample_to).cpu().numpy()
    return out
