"""Backbone specs (timm:, torchvision:, module.path:factory), automatic splits with their
check, preprocessing from the weights' metadata, and vision transformers. Random weights
only: nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from lcam import LCAM, build_backbone, register_backbone
from lcam.backbones.base import BackboneSpecError, Preprocessing, WeightsUnavailable
from lcam.backbones.specs import parse_spec
from pipeline.images import preprocess


def same_weights_timm(backbone, name, **kwargs):
    """An independent, unsplit timm model holding the backbone's weights."""
    ref = timm.create_model(name, pretrained=False, **kwargs).eval()
    ref.load_state_dict(backbone.features.model.state_dict())
    return ref


def test_spec_grammar_canonical_form_and_errors():
    s = parse_spec("timm:resnet50.a1_in1k, size=96,layer=layer3")
    assert (s.source, s.name, s.layer, s.size) == ("timm", "resnet50.a1_in1k", "layer3", 96)
    assert s.canonical == "timm:resnet50.a1_in1k,layer=layer3,size=96"
    assert parse_spec("timm:resnet18", layer="layer2").canonical == "timm:resnet18,layer=layer2"
    assert parse_spec("mypkg.models:build").source == "module" and parse_spec("vgg16").source == "registry"
    assert parse_spec("torchvision:resnet101").canonical == "torchvision:resnet101"
    for bad, why in [
        ("timm:", "name the model"),
        ("timm:resnet18,depth=3", "option"),
        ("timm:resnet18,size=abc", "size"),
        ("my-pkg:build", "module.path:factory"),
        ("", "non-empty"),
    ]:
        with pytest.raises(BackboneSpecError, match=why):
            parse_spec(bad)


@pytest.mark.parametrize(
    "spec,why",
    [
        ("alexnet9", "unknown backbone 'alexnet9'.*timm:<model>"),
        ("timm:resnet_not_a_model", "timm has no model"),
        ("torchvision:resnet_not_a_model", "torchvision has no classification model"),
        ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
        ("tests.custom_backbones:not_callable", "no callable"),
        ("tests.custom_backbones:no_features", "no known split for NoFeatures.*--layer"),
        ("tests.custom_backbones:no_features,layer=body", "skip connection"),
        ("tests.custom_backbones:no_features,layer=nope", "has no layer 'nope'"),
        ("vgg16,layer=features", "built-in backbones take no options"),
    ],
)
def test_unknown_or_unsplittable_specs_raise_one_clear_error(spec, why):
    with pytest.raises(BackboneSpecError, match=why) as info:
        build_backbone(spec, weights="random")
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)  # old callers catch KeyError
    assert "\n" not in str(info.value) and not str(info.value).startswith("'")


def test_registering_an_existing_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("vgg16")(lambda weights: None)
    with pytest.raises(ValueError, match="':'"):
        register_backbone("mine:thing")


def test_timm_cnn_split_preprocessing_and_identity():
    b = build_backbone("timm:resnet18,size=64", weights="random")
    ref = same_weights_timm(b, "resnet18")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = b.extract(x)
        want = ref(b.normalize(x))
        want_feats = ref.forward_features(b.normalize(x))
    assert b.name == "timm:resnet18,size=64" and b.feature_shape == (512, 2, 2) and b.num_classes == 1000
    assert torch.equal(feats, want_feats)
    assert torch.allclose(logits, want, atol=1e-5, rtol=0)
    # timm's data config for resnet18: bicubic, crop_pct 0.95 -> resize floor(64 / 0.95) = 67, ImageNet mean/std
    cfg = timm.data.resolve_data_config({}, model=ref)
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bicubic", 0.95)
    assert b.preprocessing == Preprocessing(67, 64, tuple(cfg["mean"]), tuple(cfg["std"]), "bicubic")
    ident = b.describe()
    assert ident["backbone"] == "timm:resnet18,size=64" and ident["preprocessing"]["interpolation"] == "bicubic"
    # the same spec gives the same weights in any process (seeded build): same digest
    assert build_backbone("timm:resnet18,size=64", "random").weights_digest() == b.weights_digest()
    folded = b.folded()  # extraction's inference copy: BatchNorm folded, same function and identity
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.features.modules())
    with torch.no_grad():
        ff, fl = folded.extract(x)
    assert folded.describe() == ident and torch.allclose(ff, feats, atol=1e-4) and torch.allclose(fl, logits, atol=1e-4)


