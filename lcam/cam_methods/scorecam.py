"""Score-CAM (Wang et al. 2020)."""

from typing import Any

from .base import Option, register
from .library import PytorchGradCAMMethod


@register
class ScoreCAM(PytorchGradCAMMethod, name="scorecam", label="Score-CAM", cost="channels", default=True, rank=20):
    """Each of the C feature maps, upsampled and min-max normalised, masks the image;
    weights = softmax over channels of the class logit of the masked images;
    ReLU(sum_k w_k F_k). ``batch_size`` masked images per forward."""

    library_class = "ScoreCAM"
    uses_gradients = False
    options = (Option("batch_size", int, 32, "Score-CAM masked images per forward", flag="scorecam-batch"),)

    def forwards_per_image(self, channels: int) -> int:
        return channels + 1  # the clean pass for F, then one masked image per channel

    def configure(self, cam: Any) -> None:
        cam.batch_size = self.batch_size  # read by pytorch-grad-cam's ScoreCAM.get_cam_weights
