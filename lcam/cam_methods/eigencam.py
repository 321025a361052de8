"""Eigen-CAM (Muhammad and Yeasin 2020)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class EigenCAM(PytorchGradCAMMethod, name="eigencam", label="Eigen-CAM", cost="forward", rank=15):
    """F projected on its first principal component: one forward, no gradient, and the
    same map for every class (a class-agnostic baseline)."""

    library_class = "EigenCAM"
    uses_gradients = False
