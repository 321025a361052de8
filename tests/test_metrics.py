"""AD/IC protocol (SPEC section 5): keep_top, masking, confidence scores, accumulation."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from lcam.backbones.base import Backbone, Preprocessing
from lcam.backbones.registry import build_backbone
from lcam.metrics.adic import (
    AD_FORMULA,
    IC_FORMULA,
    ADICAccumulator,
    average_drop,
    confidence_scores,
    increase_in_confidence,
    keep_mask,
    keep_top,
    kept_count,
    masked_images,
)
from tests.helpers import center_crop_tensor, skimage_photos


def toy_backbone(seed: int = 0, classes: int = 5) -> Backbone:
    torch.manual_seed(seed)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, classes))
    return Backbone(
        "toy", features, head, (8, 4, 4), Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3), num_classes=classes
    )


class CountingModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.rows = inner, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.inner(x)


# ---------------------------------------------------------------------------- keep_top


@pytest.mark.parametrize("size", [(5, 7), (16, 16), (224, 224)])
def test_keep_top_keeps_exactly_ceil_ratio_pixels(size):
    g = torch.Generator().manual_seed(0)
    cams = torch.rand(3, *size, generator=g) * 0.9 + 0.05  # continuous: no ties, no zeros
    n = size[0] * size[1]
    for ratio in (1.0, 0.5, 0.15, 0.01, 0.0):
        out = keep_top(cams, ratio)
        k = math.ceil(Fraction(str(ratio)) * n)
        assert ((out != 0).flatten(1).sum(1) == k).all(), (size, ratio)
        kept = out != 0
        assert torch.equal(out[kept], cams[kept])  # soft values, not binarised
        if 0 < k < n:  # every kept value >= every dropped value
            assert (
                cams.masked_fill(~kept, 2).flatten(1).amin(1) >= cams.masked_fill(kept, -1).flatten(1).amax(1)
            ).all()


def test_kept_count_ignores_float_error():
    assert 0.07 * 100 > 7  # the float error being guarded against
    assert kept_count(0.07, 100) == 7
    assert kept_count(0.55, 180) == 99
    assert kept_count(0.15, 224 * 224) == 7527  # ceil(7526.4)
    assert kept_count(0.5, 7) == 4
    with pytest.raises(ValueError):
        kept_count(1.5, 10)


def test_keep_top_ratio_one_is_identity():
    cams = torch.rand(2, 9, 11)
    assert torch.equal(keep_top(cams, 1.0), cams)


def test_keep_top_tie_rule_row_major_first():
    flat = torch.full((1, 4, 5), 0.5)  # all tied: the 10 smallest row-major indices stay
    out = keep_top(flat, 0.5)
    expected = torch.zeros(20)
    expected[:10] = 0.5
    assert torch.equal(out.flatten(), expected)

    cams = torch.tensor([[[0.2, 0.9, 0.2], [0.9, 0.2, 0.2]]])  # k = 3: both 0.9s, then the first 0.2 (index 0)
    assert torch.equal(keep_mask(cams, 0.5).flatten(), torch.tensor([True, True, False, True, False, False]))
    cams = torch.tensor([[[0.2, 0.2, 0.7], [0.2, 0.2, 0.2]]])  # k = 2: the 0.7, then index 0
    assert torch.equal(keep_top(cams, 2 / 6).flatten(), torch.tensor([0.2, 0, 0.7, 0, 0, 0]))


def test_keep_top_kept_zero_pixels_count_as_kept():
    cams = torch.zeros(1, 3, 3)
    cams[0, 2, 2], cams[0, 1, 0] = 0.8, 0.3
    mask = keep_mask(cams, 0.5)  # k = 5: the two non-zeros, then zeros at indices 0, 1, 2
    assert int(mask.sum()) == 5
    assert mask.flatten().nonzero().flatten().tolist() == [0, 1, 2, 3, 8]
    assert int((keep_top(cams, 0.5) != 0).sum()) == 2


# ---------------------------------------------------------------------------- AD / IC


def test_ad_ic_hand_computed():
    Y = torch.tensor([0.8, 0.5, 0.2, 0.4])
    O = torch.tensor([[0.4, 0.5, 0.3, 0.1], [0.8, 0.9, 0.1, 0.4]])
    # ratio 0: drops 0.5, 0, 0 (increase), 0.75 -> 100/4 * 1.25; increases only image 2 (equality is no increase)
    # ratio 1: drops 0, 0, 0.5, 0 -> 12.5; increases only image 1
    assert torch.allclose(average_drop(Y, O), torch.tensor([31.25, 12.5], dtype=torch.float64))
    assert torch.equal(increase_in_confidence(Y, O), torch.tensor([25.0, 25.0], dtype=torch.float64))
    assert float(increase_in_confidence(Y, Y)) == 0.0  # strict >
    assert float(average_drop(Y, Y)) == 0.0
    assert float(average_drop(Y, torch.zeros(4))) == 100.0


def test_accumulator_matches_one_batch_and_records_protocol():
    model = toy_backbone()
    g = torch.Generator().manual_seed(1)
    images, cams = torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 4, 4, generator=g)
    whole = confidence_scores(model, images, cams)
    acc = ADICAccumulator()
    for sl in (slice(0, 2), slice(2, 6)):
        acc.update(confidence_scores(model, images[sl], cams[sl]))
    res = acc.result()
    assert res.protocol.num_images == 6 and res.protocol.target == "predicted"
    assert np.allclose(res.average_drop, whole.average_drop().tolist(), atol=1e-4)
    assert np.allclose(res.increase_in_confidence, whole.increase_in_confidence().tolist())
    assert res.O.shape == (3, 6) and res.Y.shape == (6,) and res.per_image_drop().shape == (3, 6)
    d = res.to_dict()
    assert d["protocol"]["ad_formula"] == AD_FORMULA and d["protocol"]["ic_formula"] == IC_FORMULA
    assert set(d["per_ratio"]) == {"1", "0.5", "0.15"}
    assert "pixel space" in d["protocol"]["masking"] and "softmax" in d["protocol"]["score"]
    with pytest.raises(ValueError):
        acc.update(confidence_scores(model, images[:2], cams[:2], ratios=(1.0,)))


# ---------------------------------------------------------------------------- masking and scores


def test_masked_images_normalise_upsample_keep():
    images = torch.rand(2, 3, 16, 16)
    cams = torch.rand(2, 4, 4) * 5 + 3  # min-max normalisation makes scale and offset irrelevant
    out = masked_images(images, cams, ratios=(1.0, 0.25))
    assert out.shape == (2, 2, 3, 16, 16)
    assert torch.allclose(out, masked_images(images, (cams - 3) / 5, ratios=(1.0, 0.25)), atol=1e-6)
    black = (out[1] == 0).all(1).flatten(1).sum(1)
    assert (black == 16 * 16 - 64).all()  # 25% of 256 pixels kept (random images have no exact zeros)


def test_confidence_scores_single_forward_and_given_classes():
    model = CountingModel(toy_backbone())
    images, cams = torch.rand(3, 3, 32, 32), torch.rand(3, 4, 4)
    s = confidence_scores(model, images, cams)
    assert model.calls == 1 and model.rows == 4 * 3  # clean + 3 ratios together
    assert s.O.shape == (3, 3) and s.Y.shape == (3,)
    with torch.no_grad():
        probs = model.inner(images).softmax(1)
    assert torch.equal(s.class_ids, probs.argmax(1))
    assert torch.allclose(s.Y, probs.max(1).values, atol=1e-6)
    model.calls = 0
    given = confidence_scores(model, images, cams, class_ids=[4, 0, 2], batch_size=5)
    assert model.calls == 3 and given.protocol.target == "given"
    assert torch.allclose(given.Y, probs[torch.arange(3), torch.tensor([4, 0, 2])], atol=1e-6)


def test_oracle_all_ones_and_all_zero_maps():
    model = toy_backbone()
    images = torch.rand(3, 3, 32, 32)
    ones = confidence_scores(model, images, torch.ones(3, 32, 32), ratios=(1.0,), normalize=False)
    assert torch.equal(ones.O[0], ones.Y)
    assert float(ones.average_drop()[0]) == 0.0 and float(ones.increase_in_confidence()[0]) == 0.0

    zero = confidence_scores(model, images, torch.zeros(3, 4, 4))
    assert (masked_images(images, torch.zeros(3, 4, 4)) == 0).all()
    with torch.no_grad():
        black = model(torch.zeros(1, 3, 32, 32)).softmax(1)[0]
    assert torch.allclose(zero.O, black[zero.class_ids].expand(3, 3), atol=1e-6)
    # a constant map normalises to zeros (SPEC 4's guard), so it blacks the image out too
    const = confidence_scores(model, images, torch.full((3, 4, 4), 0.7))
    assert torch.allclose(const.O, zero.O, atol=1e-6)


# ---------------------------------------------------------------------------- cross-check with pytorch-grad-cam


def skimage_batch() -> torch.Tensor:
    """chelsea, coffee, astronaut, rocket: resize 256, centre crop 224, [0, 1]."""
    return torch.stack([center_crop_tensor(img) for img in skimage_photos().values()])


def test_ratio_one_agrees_with_pytorch_grad_cam():
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = build_backbone("efficientnet_lite0")
    images = skimage_batch()
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    centres = [(112, 112), (60, 150), (100, 90), (170, 60)]
    cams = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 50.0**2)) for cy, cx in centres])
    cams = (cams - cams.amin((1, 2), keepdim=True)) / (
        cams.amax((1, 2), keepdim=True) - cams.amin((1, 2), keepdim=True)
    )

    ours = confidence_scores(model, images, cams, ratios=(1.0,))
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in ours.class_ids]
    diff = CamMultImageConfidenceChange()(images, cams.numpy(), targets, model)  # O - Y
    with torch.no_grad():
        y_lib = model(images).softmax(1)[torch.arange(4), ours.class_ids].numpy()
    ad_lib = 100 / 4 * np.sum(np.maximum(0, -diff) / y_lib)
    ic_lib = 100 / 4 * np.sum(diff > 0)
    assert np.allclose(ours.O[0].numpy() - ours.Y.numpy(), diff, atol=1e-5)
    assert abs(float(ours.average_drop()[0]) - ad_lib) < 1e-3
    assert float(ours.increase_in_confidence()[0]) == ic_lib
    # a real classifier: cat (tiger cat), espresso, missile
    assert 281 <= int(ours.class_ids[0]) <= 285 and int(ours.class_ids[1]) == 967 and int(ours.class_ids[3]) == 657


# ---------------------------------------------------------------------------- insertion / deletion


class MeanScore(nn.Module):
    """Two classes with softmax exactly (m, 1 - m), m = the image's mean: P(class 0) is known by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return torch.stack([m.clamp_min(1e-12).log(), (1 - m).clamp_min(1e-12).log()], 1)


