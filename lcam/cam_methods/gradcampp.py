"""Grad-CAM++ (Chattopadhyay et al. 2018)."""

from .base import register
from .library import PytorchGradCAMMethod


@register
class GradCAMPlusPlus(
    PytorchGradCAMMethod, name="gradcam++", label="Grad-CAM++", cost="backward", default=True, rank=11
):
    """As pytorch-grad-cam computes it: a_kij = g^2 / (2 g^2 + sum_ij(F_k) g^3),
    w_k = sum_ij a_kij ReLU(g_kij), g = dy_c/dF (the exp(S) form of the paper's eq. 19
    with exp dropped); output as Grad-CAM."""

    library_class = "GradCAMPlusPlus"
