import pytest
import torch
import torchvision

from lcam import WeightsUnavailable, available_backbones, build_backbone
from lcam.backbones.base import Backbone
from lcam.backbones.registry import register_backbone
from tests.helpers import center_crop_tensor, skimage_photos

EXPECTED_SHAPES = {
    "vgg16": (512, 14, 14),
    "vgg16_7x7": (512, 7, 7),
    "resnet50": (2048, 7, 7),
    "resnet18": (512, 7, 7),
    "efficientnet_lite0": (1280, 7, 7),
}


def test_builtins_are_registered():
    assert set(EXPECTED_SHAPES) <= set(available_backbones())


@pytest.mark.parametrize(
    "name,builder", [("vgg16", "vgg16"), ("vgg16_7x7", "vgg16"), ("resnet50", "resnet50"), ("resnet18", "resnet18")]
)
def test_split_equals_unsplit_torchvision(name, builder, tmp_path):
    torch.manual_seed(0)
    full = getattr(torchvision.models, builder)(weights=None).eval()
    path = tmp_path / "w.pth"
    torch.save(full.state_dict(), path)
    b = build_backbone(name, weights=str(path))  # also exercises checkpoint loading
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        feats, logits = b.extract(x)
        ref = full(b.normalize(x))
    assert tuple(feats.shape) == (2, *EXPECTED_SHAPES[name]) == (2, *b.feature_shape)
    assert torch.allclose(logits, ref, atol=1e-5, rtol=0)
    assert torch.allclose(b.head(b.features(b.normalize(x))), ref, atol=1e-5, rtol=0)


def test_efficientnet_lite0_split_and_real_weights():
    b = build_backbone("efficientnet_lite0")
    photos = skimage_photos(("chelsea", "coffee"))
    x = torch.stack([center_crop_tensor(p) for p in photos.values()])
    with torch.no_grad():
        feats, logits = b.extract(x)
        unsplit = b.features.net(b.normalize(x))  # the package's own forward
    assert tuple(feats.shape) == (2, 1280, 7, 7)
    assert torch.allclose(logits, unsplit, atol=1e-5, rtol=0)
    pred = logits.argmax(1).tolist()
    assert 281 <= pred[0] <= 285, f"chelsea should be a cat class, got {pred[0]}"
    assert pred[1] == 967, f"coffee should be espresso (967), got {pred[1]}"
    assert b.preprocessing.mean == (0.5, 0.5, 0.5) and b.preprocessing.std == (0.5, 0.5, 0.5)


def test_backbone_is_frozen_and_stays_in_eval():
    b = build_backbone("resnet18", weights="random")
    assert not any(p.requires_grad for p in b.parameters())
    b.train()
    assert not b.training and not any(m.training for m in b.modules())
    wrapper = torch.nn.Sequential(b)
    wrapper.train()
    assert not any(m.training for m in b.modules())


class Arbitrary:  # any class outside torch's safe set must never be unpickled
    pass


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Arbitrary()}, path)
    with pytest.raises(WeightsUnavailable, match="weights_only"):
        build_backbone("resnet18", weights=str(path))


def test_missing_checkpoint_and_bad_weight_name_are_clear(tmp_path):
    with pytest.raises(WeightsUnavailable, match="not found"):
        build_backbone("resnet18", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsUnavailable, match="IMAGENET1K_V1"):
        build_backbone("resnet18", weights="IMAGENET9K_V9")
    with pytest.raises(ValueError, match="built-ins"):
        build_backbone("alexnet9")


def test_offline_download_gives_one_clear_message(tmp_path, monkeypatch):
    # No internet on CI: torchvision's download fails; the message must name the alternatives.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        b = build_backbone("resnet18", weights="IMAGENET1K_V1")
    except WeightsUnavailable as exc:
        assert "local path" in str(exc) and "random" in str(exc)
    else:  # a machine with internet downloads the real weights
        assert b.weights_name == "IMAGENET1K_V1"


def test_register_another_cnn():
    @register_backbone("tiny_test_cnn")
    def _tiny(weights):
        feats = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
        head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), torch.nn.Linear(8, 10))
        return Backbone("tiny_test_cnn", feats, head, (8, 8, 8), num_classes=10, weights=weights)

    b = build_backbone("tiny_test_cnn", weights="random")
    feats, logits = b.extract(torch.rand(3, 3, 32, 32))
    assert feats.shape == (3, 8, 8, 8) and logits.shape == (3, 10)
    assert len(b.weights_digest()) == 64


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "vgg16"])
def test_folded_backbone_computes_the_same_function(name):
    """BatchNorm folded into the convolutions (nn.Conv2d modules in ResNet, F.conv2d in
    EfficientNet-Lite's same-padding convs, whose symmetric pads become conv padding):
    equal in float64 to 1e-9 with non-trivial BN statistics, same identity, the
    original untouched."""
    b = build_backbone(name, "default" if name == "efficientnet_lite0" else "random").double()
    g = torch.Generator().manual_seed(1)
    bns = [m for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    f = b.folded()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in f.modules())
    pads = [m.padding for m in f.modules() if isinstance(m, torch.nn.ZeroPad2d)]  # symmetric ones merged into the convs
    assert all(p[0] != p[1] or p[2] != p[3] for p in pads) and (name != "efficientnet_lite0" or 0 < len(pads) < 17)
    assert f.describe() == b.describe()
    x = torch.rand(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        (fa, la), (fb, lb) = b.extract(x), f.extract(x)
    assert (fa - fb).abs().max() <= 1e-9 * fa.abs().max()
    assert (la - lb).abs().max() <= 1e-9 * la.abs().max()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in before.items())
    if not bns:  # nothing to fold: the very same modules
        assert f.features is b.features


def test_fold_leaves_shared_or_untraceable_modules_alone():
    from lcam.backbones.base import fold_for_inference

    class Shared(torch.nn.Module):  # one conv called twice: folding one BN would change the other call
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    class Dynamic(torch.nn.Sequential):  # data-dependent control flow: fx cannot trace it
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x

    shared = Shared().eval()
    dynamic = Dynamic(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)).eval()
    assert fold_for_inference(dynamic) is dynamic
    out = fold_for_inference(shared)
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(out(x), shared(x), atol=1e-6)


def test_one_rule_for_a_weights_path_and_safetensors_files_load(tmp_path):
    """Every builder decides "is this weights string a file" the same way, .safetensors included."""
    import torch
    from safetensors.torch import save_file

    from lcam.backbones.base import is_weights_path, load_weights

    assert [
        is_weights_path(w) for w in ("w.safetensors", "w.pt", "dir/w", "s3://b/w", "default", "random", "IMAGENET1K_V1")
    ] == [True, True, True, True, False, False, False]
    model = torch.nn.Linear(3, 2)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    load_weights(model, str(tmp_path / "w.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
