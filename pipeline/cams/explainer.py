"""The public Python API of a trained L-CAM: :class:`Explainer` (images in memory), the
class selection of a bulk run (:class:`ClassSelection`, defined torch-free in :mod:`pipeline.classes`), the checkpoint's fingerprint, and
:func:`explain_rows` (the CAM store's columns for a batch of feature maps), which both bulk
sources (:mod:`pipeline.cams.from_cache`, :mod:`pipeline.cams.from_shards`) share."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lcam import LCAM, Explanation, Preprocessing
from lcam.explain import choose_targets, explain_from_features, upsampled_uint8
from lcam.model import upsample_size

from ..classes import MODES, ClassSelection  # noqa: F401  the class selection is torch-free (answers before torch loads)
from ..device import autocast_dtype, resolve_device
from ..fs import StorageOptions
from ..images import is_one_image, load_image


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

    def __init__(
        self,
        model: LCAM,
        checkpoint: Mapping[str, Any] | None = None,
        autocast: torch.dtype | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.model = model.eval()
        self.checkpoint = dict(checkpoint or {})
        self.autocast = autocast
        self._names = list(class_names) if class_names is not None else None

    @classmethod
    def fit(cls, model: Any, data: Any, *, class_names: Sequence[str] | None = None, **kwargs: Any) -> "Explainer":
        """Train an L-CAM-Fm for ``model`` (an ``nn.Module`` classifier, a Backbone or a spec
        string) on ``data`` (image paths or a folder, PIL images, a tensor, a DataLoader, or
        shards) and return its Explainer; see :func:`pipeline.cams.fit.fit_lcam` for the options."""
        from .fit import fit_lcam

        lcam_model, record = fit_lcam(model, data, **kwargs)
        return cls(lcam_model.eval(), record, class_names=class_names)

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
        return checkpoint_fingerprint(
            {
                "method": self.checkpoint.get("method"),
                "backbone": self.model.backbone.describe(),
                "attention": self.model.attention.state_dict(),
            }
        )

    def preprocess(self, image: bytes | np.ndarray | Any) -> torch.Tensor:
        """Encoded bytes, an RGB array or a PIL image -> (3, crop, crop) in [0, 1] on the model's device."""
        from ..images import decode_image, preprocess

        rgb = decode_image(image) if isinstance(image, (bytes, bytearray)) else image
        return preprocess(rgb, self.preprocessing).to(self.device)

    @property
    def names(self) -> list[str]:
        """The classifier's class names (ImageNet's for 1,000 classes, else "class k"; ``class_names=`` overrides)."""
        if self._names is None:
            from ..classes import load_class_names

            self._names = load_class_names(None, None, self.num_classes)
        return self._names

    def _images(self, images: Any) -> torch.Tensor:
        if is_one_image(images):
            images = [images]
        if isinstance(images, (list, tuple)):  # paths, PIL images, bytes, arrays or (3, H, W) tensors
            if not images:
                raise ValueError("no images given")
            images = torch.stack([load_image(x, self.preprocessing) for x in images])
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"images must be paths, PIL images, encoded bytes, RGB arrays or a tensor (B, 3, H, W) in [0, 1], "
                f"got {type(images).__name__}"
            )
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            return images.float().div_(255.0)
        lo, hi = torch.aminmax(images)
        if float(lo) < -1e-3 or float(hi) > 1.0 + 1e-3:  # normalised or 0..255 input gives nonsense maps
            raise ValueError(
                f"images must be in pixel space [0, 1] (got values in [{float(lo):.3g}, {float(hi):.3g}]); the backbone normalises inside"
            )
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
        size (True) or at that size (an int), as :meth:`lcam.model.LCAM.explain`.
        ``images``: a tensor in [0, 1], or an image path, PIL image, encoded bytes or RGB array,
        or a list of those (each resized and centre-cropped as the backbone's preprocessing says);
        ``e.class_names`` names the explained classes."""
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
            e = explain_from_features(
                self.model.attention, feats.float(), logits.float(), targets, top_k, size, all_classes
            )
        e.names = self.names
        return e

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


# ---------------------------------------------------------------- images from Python


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
