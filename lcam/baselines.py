"""CAM methods the papers compare L-CAM with (SPEC section 5), behind one small base class.

A :class:`CAMMethod` is built with a :class:`~lcam.backbones.Backbone` and called as
``method(images, class_ids) -> (B, h, w)``: images (B, 3, H, W) in pixel space [0, 1],
one class id per image, maps at the method's own resolution, non-negative (except
:class:`LCAMMethod`, see there) and not necessarily normalised. The evaluation
(:mod:`lcam.metrics`) min-max normalises and upsamples every map the same way.

Grad-CAM, Grad-CAM++ and Score-CAM come from pytorch-grad-cam, hooked on
``backbone.target_layer`` (the layer the attention mechanism reads) with
``model=backbone``, so they see pixel-space input like everything else here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pytorch_grad_cam
import torch
import torch.nn.functional as nnf
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

from .attention import check_targets
from .backbones import Backbone
from .metrics import prepare_cams


class CAMMethod:
    """Base class: ``__call__`` checks the class ids, subclasses implement :meth:`compute`."""

    name: str = "cam"

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def __call__(self, images: torch.Tensor, class_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Maps (B, h, w) for ``images`` (B, 3, H, W) in [0, 1] and ``class_ids`` (B,)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        ids = check_targets(torch.as_tensor(class_ids).cpu(), images.shape[0], self.backbone.num_classes)
        return self.compute(images, ids.to(images.device))

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.backbone.name!r})"


# ---------------------------------------------------------------------------- pytorch-grad-cam


def _at_feature_resolution(cls: type) -> type:
    """A pytorch-grad-cam class whose maps stay at the target layer's resolution.

    ``BaseCAM.compute_cam_per_layer`` passes ``get_target_width_height(input)`` to
    ``scale_cam_image``, which skips its cv2 resize when that size is None; the maps
    are still min-max scaled by the library, ``(x - min) / (max - min + 1e-7)``,
    once per layer and once more when aggregating layers.
    """
    return type(f"{cls.__name__}AtFeatures", (cls,), {"get_target_width_height": lambda self, x: None})


def _reroot_at_features(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    # The backbone is frozen (no parameter requires grad), so F carries no graph and
    # pytorch-grad-cam would find no gradient. Starting the graph at F makes
    # dlogit/dF available while backward runs through the head only.
    return output.detach().requires_grad_(True)


class _PytorchGradCAMMethod(CAMMethod):
    """One pytorch-grad-cam call per batch; hooks live only for that call."""

    cam_class: type
    uses_gradients: bool = True

    def _configure(self, cam: Any) -> None:
        """Per-call knobs on the pytorch-grad-cam object (Score-CAM's batch size)."""

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        layer = self.backbone.target_layer
        targets = [ClassifierOutputTarget(int(c)) for c in class_ids.tolist()]
        reroot = layer.register_forward_hook(_reroot_at_features, prepend=True) if self.uses_gradients else None
        cam = self.cam_class(model=self.backbone, target_layers=[layer], reshape_transform=getattr(self.backbone, "reshape_transform", None))
        self._configure(cam)
        try:
            with torch.enable_grad() if self.uses_gradients else torch.no_grad():
                maps = cam(input_tensor=images, targets=targets)
        finally:
            # release explicitly: BaseCAM.__exit__ swallows IndexError, and hooks left on
            # the shared backbone would store activations on every later forward
            cam.activations_and_grads.release()
            if reroot is not None:
                reroot.remove()
        return torch.from_numpy(np.asarray(maps, dtype=np.float32)).to(images.device)


class GradCAM(_PytorchGradCAMMethod):
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k w_k F_k), w_k = mean_ij dy_c/dF_kij.

    Output at feature resolution (h, w), min-max scaled by pytorch-grad-cam. Cost: one
    forward and one backward through the head per batch.
    """

    name = "gradcam"
    cam_class = _at_feature_resolution(pytorch_grad_cam.GradCAM)


class GradCAMPlusPlus(_PytorchGradCAMMethod):
    """Grad-CAM++ (Chattopadhyay et al. 2018) as pytorch-grad-cam computes it:
    a_kij = g^2 / (2 g^2 + sum_ij(F_k) g^3), w_k = sum_ij a_kij ReLU(g_kij), g = dy_c/dF
    (the exp(S) form of the paper's eq. 19 with exp dropped); output as :class:`GradCAM`."""

    name = "gradcam++"
    cam_class = _at_feature_resolution(pytorch_grad_cam.GradCAMPlusPlus)


class ScoreCAM(_PytorchGradCAMMethod):
    """Score-CAM (Wang et al. 2020) via pytorch-grad-cam: each of the C feature maps,
    upsampled and min-max normalised, masks the image; weights = softmax over channels
    of the class logit of the masked images; ReLU(sum_k w_k F_k).

    Cost: C forward passes per image (512 for VGG-16, 2048 for ResNet-50, 1280 for
    EfficientNet-Lite0), ``batch_size`` masked images per forward.
    """

    name = "scorecam"
    cam_class = _at_feature_resolution(pytorch_grad_cam.ScoreCAM)
    uses_gradients = False

    def __init__(self, backbone: Backbone, batch_size: int = 32) -> None:
        super().__init__(backbone)
        self.batch_size = batch_size

    def _configure(self, cam: Any) -> None:
        cam.batch_size = self.batch_size  # read by pytorch-grad-cam's ScoreCAM.get_cam_weights


# ---------------------------------------------------------------------------- RISE


class RISE(CAMMethod):
    """RISE (Petsiuk et al. 2018): saliency_c = sum_i P_c(x * M_i) M_i / (N p).

    M_i: a random binary s x s grid (each cell 1 with probability p), upsampled
    bilinearly (align_corners=False) to ((s+1)*ch, (s+1)*cw) with cell size
    (ch, cw) = (ceil(H/s), ceil(W/s)), then cropped to H x W at a random integer
    shift in [0, ch) x [0, cw). P_c is the softmax probability of class c.

    The random draws (grids and shifts) are made once, from a generator seeded with
    ``seed``, and reused for every image; the mask pixels are rebuilt from them chunk
    by chunk (cheap next to the forward), so memory is O(N s^2) rather than O(N H W)
    (8000 masks at 224 x 224 in float32 would take 1.6 GB).

    Cost: N forward passes per image (the papers: N = 4000 for VGG-16, 8000 for
    ResNet-50), ``mask_batch`` masked images per forward. Output at input resolution.
    """

    name = "rise"

    def __init__(
        self,
        backbone: Backbone,
        num_masks: int = 4000,
        grid: int = 7,
        p: float = 0.5,
        mask_batch: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone)
        if not 0 < p <= 1:
            raise ValueError(f"p={p} must be in (0, 1]")
        self.num_masks, self.grid, self.p, self.mask_batch, self.seed = num_masks, grid, p, mask_batch, seed
        g = torch.Generator().manual_seed(seed)
        self._grids = (torch.rand(num_masks, 1, grid, grid, generator=g) < p).float()
        self._shift_u = torch.rand(num_masks, 2, generator=g)  # uniform in [0, 1), scaled by the cell size

    def masks(
        self, size: tuple[int, int], start: int = 0, stop: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Masks ``start:stop`` at ``size`` = (H, W), (n, H, W) in [0, 1], built on ``device``."""
        hh, ww = size
        s = self.grid
        ch, cw = math.ceil(hh / s), math.ceil(ww / s)
        grids = self._grids[start:stop].to(device)
        up = nnf.interpolate(grids, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
        u = self._shift_u[start:stop].to(device)
        dy = (u[:, 0] * ch).long()
        dx = (u[:, 1] * cw).long()
        rows = dy[:, None] + torch.arange(hh, device=up.device)  # (n, H)
        cols = dx[:, None] + torch.arange(ww, device=up.device)  # (n, W)
        n = torch.arange(up.shape[0], device=up.device)[:, None, None]
        return up[n, rows[:, :, None], cols[:, None, :]]

    @torch.no_grad()
    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = images.shape
        sal = torch.zeros(b, hh * ww, dtype=torch.float64, device=images.device)
        for start in range(0, self.num_masks, self.mask_batch):
            m = self.masks((hh, ww), start, start + self.mask_batch, images.device).to(images.dtype)
            for i in range(b):
                probs = self.backbone(images[i : i + 1] * m[:, None]).float().softmax(1)[:, class_ids[i]]
                sal[i] += (probs.double()[None] @ m.flatten(1).double())[0]
        return (sal / (self.num_masks * self.p)).float().view(b, hh, ww)


# ---------------------------------------------------------------------------- sanity floors


class CenteredGaussian(CAMMethod):
    """exp(-((y - H/2)^2 + (x - W/2)^2) / (2 sigma^2)) at pixel centres, the same for every
    image; sigma = ``sigma`` x the shorter image side. A centre-bias floor."""

    name = "gaussian"

    def __init__(self, backbone: Backbone, sigma: float = 0.25) -> None:
        super().__init__(backbone)
        self.sigma = sigma

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = images.shape
        sd = self.sigma * min(hh, ww)
        y = torch.arange(hh, device=images.device, dtype=torch.float32) + 0.5 - hh / 2
        x = torch.arange(ww, device=images.device, dtype=torch.float32) + 0.5 - ww / 2
        g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sd**2))
        return g.expand(b, hh, ww).clone()


class RandomMap(CAMMethod):
    """Uniform noise in [0, 1) at ``size`` x ``size`` (default 7 x 7): a chance floor.

    The generator is seeded once at construction: two instances with the same seed give
    the same sequence of maps; successive calls give fresh maps.
    """

    name = "random"

    def __init__(self, backbone: Backbone, size: int = 7, seed: int = 0) -> None:
        super().__init__(backbone)
        self.size, self.seed = size, seed
        self._gen = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the sequence from ``seed`` (lets a dataset evaluation seed every batch
        from its position, so the maps do not depend on which worker ran which batch)."""
        self._gen.manual_seed(seed)

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return torch.rand(images.shape[0], self.size, self.size, generator=self._gen).to(images.device)


class LCAMMethod(CAMMethod):
    """L-CAM as a :class:`CAMMethod`: raw Z[b, t_b] (before the sigmoid) at feature
    resolution, from one forward pass. Raw Z can be negative: the only map here that
    is not non-negative; the protocol's min-max normalisation makes the offset moot."""

    name = "lcam"

    def __init__(self, lcam_model: torch.nn.Module) -> None:
        super().__init__(lcam_model.backbone)
        self.lcam = lcam_model

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self.lcam.explain(images, targets=class_ids).raw[:, 0]

    def from_features(self, feats: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The same maps from F already computed (e.g. by the evaluation's clean forward):
        no backbone pass at all, the arithmetic of :meth:`compute` after its ``extract``."""
        ids = check_targets(torch.as_tensor(class_ids).cpu(), feats.shape[0], self.backbone.num_classes)
        return self.lcam.explain_features(feats, targets=ids.to(feats.device), logits=logits).raw[:, 0]


BASELINES: dict[str, type[CAMMethod]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "scorecam": ScoreCAM,
    "rise": RISE,
    "gaussian": CenteredGaussian,
    "random": RandomMap,
}


def build_baseline(name: str, backbone: Backbone, **kwargs: Any) -> CAMMethod:
    """``BASELINES[name](backbone, **kwargs)`` with a helpful error for unknown names."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
    return BASELINES[name](backbone, **kwargs)


# ---------------------------------------------------------------------------- ROAD


@dataclass
class ROADScores:
    """Softmax scores of the target class: ``clean`` (B,), ``morf``/``lerf`` (P, B) per percentile.

    pytorch-grad-cam's percentile p means: the pixels at or above the p-th percentile of
    the map (MoRF) or at or below the (100-p)-th (LeRF) are imputed, i.e. roughly
    (100-p)% of the pixels are removed and p% kept (ties at the threshold are all removed).
    """

    percentiles: tuple[int, ...]
    clean: torch.Tensor
    morf: torch.Tensor
    lerf: torch.Tensor

    def combined(self) -> torch.Tensor:
        """pytorch-grad-cam's ``ROADCombined``: mean over percentiles of (LeRF - MoRF) / 2, per image."""
        return ((self.lerf - self.morf) / 2).mean(0)

    def protocol(self) -> dict[str, Any]:
        return {
            "metric": "ROAD (Rong et al. 2022) via pytorch-grad-cam",
            "imputation": "NoisyLinearImputer (noise 0.01) in pixel space [0, 1]",
            "score": "softmax probability of the target class",
            "percentiles": list(self.percentiles),
            "cam_preprocessing": "min-max at own resolution, bilinear align_corners=False upsampling",
        }


def road_scores(
    backbone: Backbone,
    images: torch.Tensor,
    cams: torch.Tensor,
    class_ids: torch.Tensor | Sequence[int],
    percentiles: Sequence[int] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    seed: int | None = 0,
) -> ROADScores:
    """ROAD MoRF/LeRF curves with pytorch-grad-cam's ``ROADMostRelevantFirst`` /
    ``ROADLeastRelevantFirst`` (imputation in pixel space: our backbone normalises inside).

    ``cams`` (B, h, w) at their own resolution are min-max normalised and upsampled to
    the image size first. Cost per image: 2P + 1 forward passes (P = len(percentiles),
    19 for the default) plus 2P sparse linear solves on the CPU (one per imputed image,
    with as many unknowns as removed pixels: up to 45k at 224 x 224), which dominate.
    ``seed`` fixes the imputer's noise without touching the global RNG (None: global RNG).
    """
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst

    ids = check_targets(torch.as_tensor(class_ids).cpu(), images.shape[0], backbone.num_classes)
    maps = prepare_cams(cams.to(images.device), tuple(images.shape[-2:])).cpu().numpy()
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in ids.tolist()]
    with torch.no_grad():
        clean = backbone(images).float().softmax(1).gather(1, ids.to(images.device)[:, None])[:, 0].cpu()

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        morf, lerf = [], []
        # NoisyLinearImputer calls np.argwhere on torch tensors: numpy 2 warns on every call
        warnings.filterwarnings("ignore", message="__array_wrap__ must accept context", category=DeprecationWarning)
        for p in percentiles:
            for metric, out in ((ROADMostRelevantFirst(p), morf), (ROADLeastRelevantFirst(p), lerf)):
                out.append(torch.from_numpy(np.asarray(metric(images, maps, targets, backbone, return_diff=False), dtype=np.float32)))
        return torch.stack(morf), torch.stack(lerf)

    with warnings.catch_warnings():
        if seed is None:
            morf, lerf = run()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                morf, lerf = run()
    return ROADScores(tuple(int(p) for p in percentiles), clean, morf, lerf)


__all__ = [
    "BASELINES",
    "CAMMethod",
    "CenteredGaussian",
    "GradCAM",
    "GradCAMPlusPlus",
    "LCAMMethod",
    "RISE",
    "ROADScores",
    "RandomMap",
    "ScoreCAM",
    "build_baseline",
    "road_scores",
]
