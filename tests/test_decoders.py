"""pipeline.decoders: each decoder against ``pil`` (crops and backbone features), the cache identity, fallbacks.

The JPEGs are skimage's photos (shipped with the package) enlarged to 1200x900 and more and
saved at quality 90: real structure (edges, texture, smooth areas) and large enough for
``pil-draft``'s DCT scaling (shorter side >= 2 x 256) to apply.

Tolerances, and why (measured on these four images, RESULTS.md "Decoders" for the ImageNet sample):

* ``torchvision`` on the CPU: exactly ``pil`` (0). Both run libjpeg-turbo's islow IDCT and
  fancy upsampling and the same PIL resize afterwards; any difference would mean a cache made
  with it must not share ``pil``'s identity, which is what :func:`torchvision_matches_pil` decides.
* the GPU path's tensor resize (run here on the CPU): max 1/255 (measured 1/255: the float
  resize rounds a few pixels the other way than PIL's fixed-point one), mean <= 0.05/255
  (measured <= 0.0015/255); features relative L2 <= 1e-3 (measured <= 4e-4).
* ``pil-draft`` on large JPEGs: mean <= 1.5/255 (measured 0.34-0.84/255) and max <= 40/255
  (measured 9-21/255 on these smooth enlargements; real photos' sharp edges reach 134/255):
  the DCT-domain 1/2 scale is a box filter over 2x2 blocks, then a second resize, not one
  bilinear resize from full size. Features relative L2 <= 0.05 (measured 0.009-0.022), so
  ``pil-draft`` changes the features: the identity records it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from lcam import build_backbone
from lcam.backbones.base import Preprocessing
from pipeline.configs import CamsConfig, ExtractConfig, TrainConfig
from pipeline.decoders import (
    CPU_AUTO,
    DECODERS,
    Decoder,
    resolve_decoder,
    tensor_resize_crop,
    torchvision_matches_pil,
)
from pipeline.errors import UserError
from pipeline.extract.run import cache_identity
from pipeline.images import DecodeError, decode_pil, preprocess
from pipeline.options import validate
from pipeline.store.identity import fingerprint_of

PREP = Preprocessing()


def jpeg(arr: np.ndarray, size: tuple[int, int] | None = None, **kw) -> bytes:
    im = Image.fromarray(arr)
    if size is not None:
        im = im.resize(size, Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def large() -> list[bytes]:
    return [
        jpeg(skdata.astronaut(), (1200, 900)),
        jpeg(skdata.coffee(), (900, 1200)),  # portrait
        jpeg(skdata.chelsea(), (1600, 1100), subsampling=0),  # 4:4:4
        jpeg(skdata.rocket(), (2100, 1400), progressive=True),  # 1/4 scale applies
    ]


@pytest.fixture(scope="module")
def reference(large: list[bytes]) -> torch.Tensor:
    """torchvision's own transforms on PIL's RGB image (independent of pipeline.images' crop)."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(PREP.resize), T.CenterCrop(PREP.crop), T.ToTensor()])
    return torch.stack([tf(decode_pil(d)) for d in large])


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("resnet18", "random")


def features(backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return backbone.extract(x)[0].float()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def test_pil_is_todays_path(large, reference):
    assert torch.equal(torch.stack(Decoder("pil").crops(large, PREP)), reference)


DECODE_TASK = """
import pickle, sys
import numpy as np
# what fresh Ray decode workers run: extraction / CAMs from shards, evaluation, L-CAM-Img training
from pipeline.evaluation.plan import decode_to_uint8
from pipeline.shard_tasks import decode_part
from pipeline.train.img_data import decode_for_training
prep, decoder, rows = pickle.load(open(sys.argv[1], "rb"))
out = decode_part(rows, prep, ("center", "hflip"), decoder)
columns = {k: np.array([r[k] for r in rows], dtype=object) for k in ("key", "label", "image")}
train = decode_for_training({**columns, "error": np.array([""] * len(rows), dtype=object)}, prep, "center", decoder)
evaluation = np.stack([decode_to_uint8(r["image"], prep) for r in rows])
np.savez(sys.argv[2], extract=out["pixels"], train=train["pixels"], evaluation=evaluation)
print(sorted(m for m in ("torch", "torchvision", "lcam.backbones.base") if m in sys.modules))
"""


@pytest.mark.parametrize("name", ["pil", "pil-draft"])
def test_decode_task_ships_the_exact_crops_and_imports_no_torch(large, reference, name, tmp_path):
    """The pipeline's decode tasks, in a fresh process as a new Ray worker runs them: uint8 crops
    equal to the float path's (ToTensor is k / 255: lossless both ways) for both views, and no
    torch imported (it cost a new worker ~2 s of CPU and ~800 MB, on the model's cores)."""
    import pickle
    import subprocess
    import sys

    rows = [
        {"shard": "s", "index": i, "shard_count": 4, "key": str(i), "label": 0, "image": d, "shard_error": ""}
        for i, d in enumerate(large)
    ]
    (tmp_path / "in.pkl").write_bytes(pickle.dumps((PREP, Decoder(name), rows)))
    run = subprocess.run(
        [sys.executable, "-c", DECODE_TASK, str(tmp_path / "in.pkl"), str(tmp_path / "px.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip() == "[]", run.stdout
    got = {k: torch.from_numpy(v) for k, v in np.load(tmp_path / "px.npz").items()}
    floats = torch.stack(Decoder(name).crops(large, PREP))
    if name == "pil":
        assert torch.equal(floats, reference)
        assert torch.equal(got["evaluation"].float() / 255, reference)  # evaluation decodes with pil only
    assert torch.equal(got["extract"][:, 0].float() / 255, floats)
    assert torch.equal(got["extract"][:, 1].float() / 255, floats.flip(-1))
    assert torch.equal(got["train"].permute(0, 3, 1, 2).float() / 255, floats)  # (n, H, W, 3) there


def test_torchvision_cpu_equals_pil_exactly(large, reference):
    assert torchvision_matches_pil()
    got = torch.stack(Decoder("torchvision", "cpu").crops(large, PREP))
    assert torch.equal(got, reference)


def test_pil_draft_within_tolerance_and_features_close(large, reference, backbone):
    got = torch.stack(Decoder("pil-draft").crops(large, PREP))
    diff = (got - reference).abs()
    assert (diff.mean((1, 2, 3)) * 255 <= 1.5).all()
    assert (diff.amax((1, 2, 3)) * 255 <= 40).all()
    assert (diff.amax((1, 2, 3)) > 0).all()  # it did apply: large JPEGs move
    rel = rel_l2(features(backbone, got), features(backbone, reference))
    assert (rel <= 0.05).all() and (rel > 0).all()


def test_pil_draft_leaves_small_jpegs_alone():
    small = jpeg(skdata.astronaut(), (500, 375))  # shorter side < 2 x 256: no DCT scaling
    assert torch.equal(Decoder("pil-draft").crops([small], PREP)[0], preprocess(decode_pil(small), PREP))


def test_pil_draft_keeps_at_least_the_resize():
    im = decode_pil(jpeg(skdata.rocket(), (2100, 1400)), draft_to=256)
    assert min(im.size) >= 256 and im.size[0] < 2100  # scaled by 1/4: 525x350


def test_gpu_resize_path_within_tolerance(large, reference, backbone):
    from torchvision.io import decode_jpeg

    imgs = [decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8)) for d in large]
    got = torch.stack([tensor_resize_crop(t, PREP) for t in imgs])
    diff = (got - reference).abs()
    assert diff.max() * 255 <= 1 + 1e-4
    assert diff.mean() * 255 <= 0.05
    assert (rel_l2(features(backbone, got), features(backbone, reference)) <= 1e-3).all()


def test_png_through_torchvision_falls_back_to_pil_exactly():
    buf = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buf, "PNG")
    png = buf.getvalue()
    got = Decoder("torchvision", "cpu").crops([png], PREP)[0]
    assert torch.equal(got, preprocess(decode_pil(png), PREP))


def test_bad_images_are_per_image_errors(large):
    truncated = large[0][: len(large[0]) // 2]
    for name in ("pil", "pil-draft", "torchvision"):
        out = Decoder(name).crops([truncated, large[1], b""], PREP)
        assert isinstance(out[0], DecodeError) and "truncated" in out[0].reason
        assert isinstance(out[1], torch.Tensor)
        assert isinstance(out[2], DecodeError)


def test_identity_differs_iff_the_decoder_changes_the_features():
    class Backbone:
        def describe(self):
            return {"backbone": "resnet18", "weights_digest": "x", "preprocessing": {"resize": 256}}

    ident = {
        name: cache_identity(Backbone(), ("center",), "float16", resolve_decoder(name, "cpu"))
        for name in ("pil", "pil-draft", "torchvision", "auto")
    }
    today = cache_identity(Backbone(), ("center",), "float16")  # how caches were made before the choice
    assert fingerprint_of(ident["pil"]) == fingerprint_of(today)
    assert fingerprint_of(ident["torchvision"]) == fingerprint_of(today)  # bit-identical on the CPU
    assert fingerprint_of(ident["auto"]) == fingerprint_of(today)  # auto on a CPU = CPU_AUTO = pil
    assert fingerprint_of(ident["pil-draft"]) != fingerprint_of(today)
    assert ident["pil-draft"]["decoder"] == "pil-draft"
    gpu = cache_identity(Backbone(), ("center",), "float16", resolve_decoder("auto", "cuda"))
    assert gpu["decoder"] == "torchvision-cuda"


def test_resolve_decoder():
    assert CPU_AUTO == "pil"
    assert resolve_decoder("auto", "cpu") == Decoder("pil")
    assert resolve_decoder("auto", "cuda") == Decoder("torchvision", "cuda")
    assert resolve_decoder("torchvision", "cpu") == Decoder("torchvision", "cpu")
    assert resolve_decoder("pil-draft", "cuda") == Decoder("pil-draft")
    with pytest.raises(UserError, match="--decoder: 'nvjpeg' is not one of pil, pil-draft, torchvision, auto"):
        resolve_decoder("nvjpeg")


@pytest.mark.parametrize("config", [ExtractConfig, TrainConfig])
def test_option_declared_once_and_validated(config):
    args = {"shards": "s", "cache": "c"} if config is ExtractConfig else {}
    assert config(**args).decoder == "pil"
    assert set(DECODERS) == {"pil", "pil-draft", "torchvision", "auto"}
    with pytest.raises(UserError, match="--decoder: 'fast' is not one of"):
        validate(config(**args, decoder="fast"))


def test_cams_option_default():
    assert CamsConfig(checkpoint="c", out="o", cache="x").decoder == "pil"


def test_where_a_shard_stage_decodes():
    """--decode-on: the actor decodes (nvJPEG) when it has a GPU and the decoder can use one."""
    from pipeline.decoders import site_needs_gpus, stage_decoding

    assert stage_decoding("auto", "auto", 1.0) == (Decoder("torchvision", "cuda"), True)
    assert stage_decoding("torchvision", "auto", 1.0) == (Decoder("torchvision", "cuda"), True)
    assert stage_decoding("pil", "auto", 1.0) == (Decoder("pil"), False)  # PIL stays in the CPU tasks
    assert stage_decoding("auto", "auto", 0.0) == (Decoder(CPU_AUTO), False)
    assert stage_decoding("torchvision", "tasks", 1.0) == (Decoder("torchvision", "cpu"), False)
    assert stage_decoding("pil", "actor", 0.0) == (Decoder("pil"), True)
    assert stage_decoding("auto", "actor", 0.0) == (Decoder(CPU_AUTO), True)
    assert [site_needs_gpus(n, s) for n, s in [("auto", "auto"), ("pil", "auto"), ("auto", "tasks")]] == [
        True,
        False,
        False,
    ]
    with pytest.raises(UserError, match="--decode-on"):
        stage_decoding("pil", "gpu", 1.0)
    # a stage asks the cluster only when the answer depends on the actors' GPUs: no Ray start here
    from pipeline.raykit import shard_stage_decoding

    assert shard_stage_decoding("pil", "auto", None) == (Decoder("pil"), False, 0.0)
    assert shard_stage_decoding("auto", "tasks", 2) == (Decoder(CPU_AUTO), False, 0.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device is")
def test_nvjpeg_without_a_cuda_device_refuses_instead_of_falling_back(large):
    """A stage resolved to nvJPEG (actors with a GPU resource) whose process sees no CUDA device:
    an error naming the way out, never PIL's crops under the ``torchvision-cuda`` identity."""
    from pipeline.decoders import DecoderUnavailable

    for decode in (Decoder("torchvision", "cuda").pixels, Decoder("torchvision", "cuda").crops):
        with pytest.raises(DecoderUnavailable, match="--decode-on tasks"):
            decode(large[:1], PREP)
