"""LayerCAM (Jiang et al. 2021)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class LayerCAM(PytorchGradCAMMethod):
    """ReLU(sum_k ReLU(dy_c/dF_kij) F_kij): a weight per location, not per channel."""

    name, label, cost, rank = "layercam", "LayerCAM", "backward", 13
    library_class = "LayerCAM"
