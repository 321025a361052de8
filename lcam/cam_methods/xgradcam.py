"""XGrad-CAM (Fu et al. 2020)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class XGradCAM(PytorchGradCAMMethod):
    """w_k = sum_ij (F_kij / sum_ij F_kij) dy_c/dF_kij: gradients weighted by the normalised activations."""

    name, label, cost, rank = "xgradcam", "XGrad-CAM", "backward", 12
    library_class = "XGradCAM"
