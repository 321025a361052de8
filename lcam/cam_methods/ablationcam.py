"""Ablation-CAM (Desai and Ramaswamy 2020)."""

from typing import Any

from .base import Option, register
from .library import PytorchGradCAMMethod


@register
class AblationCAM(PytorchGradCAMMethod, name="ablationcam", label="Ablation-CAM", cost="channels", rank=21):
    """w_k = (y_c - y_c with channel k of F zeroed) / y_c; ReLU(sum_k w_k F_k).

    pytorch-grad-cam swaps the target layer for an ablation layer that replays the
    cached F, so each of the C ablations costs one pass through the head only;
    ``batch_size`` ablations per pass."""

    library_class = "AblationCAM"
    uses_gradients = False
    options = (Option("batch_size", int, 32, "Ablation-CAM ablated channels per head pass", flag="ablationcam-batch"),)

    def configure(self, cam: Any) -> None:
        from pytorch_grad_cam.ablation_layer import AblationLayer

        cam.batch_size = self.batch_size
        cam.ablation_layer = AblationLayer()  # its own, not the library's shared default instance

    def restore(self, layer: Any) -> None:
        # the library puts the target layer back only when it finishes; after an error
        # the backbone would keep replaying stale activations
        for parent in self.backbone.modules():
            for child_name, child in parent.named_children():
                if type(child).__name__ == "AblationLayer":
                    setattr(parent, child_name, layer)
