"""``lcam demo``: the method end to end on the photos scikit-image ships.

EfficientNet-Lite0 (real ImageNet weights, offline) -> feature maps of each photo and
its mirror -> a briefly trained L-CAM-Fm -> overlay PNGs of the predicted class.
"""

from __future__ import annotations

import argparse
import os
import time

# Photos that ship inside scikit-image (no download): camera is grayscale on purpose.
DEMO_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "retina")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--steps", type=int, default=300, help="L-CAM-Fm training steps (default 300)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05: few photos, few steps)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    from lcam import LCAM, LCAMLoss, build_backbone, default_recipe, make_optimizer
    from pipeline.classes import imagenet_classes
    from pipeline.images import preprocess
    from pipeline.render import overlay, png_bytes, tensor_to_uint8, with_caption

    torch.manual_seed(args.seed)
    start = time.time()
    backbone = build_backbone("efficientnet_lite0")
    photos = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in DEMO_PHOTOS}
    centre = torch.stack([preprocess(p, backbone.preprocessing) for p in photos.values()])
    mirror = torch.flip(centre, dims=[-1])
    with torch.no_grad():
        feats, logits = backbone.extract(torch.cat([centre, mirror]))
    targets = logits.argmax(1)
    print(f"features of {len(photos)} photos (and mirrors) in {time.time() - start:.1f}s")

    model = LCAM(backbone)
    recipe = default_recipe(backbone.name)
    optimizer = make_optimizer(model.attention, recipe.with_overrides(lr=args.lr))
    loss_fn = LCAMLoss()
    for step in range(1, args.steps + 1):
        masked_logits, maps = model.fm_forward(feats, targets)
        terms = loss_fn(masked_logits, targets, maps)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {terms.total.item():.3f}  (ce {terms.ce.item():.3f} area {terms.area.item():.3f} tv {terms.tv.item():.3f})")

    names = imagenet_classes()
    explanation = model.explain(centre, upsample=True)
    os.makedirs(args.out, exist_ok=True)
    for i, name in enumerate(photos):
        cls, prob = int(explanation.class_ids[i, 0]), float(explanation.probs[i, 0])
        picture = overlay(tensor_to_uint8(centre[i]), explanation.upsampled[i, 0].numpy())
        picture = with_caption(np.concatenate([tensor_to_uint8(centre[i]), picture], axis=1), f"{name}: {names[cls]} ({prob:.0%})")
        with open(os.path.join(args.out, f"{name}.png"), "wb") as f:
            f.write(png_bytes(picture))
    print(f"wrote {len(photos)} overlays to {os.path.abspath(args.out)} in {time.time() - start:.1f}s")
    return 0
