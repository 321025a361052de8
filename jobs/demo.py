"""``lcam demo``: the whole pipeline on a small embedded default, ending in ``report.html``.

Default data: the photos scikit-image ships (no download), written as PNG files and
packed into WebDataset shards. ``--data PATH`` takes a user's image folder (class
sub-folders, or flat with a labels file) or a folder of shards instead. Then, on a
local Ray with EfficientNet-Lite0: extraction -> L-CAM-Fm from the cache and L-CAM-Img
from the images (short schedules) -> CAMs -> evaluation against Grad-CAM, Grad-CAM++
and Score-CAM -> an audit of the classifier over the images (``runs/demo/audit/audit.html``,
linked from the report) -> ``runs/demo/report.html``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# Photos inside scikit-image's wheel (no download); camera is grayscale on purpose.
DEMO_PHOTOS = (
    "chelsea",
    "coffee",
    "astronaut",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="image folder or shard folder (default: scikit-image's photos)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="stop L-CAM-Fm after this many steps (default: the recipe lcam train and lcam pipeline choose by data size)",
    )
    parser.add_argument("--img-steps", type=int, default=6, help="L-CAM-Img training steps (default 6)")
    parser.add_argument(
        "--scorecam-images",
        type=int,
        default=1,
        help="Score-CAM is ~1,280 forwards per image: evaluate it on this many (0: leave Score-CAM out, for quick checks)",
    )


def write_demo_photos(folder: Path) -> None:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in DEMO_PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).save(path)
    # No ImageNet labels for these photos: -1, and training targets the predicted class.
    (folder / "labels.tsv").write_text("file\tclass_index\n" + "".join(f"{n}.png\t-1\n" for n in DEMO_PHOTOS))


def _is_shard_folder(path: Path) -> bool:
    return (path / "index.json").exists() or any(path.glob("*.tar"))


def run(args: argparse.Namespace) -> int:
    from jobs import pipeline as pipeline_job
    from pipeline.errors import UserError
    from pipeline.shards.pack import pack_folder

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        images = out / "images"
        write_demo_photos(images)
        shards = out / "shards"
    else:
        images = Path(args.data)
        if not images.is_dir():
            raise UserError(f"--data {args.data}: not a folder; give an image folder or a folder of shards")
        shards = images if _is_shard_folder(images) else out / "shards"
    if shards != images and not (shards / "index.json").exists():
        pack_folder(images, str(shards), samples_per_shard=4, progress=False)

    parser = argparse.ArgumentParser()
    pipeline_job.add_arguments(parser)
    pargs = parser.parse_args(
        [
            "--train-shards",
            str(shards),
            "--workdir",
            str(out),
            "--method",
            "both",
            "--target",
            "predicted",
            # the training defaults of lcam train and lcam pipeline (the recipe by data size), step limits only
            *(["--max-steps", str(args.steps)] if args.steps is not None else []),
            "--img-max-steps",
            str(args.img_steps),
            "--img-augment",
            "center",
            "--overlays",
            "8",
            # Score-CAM dominates the demo's cost: on --scorecam-images photos, or left out with 0
            *(
                ["--eval-methods", "gradcam,gradcam++,scorecam", "--method-limit", f"scorecam={args.scorecam_images}"]
                if args.scorecam_images > 0
                else ["--eval-methods", "gradcam,gradcam++"]
            ),
            "--gallery-images",
            "8",
        ]
    )
    pipeline_job.run(pargs)
    report = (out / "report.html").resolve()
    print(f"\ndemo done in {time.perf_counter() - t0:.0f}s; open the report: {report}")
    print(f"the audit (errors explained, evidence per class): {(out / 'audit' / 'audit.html').resolve()}")
    return 0


if __name__ == "__main__":
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("demo", sys.argv[1:]))
