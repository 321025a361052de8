"""HiResCAM (Draelos and Carin 2020)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class HiResCAM(PytorchGradCAMMethod, name="hirescam", label="HiResCAM", cost="backward", rank=14):
    """sum_k dy_c/dF_kij F_kij (element-wise, no spatial averaging of the gradient)."""

    library_class = "HiResCAM"
