"""Plain ViT (timm). Tokens come from the second-to-last block, as LLaVA/Prismatic take them."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import timm
import torch
import torch.nn as nn

from toolkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig
from toolkit.registry import register_backbone


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    tap: int = -2  # block index whose output is the visual tokens; -2 = second-to-last
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "letterbox"
    # "patch": one patch_size x patch_size convolution (ViT-S/16). "conv": log2(patch_size) 3x3 stride-2
    # convolutions with BatchNorm and ReLU, then a 1x1 projection (Xiao et al. 2021, "Early convolutions help
    # transformers see better"): the same tokens on the same grid, the stem the other families' have.
    stem: str = "patch"


def conv_stem(patch_size: int, dim: int) -> nn.Sequential:
    """``(B, 3, H, W)`` -> ``(B, dim, H / patch_size, W / patch_size)`` through stride-2 3x3 convolutions whose
    widths double up to ``dim`` (e.g. 16, 32, 64, 128 for patch 16 and width 128)."""
    n = patch_size.bit_length() - 1
    if 2 ** n != patch_size:
        raise ValueError(f"a convolutional stem needs a power-of-two patch size, not {patch_size}")
    widths = [3] + [max(8, dim >> (n - 1 - i)) for i in range(n)]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], dim, 1))


class ViTBackbone(Backbone):
    family = "vit"

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.model = timm.create_model(
            "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=cfg.img_size,
            patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio, dynamic_img_size=True,
        )
        if cfg.stem == "conv":
            self.model.patch_embed.proj = conv_stem(cfg.patch_size, cfg.embed_dim)
        elif cfg.stem != "patch":
            raise ValueError(f"unknown ViT stem `{cfg.stem}`; choose patch or conv")
        self.embed_dim = self.num_features = cfg.embed_dim
        self.tap_index = cfg.tap % cfg.depth
        self.data_config = DataConfig((cfg.img_size, cfg.img_size), cfg.mean, cfg.std, cfg.resize)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        (tokens,) = self.model.forward_intermediates(
            images, indices=[self.tap_index], norm=False, output_fmt="NLC", intermediates_only=True, stop_early=True
        )  # blocks past the tap are never run
        return tokens  # (B, h*w, C), prefix (CLS) token dropped

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, C) CLS token after the final norm

    def grid(self, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = img_size or self.data_config.img_size
        return h // self.cfg.patch_size, w // self.cfg.patch_size

    def attention_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for i, blk in enumerate(self.model.blocks[: self.tap_index + 1]):  # blocks past the tap never reach the tokens
            yield f"blocks.{i}.attn", blk.attn

    def convert_state_dict(self, state_dict):
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = checkpoint_filter_fn(state_dict, self.model)  # timm's own: resamples pos_embed, maps legacy names
        return {f"model.{k}": v for k, v in sd.items()}, 0

    def ignorable_checkpoint_keys(self) -> tuple[str, ...]:
        return ("model.head.", "model.fc_norm.")


def _vit(cfg: ViTConfig, **overrides) -> ViTBackbone:
    return ViTBackbone(replace(cfg, **overrides))


@register_backbone(tags=("paper",))
def vit_s_in1k_224(**kw) -> ViTBackbone:
    """ViT-S/16 at 224 px: 14x14 = 196 tokens (the study's ViT baseline)."""
    return _vit(ViTConfig(embed_dim=384, depth=12, num_heads=6), **kw)


@register_backbone
def vit_b_in1k_224(**kw) -> ViTBackbone:
    """ViT-B/16 at 224 px: 196 tokens."""
    return _vit(ViTConfig(embed_dim=768, depth=12, num_heads=12), **kw)


_SCENE = ViTConfig(img_size=128, embed_dim=128, depth=6, num_heads=4, mean=(0.5,) * 3, std=(0.25,) * 3, stem="conv")


@register_backbone(tags=("embedded",))
def vit_scene_128(**kw) -> ViTBackbone:
    """Embedded-world ViT: 128 px, convolutional stem to stride 16 -> 8x8 = 64 tokens x 128 channels, matched to
    vmamba-scene-128-s3. With ViT-S's 16x16 patchify stem instead (``vit-patch-scene-128``) the matched recipe
    leaves it at 0.55 top-1 where the other families reach 0.98-1.0 (benchmarks/RESULTS.md)."""
    return _vit(_SCENE, **kw)


@register_backbone
def vit_patch_scene_128(**kw) -> ViTBackbone:
    """``vit-scene-128`` with ViT-S's patchify stem (one 16x16 stride-16 convolution)."""
    return _vit(replace(_SCENE, stem="patch"), **kw)


@register_backbone(tags=("test",))
def vit_test(**kw) -> ViTBackbone:
    """Tiny ViT for tests: 32 px, patch 8 -> 4x4 tokens."""
    return _vit(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2), **kw)
