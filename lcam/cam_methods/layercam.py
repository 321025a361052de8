"""LayerCAM (Jiang et al. 2021)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class LayerCAM(PytorchGradCAMMethod, name="layercam", label="LayerCAM", cost="backward", rank=13):
    """ReLU(sum_k ReLU(dy_c/dF_kij) F_kij): a weight per location, not per channel."""

    library_class = "LayerCAM"
