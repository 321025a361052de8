"""Eigen-CAM (Muhammad and Yeasin 2020)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class EigenCAM(PytorchGradCAMMethod):
    """F projected on its first principal component: one forward, no gradient, and the
    same map for every class (a class-agnostic baseline)."""

    name, label, cost, rank = "eigencam", "Eigen-CAM", "forward", 15
    library_class = "EigenCAM"
    uses_gradients = False
