"""Grad-CAM (Selvaraju et al. 2017)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class GradCAM(PytorchGradCAMMethod, name="gradcam", label="Grad-CAM", cost="backward", default=True, rank=10):
    """ReLU(sum_k w_k F_k), w_k = mean_ij dy_c/dF_kij; at feature resolution (h, w),
    min-max scaled by pytorch-grad-cam."""

    library_class = "GradCAM"
