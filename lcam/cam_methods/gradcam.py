"""Grad-CAM (Selvaraju et al. 2017)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class GradCAM(PytorchGradCAMMethod):
    """ReLU(sum_k w_k F_k), w_k = mean_ij dy_c/dF_kij; at feature resolution (h, w),
    min-max scaled by pytorch-grad-cam."""

    name, label, cost, default, rank = "gradcam", "Grad-CAM", "backward", True, 10
    library_class = "GradCAM"
