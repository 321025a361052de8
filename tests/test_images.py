"""pipeline.images: decoding every PIL mode to RGB, and torchvision-exact preprocessing."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torchvision import transforms as T

from lcam.backbones.base import Preprocessing
from pipeline.images import DecodeError, decode_image, decode_pil, preprocess, random_crop_flip, resized_size

PREP = Preprocessing()
REFERENCE = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgb_jpeg_roundtrip_shape_and_values():
    arr = skdata.chelsea()
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out.dtype == np.uint8 and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)  # PNG is lossless


def test_grayscale_value_becomes_equal_rgb():
    g = np.tile(np.arange(0, 256, dtype=np.uint8), (8, 1))
    out = decode_image(encode(Image.fromarray(g, "L"), "PNG"))
    assert out.shape == (8, 256, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_sixteen_bit_png_scaled_not_clipped():
    values = np.array([[0, 257, 257 * 100, 32768, 65534, 65535]], dtype=np.uint16)
    raw = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(raw)).mode.startswith("I")
    out = decode_image(raw)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 100, 128, 255, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_rgba_alpha_is_dropped_not_composited():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[...] = (10, 200, 30, 0)  # fully transparent: compositing on black would give zeros
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out == (10, 200, 30)).all()
    la = Image.fromarray(np.full((3, 3, 2), (77, 0), np.uint8), "LA")
    assert (decode_image(encode(la, "PNG")) == 77).all()


def test_palette_and_bilevel():
    p = Image.new("P", (5, 5))
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    p.putpixel((1, 1), 1)
    p.putpixel((2, 2), 2)
    out = decode_image(encode(p, "PNG"))
    assert tuple(out[1, 1]) == (255, 0, 0) and tuple(out[2, 2]) == (0, 0, 255) and tuple(out[0, 0]) == (0, 0, 0)
    one = Image.new("1", (4, 4), 1)
    assert (decode_image(encode(one, "PNG")) == 255).all()


def test_cmyk_jpeg_to_rgb():
    cmyk = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red
    cmyk.paste((0, 0, 0, 0), (16, 0, 32, 16))  # white
    raw = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(raw)).mode == "CMYK"
    out = decode_image(raw).astype(int)
    assert np.abs(out[8, 4] - (255, 0, 0)).max() <= 3
    assert np.abs(out[8, 28] - (255, 255, 255)).max() <= 3


def test_webp_decodes():
    arr = skdata.astronaut()[::4, ::4]
    out = decode_image(encode(Image.fromarray(arr), "WEBP", lossless=True))
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "empty"),
        (b"\x00garbage that is not an image" * 10, "not a recognised"),
    ],
)
def test_decode_errors(raw, why):
    with pytest.raises(DecodeError) as info:
        decode_image(raw)
    assert why in info.value.reason


def test_truncated_jpeg_is_an_error():
    raw = encode(Image.fromarray(skdata.chelsea()), "JPEG", quality=90)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(raw[: len(raw) // 2])
    err = pickle.loads(pickle.dumps(DecodeError("x")))  # crosses Ray process boundaries
    assert err.reason == "x"


IMAGES = {
    "chelsea": skdata.chelsea(),  # 300x451 landscape
    "rocket": skdata.rocket(),  # 427x640
    "astronaut": skdata.astronaut(),  # square 512
    "coffee": skdata.coffee(),
    "small": skdata.coffee()[:80, :100],  # 100x80: upsampled
    "tall": skdata.astronaut()[:, 200:290],  # 90x512: long side truncation matters
    "exact256": skdata.astronaut()[:256, :300],  # shorter side already 256
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_preprocess_equals_torchvision(name):
    raw = encode(Image.fromarray(IMAGES[name]), "JPEG", quality=90)
    ref = REFERENCE(Image.open(io.BytesIO(raw)).convert("RGB"))
    out = preprocess(decode_image(raw), PREP)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert (out - ref).abs().max().item() <= 1 / 255 + 1e-6
    # the PIL route gives the same tensor as the array route
    assert torch.equal(preprocess(decode_pil(raw), PREP), out)
    assert torch.equal(preprocess(decode_image(raw), PREP, view="hflip"), out.flip(-1))


def test_preprocess_grayscale_matches_torchvision_loader():
    raw = encode(Image.fromarray(skdata.camera()), "PNG")
    ref = REFERENCE(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert (preprocess(decode_image(raw), PREP) - ref).abs().max().item() <= 1 / 255 + 1e-6


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10), np.uint8), PREP)
    with pytest.raises(ValueError):
        preprocess(np.zeros((300, 300, 3), np.uint8), PREP, view="left")


def test_random_crop_flip_is_a_crop_of_the_resized_image():
    rgb = skdata.chelsea()
    resized = T.ToTensor()(T.Resize(256)(Image.fromarray(rgb)))  # (3, 256, 383)
    rh, rw = resized.shape[1:]
    assert (rw, rh) == resized_size(rgb.shape[1], rgb.shape[0], 256)
    flips = set()
    for seed in range(12):
        out = random_crop_flip(rgb, PREP, torch.Generator().manual_seed(seed))
        assert out.shape == (3, 224, 224)
        g = torch.Generator().manual_seed(seed)  # replay the documented draws: top, left, flip
        top = int(torch.randint(0, rh - 224 + 1, (1,), generator=g))
        left = int(torch.randint(0, rw - 224 + 1, (1,), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5)
        expect = resized[:, top : top + 224, left : left + 224]
        assert torch.equal(out, expect.flip(-1) if flip else expect)
        flips.add(flip)
        assert torch.equal(out, random_crop_flip(rgb, PREP, torch.Generator().manual_seed(seed)))
    assert flips == {True, False}
