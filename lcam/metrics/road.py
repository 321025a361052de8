"""ROAD (Rong et al. 2022) through pytorch-grad-cam: remove pixels in CAM order, impute, rescore."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

from ..attention import check_targets
from ..backbones.base import Backbone
from .adic import prepare_cams


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
                out.append(
                    torch.from_numpy(
                        np.asarray(metric(images, maps, targets, backbone, return_diff=False), dtype=np.float32)
                    )
                )
        return torch.stack(morf), torch.stack(lerf)

    with warnings.catch_warnings():
        if seed is None:
            morf, lerf = run()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                morf, lerf = run()
    return ROADScores(tuple(int(p) for p in percentiles), clean, morf, lerf)