def test_insertion_deletion_auc_hand_computed():
    from lcam.metrics.insertion_deletion import area_under_curve, insertion_deletion

    # pixel values 0.8, 0.4 / 0.2, 0.6; the map ranks them 0.8 > 0.6 > 0.4 > 0.2
    image = torch.tensor([[0.8, 0.4], [0.2, 0.6]]).expand(1, 3, 2, 2).clone()
    cam = torch.tensor([[[4.0, 2.0], [1.0, 3.0]]])
    r = insertion_deletion(MeanScore(), image, cam, [0], steps=4, insertion_baseline="black", deletion_baseline="black")
    # deletion: the mean of what is left after removing 0, 1, 2, 3, 4 pixels: 2.0/4, 1.2/4, 0.6/4, 0.2/4, 0
    assert torch.allclose(r.deletion[:, 0], torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=1e-6)
    # insertion from black: 0, 0.8/4, 1.4/4, 1.8/4, 2.0/4
    assert torch.allclose(r.insertion[:, 0], torch.tensor([0.0, 0.2, 0.35, 0.45, 0.5]), atol=1e-6)
    # trapezoid on s/4: (0.25 + 0.3 + 0.15 + 0.05 + 0) / 4 and (0 + 0.2 + 0.35 + 0.45 + 0.25) / 4
    assert r.deletion_auc().item() == pytest.approx(0.1875, abs=1e-6)
    assert r.insertion_auc().item() == pytest.approx(0.3125, abs=1e-6)
    # 3 steps over 4 pixels: ceil(4/3) = 2, ceil(8/3) = 3, 4 pixels changed
    r3 = insertion_deletion(MeanScore(), image, cam, [0], steps=3, insertion_baseline="black")
    assert torch.allclose(r3.deletion[:, 0], torch.tensor([0.5, 0.15, 0.05, 0.0]), atol=1e-6)
    assert r3.deletion_auc().item() == pytest.approx((0.25 + 0.15 + 0.05 + 0.0) / 3, abs=1e-6)
    assert area_under_curve(torch.tensor([1.0, 1.0])).item() == 1.0
    assert r.protocol()["steps"] == 4 and "black" in r.protocol()["deletion_baseline"]


def test_insertion_starts_from_the_blurred_image():
    from lcam.metrics.insertion_deletion import blurred, insertion_deletion

    torch.manual_seed(0)
    image = torch.rand(2, 3, 16, 16)
    cam = torch.rand(2, 4, 4)
    r = insertion_deletion(MeanScore(), image, cam, [0, 0], steps=2)
    expected_start = MeanScore()(blurred(image)).softmax(1)[:, 0]
    assert torch.allclose(r.insertion[0], expected_start, atol=1e-6)
    assert torch.allclose(r.insertion[-1], image.mean((1, 2, 3)), atol=1e-6)  # every pixel back: the clean image
    # the blur keeps a constant image's interior and darkens its border (zero padding, as RISE)
    flat = blurred(torch.full((1, 3, 16, 16), 0.5))
    assert abs(flat[0, 0, 8, 8].item() - 0.5) < 1e-6  # the kernel sums to 1
    assert flat[0, 0, 0, 0] < 0.5
