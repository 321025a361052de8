"""Vision transformers (timm's ``VisionTransformer``: ViT, DeiT, ...) as L-CAM backbones.

The attention mechanism reads the patch-token grid: N = h * w patch tokens of width C
reshaped to (C, h, w). Where the split sits depends on how the model pools:

* **class-token pooling** (``global_pool='token'``: ViT, DeiT). The logits read only the
  class token after the last block, so masking the last block's patch tokens could not
  change them. The split sits before the last block:

      features(x) = tokens after blocks[:-1]                 (B, P + h*w, C)
      head(F)     = head_fc(pool(norm(blocks[-1](tokens))))  pool = the class token

  and L-CAM-Fm's mask reaches the class token through block N's attention.

* **average pooling** (``global_pool='avg'``): the last block's (normed) patch tokens
  are averaged, so the split sits after all blocks: features = norm(blocks(...)) patch
  tokens, head = mean over patches + fc_norm + classifier.

How the P class/register tokens travel in F, a plain (B, C', h, w) tensor that a cache
stores and ``a_t * F`` masks: F = cat([patch grid (B, C, h, w), prefix tokens
(B, P*C, h, w)], dim=1), each prefix token broadcast over the grid (C' = (1 + P) * C).
``Backbone.patch_channels = C``: ``Backbone.mask_features`` (L-CAM-Fm) multiplies the
first C channels only, so the prefix tokens enter the last block unmasked; the head reads
them back as their mean over the grid (equal to the token). The attention mechanism sees
them as spatially constant channels: they add a per-image constant to each raw class map,
which the min-max normalisation of a CAM removes. With average pooling P is 0 and C' = C.

Grad-CAM & co. hook the last block inside ``features`` (``Backbone.target_layer``); its
output is tokens, and ``Backbone.reshape_transform`` (:class:`TokensToGrid`) drops the
prefix tokens and reshapes the rest to (B, C, h, w), the patch part of F.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BackboneSpecError


class TokensToGrid:
    """(B, P + h*w, C) tokens -> (B, C, h, w) patch grid; pytorch-grad-cam's ``reshape_transform``."""

    def __init__(self, num_prefix: int) -> None:
        self.num_prefix = num_prefix

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.num_prefix :]
        n = patches.shape[1]
        h = int(round(n**0.5))
        if h * h != n:
            raise ValueError(f"{n} patch tokens do not make a square grid")
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, h)


class ViTFeatures(nn.Module):
    """Patch embedding + position + blocks[:stop] -> F (see the module docstring)."""

    def __init__(self, model: nn.Module, stop: int, final_norm: bool) -> None:
        super().__init__()
        self.model, self.stop, self.final_norm = model, stop, final_norm
        self.num_prefix = model.num_prefix_tokens
        self.carry_prefix = stop < len(model.blocks)  # only class-token pooling needs them

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk in m.blocks[: self.stop]:
            x = blk(x)
        return m.norm(x) if self.final_norm else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        b, n, c = t.shape
        grid = TokensToGrid(self.num_prefix)(t)
        if not (self.carry_prefix and self.num_prefix):
            return grid
        prefix = t[:, : self.num_prefix].reshape(b, self.num_prefix * c, 1, 1).expand(-1, -1, *grid.shape[-2:])
        return torch.cat([grid, prefix], dim=1)


class ViTHead(nn.Module):
    """F -> logits: unpack the tokens, the remaining blocks, norm, pooling, classifier."""

    def __init__(self, model: nn.Module, start: int, channels: int) -> None:
        super().__init__()
        self.__dict__["model"] = model  # weights listed once, under features (as ForwardHead)
        self.start, self.channels = start, channels
        self.num_prefix = model.num_prefix_tokens

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        m, c, p = self.model, self.channels, self.num_prefix
        b = f.shape[0]
        patches = f[:, :c].flatten(2).transpose(1, 2)
        if self.start == len(m.blocks):  # average pooling over the patch tokens
            return m.head(m.head_drop(m.fc_norm(patches.mean(1))))
        prefix = f[:, c:].mean((2, 3)).reshape(b, p, c)
        x = torch.cat([prefix, patches], dim=1)
        for blk in m.blocks[self.start :]:
            x = blk(x)
        return m.forward_head(m.norm(x))


def split_timm_vit(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, TokensToGrid, int]:
    """(features, head, target layer, reshape transform, patch channels) of a timm ViT."""
    pool = getattr(model, "global_pool", None)
    if (
        getattr(model, "attn_pool", None) is not None
        or pool not in ("token", "avg")
        or getattr(model, "pool_include_prefix", False)
    ):
        raise BackboneSpecError(
            f"{type(model).__name__} pools with {pool!r}: only class-token ('token') and average ('avg') pooling "
            "are split automatically; return a lcam Backbone from a module.path:factory instead"
        )
    if pool == "token" and not getattr(model, "has_class_token", True):
        raise BackboneSpecError("a ViT with token pooling but no class token cannot be split")
    depth, c = len(model.blocks), model.embed_dim
    stop = depth - 1 if pool == "token" else depth
    if stop < 1:
        raise BackboneSpecError("a class-token ViT needs at least 2 blocks to split before the last one")
    features = ViTFeatures(model, stop, final_norm=pool == "avg")
    head = ViTHead(model, stop, c)
    layer = model.norm if pool == "avg" else model.blocks[stop - 1]  # whose output is F's patch part, as tokens
    return features, head, layer, TokensToGrid(model.num_prefix_tokens), c
