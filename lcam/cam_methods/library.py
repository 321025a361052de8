"""Methods computed by pytorch-grad-cam: the adapter every such method subclasses.

Each method names a pytorch-grad-cam class (``library_class``), hooked on
``backbone.target_layer`` (the layer the attention mechanism reads) with
``model=backbone``, so it sees pixel-space input like everything else here, and
``reshape_transform=backbone.reshape_transform`` where the backbone has one (ViTs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .base import CAMMethod

if TYPE_CHECKING:
    import torch

_AT_FEATURES: dict[str, type] = {}


def silence_library_bars() -> None:
    """pytorch-grad-cam's own tqdm bars (Score-CAM, Ablation-CAM) off: they would print through
    ``--no-progress`` and into logs; the evaluation reports a costly method's progress itself
    (``forwards_per_image``, with rate and ETA)."""
    import functools
    import importlib
    import types

    import tqdm

    quiet = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    for name in ("score_cam", "ablation_cam", "ablation_cam_multilayer"):
        try:
            module = importlib.import_module(f"pytorch_grad_cam.{name}")
        except ImportError:  # a library version without that method
            continue
        if getattr(module, "tqdm", None) is tqdm:
            module.tqdm = quiet


def at_feature_resolution(class_name: str) -> type:
    """pytorch-grad-cam's ``class_name`` with maps kept at the target layer's resolution.

    ``BaseCAM.compute_cam_per_layer`` passes ``get_target_width_height(input)`` to
    ``scale_cam_image``, which skips its cv2 resize when that size is None; the maps
    are still min-max scaled by the library, ``(x - min) / (max - min + 1e-7)``,
    once per layer and once more when aggregating layers.
    """
    if class_name not in _AT_FEATURES:
        import pytorch_grad_cam

        silence_library_bars()
        base = getattr(pytorch_grad_cam, class_name)
        _AT_FEATURES[class_name] = type(
            f"{class_name}AtFeatures", (base,), {"get_target_width_height": lambda self, x: None}
        )
    return _AT_FEATURES[class_name]


def reroot_at_features(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: start the autograd graph at F.

    The backbone is frozen (no parameter requires grad), so F carries no graph and
    pytorch-grad-cam would find no gradient. Starting the graph at F makes dlogit/dF
    available while backward runs through the head only.
    """
    return output.detach().requires_grad_(True)


class PytorchGradCAMMethod(CAMMethod):
    """One pytorch-grad-cam call per batch; its hooks live only for that call."""

    library_class: ClassVar[str]
    uses_gradients: ClassVar[bool] = True

    def configure(self, cam: Any) -> None:
        """Per-call knobs on the pytorch-grad-cam object (e.g. Score-CAM's batch size)."""

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        layer = self.backbone.target_layer
        targets = [ClassifierOutputTarget(int(c)) for c in class_ids.tolist()]
        reroot = layer.register_forward_hook(reroot_at_features, prepend=True) if self.uses_gradients else None
        cam = at_feature_resolution(self.library_class)(
            model=self.backbone,
            target_layers=[layer],
            reshape_transform=getattr(self.backbone, "reshape_transform", None),
        )
        self.configure(cam)
        try:
            with torch.enable_grad() if self.uses_gradients else torch.no_grad():
                maps = cam(input_tensor=images, targets=targets)
        finally:
            # release explicitly: BaseCAM.__exit__ swallows IndexError, and hooks left on
            # the shared backbone would store activations on every later forward
            cam.activations_and_grads.release()
            if reroot is not None:
                reroot.remove()
            self.restore(layer)
        return torch.from_numpy(np.asarray(maps, dtype=np.float32)).to(images.device)

    def restore(self, layer: Any) -> None:
        """Undo what the library may have changed in the backbone if it stopped half-way."""