def test_layer_override_splits_there_and_state_dict_weights_load(tmp_path):
    b = build_backbone("timm:resnet18", weights="random", layer="layer3")
    assert b.name == "timm:resnet18,layer=layer3" and b.feature_shape == (256, 14, 14)
    ref = timm.create_model("resnet18", pretrained=False).eval()
    torch.nn.init.normal_(ref.fc.weight)  # differs from the seeded random build
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    b = build_backbone("timm:resnet18,layer=layer3,size=96", weights=str(path))
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(b(x), ref(b.normalize(x)), atol=1e-5, rtol=0)
        assert torch.allclose(
            b.extract(x)[0],
            ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.act1(ref.bn1(ref.conv1(b.normalize(x)))))))),
        )
    with pytest.raises(BackboneSpecError, match="skip connection"):  # inside a residual block
        build_backbone("timm:resnet18,layer=layer4.0.conv1,size=64", weights="random")


@pytest.mark.parametrize("builder,shape", [("mobilenet_v3_small", (576, 2, 2))])
def test_torchvision_builders_split_automatically(builder, shape):
    b = build_backbone(f"torchvision:{builder},size=64", weights="random")
    enum = torchvision.models.get_model_weights(builder)
    ref = torchvision.models.get_model(builder, weights=None).eval()
    ref.load_state_dict(b.features.state_dict() | b.head.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(b(x), ref(b.normalize(x)), atol=1e-5, rtol=0)
    assert b.feature_shape == shape
    t = enum.DEFAULT.transforms()  # the weights' own transform: resize 256 / crop 224, bilinear
    assert b.preprocessing.crop_pct == pytest.approx(t.crop_size[0] / t.resize_size[0], rel=0.02)
    assert b.preprocessing.mean == tuple(t.mean) and b.preprocessing.interpolation == t.interpolation.value
    full = build_backbone(f"torchvision:{builder}", weights="random").preprocessing
    assert (full.resize, full.crop) == (t.resize_size[0], t.crop_size[0])


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_vit_split_reproduces_the_model_and_exposes_the_token_grid(name):
    b = build_backbone(f"timm:{name}", weights="random")
    ref = same_weights_timm(b, name)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        feats, logits = b.extract(x)
        want = ref(b.normalize(x))
        tokens = ref.blocks[:-1](ref._pos_embed(ref.patch_embed(b.normalize(x))))  # after block N-1
    assert b.feature_shape == (2 * 192, 14, 14) and b.patch_channels == 192
    assert torch.allclose(logits, want, atol=1e-4, rtol=0)
    # F = patch tokens as a grid, then the class token broadcast over the grid
    assert torch.allclose(feats[:, :192], tokens[:, 1:].transpose(1, 2).reshape(2, 192, 14, 14), atol=1e-5)
    assert torch.allclose(feats[:, 192:], tokens[:, 0, :, None, None].expand(-1, -1, 14, 14), atol=1e-5)
    # Grad-CAM's hook: the last block in features, reshaped the same way
    assert b.target_layer is b.features.model.blocks[-2]
    assert b.folded().target_layer is b.target_layer  # nothing to fold in a ViT: the same hooked block
    assert torch.allclose(b.reshape_transform(tokens), feats[:, :192], atol=1e-5)


@pytest.fixture(scope="module")
def vit64():
    return build_backbone("timm:vit_tiny_patch16_224,size=64", weights="random")


def test_vit_masking_reaches_the_logits_through_the_class_token(vit64):
    b = vit64
    assert b.feature_shape == (384, 4, 4)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = b.extract(x)
        zeros, ones = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
        masked = b.mask_features(feats, zeros)
        assert torch.equal(masked[:, 192:], feats[:, 192:]) and not masked[:, :192].any()  # only patch tokens masked
        assert (b.head(masked) - logits).abs().max() > 1e-3  # a map of zeros changes the logits
        assert torch.allclose(b.head(b.mask_features(feats, ones)), logits, atol=1e-5)
        half = torch.ones(2, 1, 4, 4)
        half[..., 2:] = 0
        assert (b.head(b.mask_features(feats, half)) - logits).abs().max() > 1e-3
    # L-CAM-Fm's training forward goes through the same masking, and the loss reaches the attention
    model = LCAM(b)
    out, m = model.fm_forward(feats, torch.tensor([1, 2]))
    out.sum().backward()
    assert m.shape == (2, 1, 4, 4) and model.attention.conv.weight.grad.abs().sum() > 0


def test_gradcam_on_a_vit_hooks_the_token_grid(vit64):
    from lcam.cam_methods.base import build_method

    x, targets = torch.rand(2, 3, 64, 64), torch.tensor([3, 4])
    maps = build_method("gradcam", vit64).compute(x, targets)
    # by hand: ReLU(sum_c w_c G_c), w_c = mean over the grid of dlogit_t/dG_c, G = F's patch grid
    feats = vit64.features(vit64.normalize(x)).requires_grad_(True)
    vit64.head(feats).gather(1, targets[:, None]).sum().backward()
    grid, grad = feats[:, :192].detach(), feats.grad[:, :192]
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * grid).sum(1))
    want = scale(scale(cam))  # pytorch-grad-cam scales per layer, then again over layers
    assert maps.shape == (2, 4, 4) and maps.amax() > 0
    assert torch.allclose(maps, want, atol=1e-5)


