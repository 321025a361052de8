"""XGrad-CAM (Fu et al. 2020)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class XGradCAM(PytorchGradCAMMethod, name="xgradcam", label="XGrad-CAM", cost="backward", rank=12):
    """w_k = sum_ij (F_kij / sum_ij F_kij) dy_c/dF_kij: gradients weighted by the normalised activations."""

    library_class = "XGradCAM"
