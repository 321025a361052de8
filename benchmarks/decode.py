"""Decoders on the CPU: decode + resize + centre crop per ImageNet-sized image, and how far each
moves the crops and the features from ``pil`` (pipeline/decoders.py; the numbers behind its ``auto``).

Each arm runs :meth:`pipeline.decoders.Decoder.pixels` (uint8 crops) over the sample's JPEG
bytes (read into memory first) in parts of 128 images, as the decode tasks do, with one torch
thread (a decode task's share of a core). With a CUDA GPU, a ``torchvision-cuda`` arm (nvJPEG
and the tensor resize on the device, as ``--decoder auto`` runs in a GPU actor) joins them. Arms alternate pil, pil-draft, torchvision, pil, ... (benchmarks/common.py's
harness), first on the whole sample, then on its images large enough for ``pil-draft`` to apply
(shorter side >= 2 x 256). Then, untimed: the crops' max/mean abs difference from ``pil``, and the
features' relative L2 difference and top-1 agreement with EfficientNet-Lite0 (pretrained).

    .venv/bin/python benchmarks/decode.py [--data DIR] [--limit N] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_DATA, compare, load_average, sample_images, target, target_ratio  # noqa: E402

ARMS = ("pil", "pil-draft", "torchvision")
PART = 128  # DECODE_PART_ROWS: images per decode task


def decode_all(decoder, datas: list[bytes], prep, floats: bool = False) -> list:
    """The uint8 crops the decode tasks ship (``floats``: as [0, 1] tensors, for comparisons)."""
    import torch

    torch.set_num_threads(1)  # every arm sets its own (benchmarks/common.py, thread settings)
    out = []
    for i in range(0, len(datas), PART):
        out += decoder.crops(datas[i : i + PART], prep) if floats else decoder.pixels(datas[i : i + PART], prep)
    return out


def arms() -> dict:
    """name -> Decoder: the CPU decoders, and nvJPEG when this machine has a CUDA GPU."""
    import torch

    from pipeline.decoders import Decoder

    out = {name: Decoder(name, "cpu") for name in ARMS}
    if torch.cuda.is_available():
        out["torchvision-cuda"] = Decoder("torchvision", "cuda")
    return out


def timings(title: str, datas: list[bytes], prep, reps: int):
    print(f"\n== {title}: {len(datas)} images, decode + resize + crop, seconds per pass", flush=True)
    decoders = arms()
    res = compare({name: (lambda d=d: decode_all(d, datas, prep) and None) for name, d in decoders.items()}, reps=reps)
    res.report(title)
    for name in decoders:
        per = [s / len(datas) * 1000 for s in res.seconds[name]]
        print(
            f"{name:12s} {statistics.median(per):.2f} ms/image (median of {len(per)}; {min(per):.2f}-{max(per):.2f})",
            flush=True,
        )
    return res


def differences(datas: list[bytes], prep, large: list[bool]) -> dict[str, dict[str, float]]:
    """Per decoder against pil: crops (max/mean abs, in grey levels) over all images and over the
    large ones; features (relative L2, top-1 agreement) over the large ones (the rest are equal)."""
    import torch

    from lcam import build_backbone
    from pipeline.decoders import Decoder

    torch.set_num_threads(2)
    ref = decode_all(Decoder("pil"), datas, prep, floats=True)
    model = build_backbone("efficientnet_lite0").folded()
    big = [i for i, b in enumerate(large) if b]

    def feats(crops: list) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([crops[i] for i in big])
        fs, ls = [], []
        with torch.inference_mode():
            for j in range(0, len(x), 16):
                f, logits = model.extract(x[j : j + 16])
                fs.append(f.float())
                ls.append(logits.argmax(1))
        return torch.cat(fs), torch.cat(ls)

    f_ref, top_ref = feats(ref)
    out = {}
    for name, decoder in list(arms().items())[1:]:
        got = decode_all(decoder, datas, prep, floats=True)
        d = torch.stack([(a - b).abs() for a, b in zip(got, ref)]) * 255
        moved = int((d.amax((1, 2, 3)) > 0).sum())
        f, top = feats(got)
        rel = (f - f_ref).flatten(1).norm(dim=1) / f_ref.flatten(1).norm(dim=1)
        out[name] = {
            "images_changed": moved,
            "max_all": float(d.max()),
            "mean_all": float(d.mean()),
            "max_large_mean": float(d[big].mean((1, 2, 3)).max()),
            "mean_large": float(d[big].mean()),
            "feat_rel_l2_median": float(rel.median()),
            "feat_rel_l2_max": float(rel.max()),
            "top1_agree": float((top == top_ref).float().mean()),
        }
        print(
            f"{name:12s} crops vs pil: {moved} of {len(datas)} images changed; max {out[name]['max_all']:.0f}/255, "
            f"mean {out[name]['mean_all']:.3f}/255 over all; over the {len(big)} large: mean {out[name]['mean_large']:.2f}/255 "
            f"(worst image {out[name]['max_large_mean']:.2f}/255); features rel. L2 median {out[name]['feat_rel_l2_median']:.4f} "
            f"max {out[name]['feat_rel_l2_max']:.4f}; top-1 agreement {out[name]['top1_agree']:.3f}",
            flush=True,
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import io

    from PIL import Image

    from lcam.backbones.base import Preprocessing
    from pipeline.decoders import torchvision_matches_pil

    prep = Preprocessing()  # 256 / 224 bilinear: EfficientNet-Lite0's and ResNet's
    paths = [p for p, _ in sample_images(args.data, args.limit)]
    datas = [Path(p).read_bytes() for p in paths]
    large = [min(Image.open(io.BytesIO(d)).size) >= 2 * prep.resize for d in datas]
    print(
        f"{len(datas)} images from {args.data}; {sum(large)} with shorter side >= {2 * prep.resize} (pil-draft applies)"
    )
    print(f"load average at start {load_average():.1f} (2-core machine)")

    whole = timings("whole sample", datas, prep, args.reps)
    big = timings("large images only", [d for d, b in zip(datas, large) if b], prep, args.reps)
    print("\n== differences from pil (untimed)", flush=True)
    diff = differences(datas, prep, large)

    # pil-draft changes only the large images, so its saving over the sample is theirs, diluted:
    # from the large-only medians (quiet: 0.3-0.7 s a pass) rather than from the whole-sample
    # passes, where the load's drift (seconds) is larger than the whole effect (~0.3 s a pass).
    share = sum(large) / len(datas)
    pil_ms = whole.median("pil") / len(datas)
    saved_ms = share * (big.median("pil") - big.median("pil-draft")) / sum(large)
    measured = whole.ratio("pil-draft", "pil")
    print(
        f"\ndraft speed-up over the whole sample as measured (load-dominated, not a target): median "
        f"{measured.median:.2f} ({', '.join(f'{v:.2f}' for v in measured.values)}); from the large images' "
        f"saving x their share ({share:.3f}): {pil_ms / (pil_ms - saved_ms):.3f}",
        flush=True,
    )
    print(
        "auto on a CPU: pil-draft would need >= 1.10x over the sample AND features within rel. L2 0.05; "
        "torchvision (CPU) gives pil's crops, so only its speed matters (pipeline/decoders.py CPU_AUTO)\n"
    )
    target("draft_decode_speedup_sample", pil_ms / (pil_ms - saved_ms), ">=", 1.10, "{:.3f}")
    target_ratio("draft_decode_speedup_large", big.ratio("pil-draft", "pil"), ">=", 1.3)
    target_ratio("torchvision_cpu_speed_vs_pil", whole.ratio("torchvision", "pil"), ">=", 1.10)
    target("torchvision_cpu_max_pixel_diff", diff["torchvision"]["max_all"], "<=", 0, "{:.0f}")
    target("torchvision_cpu_exact_self_check", float(torchvision_matches_pil()), ">=", 1, "{:.0f}")
    target("draft_feature_rel_l2_max", diff["pil-draft"]["feat_rel_l2_max"], "<=", 0.05, "{:.4f}")
    target("draft_top1_agreement_large", diff["pil-draft"]["top1_agree"], ">=", 0.99, "{:.3f}")
    if "torchvision-cuda" in whole.seconds:  # moving decode to the GPU must at least halve its cost
        target_ratio("nvjpeg_speed_vs_pil", whole.ratio("torchvision-cuda", "pil"), ">=", 2.0)
        target("nvjpeg_feature_rel_l2_max", diff["torchvision-cuda"]["feat_rel_l2_max"], "<=", 0.01, "{:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