def scale(cam):
    flat = cam.flatten(1) - cam.flatten(1).amin(1, keepdim=True)
    return (flat / (1e-7 + flat.amax(1, keepdim=True))).view_as(cam)


def test_avg_pooled_vit_splits_after_the_last_block():
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg", img_size=64).eval()
    from lcam.backbones.specs import BackboneSpec, split_timm, timm_preprocessing

    spec = BackboneSpec("timm", "vit_tiny_patch16_224", {"size": "64"})
    b = split_timm(spec, m, timm_preprocessing(m, 64), "random")
    assert b.feature_shape == (192, 4, 4) and b.patch_channels == 192 and b.target_layer is m.norm
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(b(x), m(b.normalize(x)), atol=1e-5)


def test_module_factory_specs(tmp_path):
    b = build_backbone("tests.custom_backbones:tiny,size=32", weights="random")
    assert b.name == "tests.custom_backbones:tiny,size=32" and b.feature_shape == (16, 8, 8) and b.num_classes == 10
    assert (b.preprocessing.resize, b.preprocessing.crop) == (36, 32)
    from tests.custom_backbones import TinyNet

    ref = TinyNet().eval()
    torch.nn.init.normal_(ref.classifier.weight)
    path = tmp_path / "tiny.pth"
    torch.save(ref.state_dict(), path)
    x = torch.rand(3, 3, 32, 32)
    for spec in (
        "tests.custom_backbones:tiny",
        "tests.custom_backbones:tiny_with_weights",
    ):  # lcam loads / the factory loads
        b = build_backbone(spec, weights=str(path))
        with torch.no_grad():
            assert torch.allclose(b(x), ref(b.normalize(x)), atol=1e-6)
    own = build_backbone("tests.custom_backbones:split_backbone", weights="random")
    assert own.name == "tests.custom_backbones:split_backbone" and own.preprocessing.crop == 32


def test_interpolation_is_applied_and_recorded():
    rgb = np.asarray(Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)))
    prep = Preprocessing.from_crop_pct(32, 0.875, interpolation="bicubic")
    assert (prep.resize, prep.crop) == (36, 32) and prep.crop_pct == pytest.approx(32 / 36)
    ours = preprocess(rgb, prep)
    tv = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(36, interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
            torchvision.transforms.CenterCrop(32),
            torchvision.transforms.ToTensor(),
        ]
    )
    assert torch.equal(ours, tv(Image.fromarray(rgb)))
    assert not torch.equal(ours, preprocess(rgb, Preprocessing(36, 32)))  # bilinear differs
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    old = {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3}  # identities written before interpolation
    assert Preprocessing.from_dict(old).interpolation == "bilinear"
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(interpolation="cubic-ish")


def test_timm_pretrained_without_internet_is_one_clear_message(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable, match="local path or fsspec URL.*random") as info:
        build_backbone("timm:resnet10t.c3_in1k,size=64", weights="default")
    assert "\n" not in str(info.value)
