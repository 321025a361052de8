"""HiResCAM (Draelos and Carin 2020)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class HiResCAM(PytorchGradCAMMethod):
    """sum_k dy_c/dF_kij F_kij (element-wise, no spatial averaging of the gradient)."""

    name, label, cost, rank = "hirescam", "HiResCAM", "backward", 14
    library_class = "HiResCAM"
