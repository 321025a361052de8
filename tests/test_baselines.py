"""CAM methods: the registry, shapes, signs, determinism, Grad-CAM against a hand-written one, RISE on a toy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lcam.backbones.base import Backbone, Preprocessing
from lcam.backbones.registry import build_backbone
from lcam.cam_methods.base import (
    CAMMethod,
    build_method,
    default_methods,
    method_classes,
    method_names,
    register,
    unregister,
)
from lcam.cam_methods.gradcam import GradCAM
from lcam.cam_methods.lcam_method import LCAMMethod
from lcam.cam_methods.random_map import RandomMap
from lcam.cam_methods.rise import RISE
from lcam.cam_methods.scorecam import ScoreCAM
from lcam.metrics.road import road_scores
from lcam.model import LCAM

# cheap settings for the costly methods on the toy backbone (8 channels, 64 x 64)
CHEAP = {"rise": {"num_masks": 24, "mask_batch": 8}, "scorecam": {"batch_size": 8}, "ablationcam": {"batch_size": 4}}
AT_FEATURES = {"gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam", "ablationcam"}


def toy_backbone(seed: int = 0, classes: int = 5) -> Backbone:
    """8 x 8 features at 64 x 64 input; a non-linear head, so dlogit/dF varies over space."""
    torch.manual_seed(seed)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()
    )
    head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, classes))
    return Backbone(
        "toy", features, head, (8, 8, 8), Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3), num_classes=classes
    )


class RegionScore(nn.Module):
    """Two classes with softmax exactly (m, 1 - m), m = mean of the image over a fixed region."""

    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, :, self.rows, self.cols].mean((1, 2, 3))
        return torch.stack([m.clamp_min(1e-12).log(), (1 - m).clamp_min(1e-12).log()], 1)


def library_scale(cam: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's scale_cam_image per map, (x - min) / (1e-7 + max(x - min))."""
    flat = cam.flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    return (flat / (1e-7 + flat.amax(1, keepdim=True))).view_as(cam)


