"""The frozen classifier split in two (SPEC section 6): :class:`Backbone` and what every
backbone source shares (preprocessing, weights loading, BatchNorm folding, fingerprints).

The built-ins and :func:`lcam.backbones.registry.build_backbone` sit above this module, and so do
the spec resolvers (:mod:`lcam.backbones.specs`, :mod:`lcam.backbones.split`, :mod:`lcam.backbones.vit`): they all import
from here and this module imports none of them.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

# torch-free, so a decoding worker can unpickle it without importing torch; re-exported here
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing  # noqa: F401


class WeightsUnavailable(RuntimeError):
    """Weights that were asked for cannot be had here (no internet, no file)."""


class BackboneSpecError(ValueError, KeyError):
    """A backbone spec that names nothing buildable, or a split that does not reproduce the model.

    A ValueError (a bad argument value); also a KeyError because unknown registry names
    raised KeyError before specs existed, and callers still catch that.
    """

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""


class Backbone(nn.Module):
    """A frozen classifier: ``logits = head(features(normalize(x)))`` for x in [0, 1].

    Parameters never require grad and the module never leaves eval mode, so
    BatchNorm keeps its running statistics and dropout stays off during L-CAM
    training (SPEC section 3), whatever a parent module's ``.train()`` says.
    """

    def __init__(
        self,
        name: str,
        features: nn.Module,
        head: nn.Module,
        feature_shape: tuple[int, int, int],
        preprocessing: Preprocessing = Preprocessing(),
        num_classes: int = 1000,
        weights: str = "random",
        target_layer: nn.Module | None = None,
        reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        patch_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.features = features
        self.head = head
        self.feature_shape = tuple(feature_shape)
        self.preprocessing = preprocessing
        self.num_classes = num_classes
        self.weights_name = weights
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)
        # Grad-CAM & co. hook ``target_layer`` (default: ``features``); for token models its
        # output is (B, N, C) and ``reshape_transform`` turns it into the (B, C, h, w) grid
        # (pytorch-grad-cam's argument of that name). A plain attribute, not a submodule.
        self.__dict__["_target_layer"] = target_layer
        self.reshape_transform = reshape_transform
        # Channels of F that are spatial features; the rest (a ViT's class/register tokens,
        # see lcam.backbones.vit) ride along and L-CAM-Fm's mask never touches them.
        self.patch_channels = patch_channels
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        self._digest: str | None = None

    def train(self, mode: bool = True) -> "Backbone":  # noqa: ARG002 - frozen by design
        return super().train(False)

    @property
    def target_layer(self) -> nn.Module:
        """The module whose output is F (or, with ``reshape_transform``, F's patch grid):
        what CAM baselines hook, the same layer the AM reads."""
        return self._target_layer if self._target_layer is not None else self.features

    def mask_features(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L-CAM-Fm's ``a_t * F``: ``mask`` (B, 1, h, w) multiplies the patch channels only."""
        if self.patch_channels is None or self.patch_channels == feats.shape[1]:
            return mask * feats
        c = self.patch_channels
        return torch.cat([mask * feats[:, :c], feats[:, c:]], dim=1)

    def linear_classifier(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight (K, C), bias (K,)) when the head is global average pooling + one linear
        layer (dropout, flatten and identity allowed between): then ``logits = W mean(F) + b``
        and class k's CAM (Zhou et al.) is ``sum_c W[k, c] F_c``. None for any other head
        (VGG-16's fully connected layers). Read from the head's structure, so a new backbone
        built as ``nn.Sequential(pool, nn.Flatten(1), [dropout,] linear)`` is recognised, and so is
        the traced head of a model object split automatically (torchvision's ResNet: avgpool,
        ``torch.flatten(x, 1)``, fc)."""
        mods = _head_chain(self.head)
        if not mods or not isinstance(mods[-1], nn.Linear) or not _is_global_avg_pool(mods[0]):
            return None
        if not all(isinstance(m, (nn.Flatten, nn.Dropout, nn.Identity)) for m in mods[1:-1]):
            return None
        fc: nn.Linear = mods[-1]
        if fc.in_features != self.feature_shape[0] or fc.out_features != self.num_classes:
            return None
        bias = fc.bias if fc.bias is not None else torch.zeros(fc.out_features)
        return fc.weight.detach().clone(), bias.detach().clone()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images in [0, 1], shape (B, 3, H, W)."""
        return self.head(self.features(self.normalize(x)))

    def extract(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, logits) for images in [0, 1] from one pass."""
        feats = self.features(self.normalize(x))
        return feats, self.head(feats)

    def folded(self) -> "Backbone":
        """An inference copy with every BatchNorm folded into the convolution before it.

        Same function up to float rounding (~1e-5 relative on the logits) and the same
        identity (:meth:`describe`), 1.2-1.5x faster on CPU where BatchNorm is a separate
        memory-bound pass. For evaluation and extraction; training keeps the original.
        """
        features = fold_for_inference(self.features)
        # the hooked layer survives only where folding left the features module as it was
        layer = self._target_layer if features is self.features else None
        out = Backbone(
            self.name,
            features,
            fold_for_inference(self.head),
            self.feature_shape,
            self.preprocessing,
            self.num_classes,
            self.weights_name,
            layer,
            self.reshape_transform,
            self.patch_channels,
        )
        out._digest = self.weights_digest()
        return out.to(self.mean.device)

    def weights_digest(self) -> str:
        """sha256 of the parameters and buffers: identifies the weights in cache fingerprints."""
        if self._digest is None:
            h = hashlib.sha256()
            for key, value in sorted(self.state_dict().items()):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def describe(self) -> dict[str, Any]:
        """JSON-able identity: name, weights, digest, feature shape, preprocessing."""
        return {
            "backbone": self.name,
            "weights": self.weights_name,
            "weights_digest": self.weights_digest(),
            "feature_shape": list(self.feature_shape),
            "num_classes": self.num_classes,
            "preprocessing": self.preprocessing.to_dict(),
        }


def _head_chain(head: nn.Module) -> list[nn.Module] | None:
    """The head as a straight chain of modules: an ``nn.Sequential``'s children; a traced
    ``GraphModule``'s module calls in graph order when each step takes only the one before it
    (a ``flatten(x, 1)`` call counts as ``nn.Flatten``); else the head itself. None for a
    graph that branches or calls anything else: no claim is made about such a head."""
    if isinstance(head, nn.Sequential):
        return list(head)
    if not isinstance(head, torch.fx.GraphModule):
        return [head]
    chain: list[nn.Module] = []
    prev = None
    for node in head.graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                return None  # two inputs
            prev = node
            continue
        if node.op == "output":
            return chain if node.args and node.args[0] is prev else None
        if node.all_input_nodes != [prev]:
            return None
        if node.op == "call_module":
            chain.append(head.get_submodule(node.target))
        elif node.target in (torch.flatten, "flatten") and tuple(node.args[1:]) == (1,) and not node.kwargs:
            chain.append(nn.Flatten(1))
        else:
            return None
        prev = node
    return None


def _is_global_avg_pool(m: nn.Module) -> bool:
    size = getattr(m, "output_size", None)
    return isinstance(m, nn.AdaptiveAvgPool2d) and size in (1, (1, 1), [1, 1])


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (bn.weight if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else 0.0
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return (weight * scale.reshape(-1, 1, 1, 1)).detach(), ((bias - bn.running_mean) * scale + shift).detach()


def _conv2d_args(node: torch.fx.Node) -> list[Any] | None:
    """The 7 arguments of an ``F.conv2d`` call node, defaults filled in; None for other nodes."""
    if node.op != "call_function" or node.target not in (F.conv2d, torch.conv2d):
        return None
    args = list(node.args) + list((None, None, None, 1, 0, 1, 1)[len(node.args) :])
    for i, name in enumerate(("input", "weight", "bias", "stride", "padding", "dilation", "groups")):
        args[i] = node.kwargs.get(name, args[i])
    return args


def _merge_symmetric_padding(gm: torch.fx.GraphModule, mods: Mapping[str, nn.Module]) -> int:
    """Drop each symmetric ``nn.ZeroPad2d`` that feeds only an unpadded ``F.conv2d`` (TF-style
    "same" convolutions at stride 1) into the convolution's own padding: same zeros, one
    tensor copy less. Returns how many were merged."""
    merged = 0
    for node in list(gm.graph.nodes):
        pad = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(pad, nn.ZeroPad2d) or len(node.users) != 1 or len(node.args) != 1:
            continue
        left, right, top, bottom = pad.padding
        conv = next(iter(node.users))
        args = _conv2d_args(conv)
        if left != right or top != bottom or args is None or args[0] is not node or args[4] not in (0, (0, 0), [0, 0]):
            continue
        args[0], args[4] = node.args[0], (top, left)
        conv.args, conv.kwargs = tuple(args), {}
        gm.graph.erase_node(node)
        merged += 1
    return merged


def fold_for_inference(module: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``module`` where each BatchNorm2d fed only by a convolution
    (an ``nn.Conv2d`` called once, or ``F.conv2d`` on the module's own weights) is folded
    into it, and symmetric zero padding before an ``F.conv2d`` becomes the convolution's own;
    ``module`` itself when nothing changes or it cannot be traced (torch.fx)."""
    try:
        gm = torch.fx.symbolic_trace(copy.deepcopy(module))
    except Exception:  # data-dependent control flow: keep the module as it is
        return module
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    folded = 0
    for node in list(gm.graph.nodes):
        bn = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or not bn.track_running_stats or len(node.args) != 1:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or len(src.users) != 1:
            continue
        conv = mods.get(src.target) if src.op == "call_module" else None
        if isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward and calls[src.target] == 1:
            w, b = _fold(conv.weight, conv.bias, bn)
            conv.weight, conv.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
        elif (args := _conv2d_args(src)) is not None:
            tensors = dict(gm.named_parameters(), **dict(gm.named_buffers()))
            if not all(
                a is None or (isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target in tensors)
                for a in args[1:3]
            ):
                continue
            w, b = _fold(tensors[args[1].target], None if args[2] is None else tensors[args[2].target], bn)
            wname, bname = f"_folded_{folded}_weight", f"_folded_{folded}_bias"
            gm.register_buffer(wname, w)
            gm.register_buffer(bname, b)
            with gm.graph.inserting_before(src):
                args[1], args[2] = gm.graph.get_attr(wname), gm.graph.get_attr(bname)
            src.args, src.kwargs = tuple(args), {}
        else:
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    folded += _merge_symmetric_padding(gm, mods)
    if not folded:
        return module
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


WEIGHTS_FILE_EXTS = (".pt", ".pth", ".bin", ".safetensors")


def is_weights_path(weights: str) -> bool:
    """Whether a ``weights`` string names a state-dict file (a path, a URL or a file name with a
    weights extension) rather than named weights (``default``, ``random``, a torchvision name)."""
    return "/" in weights or "://" in weights or weights.endswith(WEIGHTS_FILE_EXTS)


def read_state_dict(url: str) -> Mapping[str, torch.Tensor]:
    """Load a state dict from a path or fsspec URL, never unpickling arbitrary objects."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            payload = f.read()
    except FileNotFoundError as exc:
        raise WeightsUnavailable(f"weights file {url!r} not found") from exc
    try:
        if url.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(payload)
        else:
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for objects outside the safe set
        raise WeightsUnavailable(
            f"refusing to load {url!r}: it is not a plain tensor state dict (weights_only=True "
            f"loading failed: {str(exc).splitlines()[0]}). Save it with torch.save(model.state_dict(), path)."
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsUnavailable(f"weights file {url!r} does not hold a state dict")
    return state


def load_weights(
    model: nn.Module, weights: str, torchvision_weights: Any = None, default_name: str = "IMAGENET1K_V1"
) -> None:
    """Fill ``model`` per ``weights`` (see :func:`build_backbone`); errors say what to do.

    ``default_name``: the torchvision weight that ``"default"`` means."""
    if weights == "random":
        return
    if is_weights_path(weights):
        model.load_state_dict(read_state_dict(weights))
        return
    if torchvision_weights is None:
        raise WeightsUnavailable(f"no named weights {weights!r} for this model; pass a checkpoint path or 'random'")
    name = default_name if weights == "default" else weights
    try:
        enum = torchvision_weights[name]
    except KeyError:
        names = ", ".join(w.name for w in torchvision_weights)
        raise WeightsUnavailable(f"unknown weight name {name!r}; torchvision offers: {names}") from None
    try:
        state = enum.get_state_dict(progress=False)
    except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
        raise WeightsUnavailable(
            f"could not download torchvision weights {enum} ({type(exc).__name__}: {exc}). "
            "Without internet, pass a local path or fsspec URL to a state-dict checkpoint "
            "(weights=/path/to/vgg16.pth or s3://bucket/vgg16.pth), put the file in torch's cache "
            "(torch.hub.get_dir()/checkpoints), or use weights='random' for tests."
        ) from None
    model.load_state_dict(state)


def backbone_fingerprint(describe: Mapping[str, Any]) -> str:
    """Stable short hash of a backbone description (and whatever else is added to it)."""
    return hashlib.sha256(json.dumps(describe, sort_keys=True).encode()).hexdigest()[:16]