def hand_gradcam(backbone: Backbone, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    feats = backbone.features(backbone.normalize(images)).detach().requires_grad_(True)
    logits = backbone.head(feats)
    (grads,) = torch.autograd.grad(logits[torch.arange(len(class_ids)), class_ids].sum(), feats)
    weights = grads.mean((2, 3))
    return torch.relu((weights[:, :, None, None] * feats).sum(1)).detach()


@pytest.mark.parametrize("name", method_names())
def test_method_shapes_and_signs(name):
    backbone = toy_backbone()
    method = build_method(name, backbone, **CHEAP.get(name, {}))
    images = torch.rand(2, 3, 64, 64)
    maps = method(images, torch.tensor([1, 3]))
    expected = (8, 8) if name in AT_FEATURES else {"random": (7, 7)}.get(name, (64, 64))
    assert maps.shape == (2, *expected) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    flat = maps.flatten(1)
    assert (flat.amax(1) > flat.amin(1)).all(), "a constant map"  # every method's map varies over the image
    assert method.name == name and isinstance(method, CAMMethod)
    assert not backbone.features._forward_hooks  # pytorch-grad-cam's hooks are released after each call
    assert not any(p.requires_grad for p in backbone.parameters())
    with pytest.raises(ValueError):
        method(images, [1])  # one class id per image


def test_gradcam_equals_hand_written_at_feature_resolution():
    for backbone, size in ((toy_backbone(), 64), (build_backbone("resnet18", weights="random"), 128)):
        torch.manual_seed(1)
        images = torch.rand(3, 3, size, size)
        with torch.no_grad():
            ids = backbone(images).argmax(1)
        hand = hand_gradcam(backbone, images, ids)
        assert (hand.flatten(1).amax(1) > hand.flatten(1).amin(1)).all()  # not a constant map
        with torch.no_grad():  # works under no_grad too: gradients are enabled inside
            ours = GradCAM(backbone)(images, ids)
        assert ours.shape == hand.shape
        # the library scales per layer, then again when aggregating layers
        assert torch.allclose(ours, library_scale(library_scale(hand)), atol=1e-5), backbone.name


def test_rise_and_random_are_deterministic_with_a_seed():
    backbone = toy_backbone()
    images = torch.rand(2, 3, 32, 32)
    a = RISE(backbone, num_masks=16, mask_batch=5, seed=3)
    first = a(images, [0, 1])
    assert torch.equal(first, a(images, [0, 1]))  # masks drawn once, reused
    assert torch.equal(first, RISE(backbone, num_masks=16, mask_batch=16, seed=3)(images, [0, 1]))
    assert not torch.equal(first, RISE(backbone, num_masks=16, seed=4)(images, [0, 1]))
    m = a.masks((32, 32))
    assert m.shape == (16, 32, 32) and m.min() >= 0 and m.max() <= 1
    assert torch.equal(m[5:9], a.masks((32, 32), 5, 9))

    r1, r2 = RandomMap(backbone, seed=7), RandomMap(backbone, seed=7)
    x = r1(images, [0, 1])
    assert torch.equal(x, r2(images, [0, 1]))
    assert not torch.equal(x, r1(images, [0, 1]))  # successive calls draw fresh maps


def test_rise_batched_across_images_equals_the_formula_image_by_image():
    """mask_batch spreads masks over the batch's images; the maps are the formula's, per image."""
    backbone = toy_backbone()
    images, ids = torch.rand(3, 3, 32, 32), torch.tensor([1, 0, 1])
    rise = RISE(backbone, num_masks=10, grid=4, mask_batch=7, seed=2)  # groups of 3 images x 2 masks
    batched = rise(images, ids)
    masks = rise.masks((32, 32)).double()
    for i in range(3):
        with torch.no_grad():
            p = backbone(images[i : i + 1] * masks[:, None].float()).softmax(1)[:, int(ids[i])].double()
        hand = (p[:, None, None] * masks).sum(0) / (10 * 0.5)
        assert torch.allclose(batched[i].double(), hand, atol=1e-6)
        assert torch.allclose(
            RISE(backbone, num_masks=10, grid=4, mask_batch=1, seed=2)(images[i : i + 1], ids[i : i + 1])[0],
            batched[i],
            atol=1e-6,
        )


def test_rise_peaks_in_the_region_the_model_scores():
    rows, cols = slice(8, 16), slice(16, 24)
    backbone = Backbone(
        "region",
        nn.Identity(),
        RegionScore(rows, cols),
        (3, 32, 32),
        Preprocessing(mean=(0.0,) * 3, std=(1.0,) * 3),
        num_classes=2,
    )
    images = torch.full((1, 3, 32, 32), 0.5)
    sal = RISE(backbone, num_masks=600, grid=4, mask_batch=200, seed=0)(images, [0])[0]
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[rows, cols] = True
    peak = divmod(int(sal.argmax()), 32)
    assert abs(peak[0] - 11.5) <= 2 and abs(peak[1] - 19.5) <= 2, peak  # the region's centre
    assert sal[inside].mean() > 1.15 * sal[~inside].mean()  # about 1.26 in expectation for this smooth-mask setup
    # E[P(x*M) M] / p: far from the region, mask and score are independent -> E[P] = 0.5 * E[mean M] = 0.25
    assert abs(float(sal[24:, :8].mean()) - 0.25) < 0.04


def test_scorecam_batch_size_does_not_change_the_maps():
    backbone = toy_backbone()
    images = torch.rand(2, 3, 64, 64)
    a = ScoreCAM(backbone, batch_size=3)(images, [0, 2])
    b = ScoreCAM(backbone, batch_size=8)(images, [0, 2])
    assert torch.allclose(a, b, atol=1e-5)


def test_lcam_method_returns_raw_class_maps():
    backbone = toy_backbone()
    lcam = LCAM(backbone)
    images = torch.rand(2, 3, 64, 64)
    maps = LCAMMethod(lcam)(images, [4, 1])
    with torch.no_grad():
        z = lcam.attention(backbone.features(backbone.normalize(images)))
    assert maps.shape == (2, 8, 8)
    assert torch.allclose(maps, z[torch.arange(2), torch.tensor([4, 1])], atol=1e-5)


def test_road_scores_shapes_and_seed():
    backbone = toy_backbone()
    images = torch.rand(2, 3, 32, 32)
    cams = torch.rand(2, 4, 4)
    a = road_scores(backbone, images, cams, [0, 3], percentiles=(20, 80))
    b = road_scores(backbone, images, cams, [0, 3], percentiles=(20, 80))
    assert a.morf.shape == a.lerf.shape == (2, 2) and a.clean.shape == (2,)
    assert torch.equal(a.morf, b.morf) and torch.equal(a.lerf, b.lerf)  # seeded imputation noise
    assert ((a.morf >= 0) & (a.morf <= 1)).all() and a.combined().shape == (2,)
    with torch.no_grad():
        clean = backbone(images).softmax(1)[torch.arange(2), torch.tensor([0, 3])]
    assert torch.allclose(a.clean, clean)


# ---------------------------------------------------------------------------- the registry


def test_registry_lists_every_method_once_with_metadata():
    classes = method_classes()
    assert {
        "gradcam",
        "gradcam++",
        "scorecam",
        "rise",
        "gaussian",
        "random",
        "xgradcam",
        "layercam",
        "eigencam",
        "hirescam",
        "ablationcam",
    } <= set(classes)
    assert default_methods() == (
        "gradcam",
        "gradcam++",
        "scorecam",
        "rise",
        "gaussian",
        "random",
    )  # today's defaults kept
    assert list(classes)[-2:] == ["gaussian", "random"]  # the sanity floors last in table order
    for name, cls in classes.items():
        assert cls.name == name and cls.label and cls.cost
    assert "lcam" not in classes  # L-CAM rows come from checkpoints


def test_registry_refuses_a_duplicate_name_and_a_taken_flag():
    from lcam.cam_methods.base import Option

    class Another(CAMMethod):
        name, label = "gradcam", "Another Grad-CAM"

    with pytest.raises(ValueError, match="already registered"):
        register(Another)
    assert method_classes()["gradcam"] is GradCAM

    class Clash(CAMMethod):
        name, label = "clash-test", "Clash"
        options = (Option("masks", int, 1, flag="rise-masks"),)

    with pytest.raises(ValueError, match="--rise-masks is already used"):
        register(Clash)
    assert "clash-test" not in method_names()


def test_a_method_is_one_class_and_the_evaluation_can_run_it():
    """Registering a class is all it takes: build_method and the option plumbing find it."""
    from lcam.cam_methods.base import Option

    @register
    class Constant(CAMMethod):
        name, label, cost = "constant-test", "Constant", "free"
        options = (Option("value", float, 1.0, "the value"),)

        def compute(self, images, class_ids):
            return torch.full((images.shape[0], 4, 4), self.value)

    try:
        m = build_method("constant-test", toy_backbone(), value=2.5)
        assert torch.equal(m(torch.rand(1, 3, 8, 8), [0]), torch.full((1, 4, 4), 2.5))
        with pytest.raises(TypeError, match="unknown option"):
            build_method("constant-test", toy_backbone(), nope=1)
    finally:
        unregister("constant-test")
    with pytest.raises(KeyError, match="unknown CAM method 'constant-test'"):
        build_method("constant-test", toy_backbone())


def test_new_library_methods_follow_their_definitions():
    """XGrad-CAM, LayerCAM and HiResCAM against their formulas written out; Eigen-CAM is class-agnostic."""
    backbone = toy_backbone()
    torch.manual_seed(2)
    images = torch.rand(2, 3, 64, 64)
    ids = torch.tensor([1, 3])
    feats = backbone.features(backbone.normalize(images)).detach().requires_grad_(True)
    logits = backbone.head(feats)
    (g,) = torch.autograd.grad(logits[torch.arange(2), ids].sum(), feats)
    f = feats.detach()
    xgrad_w = (g * f).sum((2, 3)) / (f.sum((2, 3)) + 1e-7)
    hand = {
        "xgradcam": torch.relu((xgrad_w[:, :, None, None] * f).sum(1)),
        "layercam": torch.relu((torch.relu(g) * f).sum(1)),
        "hirescam": torch.relu((g * f).sum(1)),
    }
    for name, expected in hand.items():
        ours = build_method(name, backbone)(images, ids)
        assert torch.allclose(ours, library_scale(library_scale(expected)), atol=1e-4), name
    eigen = build_method("eigencam", backbone)
    assert torch.allclose(eigen(images, ids), eigen(images, torch.tensor([0, 0])))  # the same map for any class


def test_ablationcam_restores_the_backbone_and_batches_agree():
    backbone = toy_backbone()
    images = torch.rand(2, 3, 64, 64)
    a = build_method("ablationcam", backbone, batch_size=3)(images, [0, 2])
    b = build_method("ablationcam", backbone, batch_size=8)(images, [0, 2])
    assert torch.allclose(a, b, atol=1e-5)
    assert isinstance(backbone.features, nn.Sequential)  # the ablation layer is gone again
    with torch.no_grad():
        assert torch.isfinite(backbone(images)).all()
