"""MaxViT (timm's TF-ported ``maxvit_*_tf`` models). Tokens come from a stage output (stage taps).

Each MaxViT block is MBConv -> block (window) attention -> grid attention; a stage halves the resolution in its
first block, so "stage 3" is timm's ``stages.2`` at stride 16 (MaxViT-T at 224 px: 14x14 = 196 tokens x 256).
Attention partitions are fixed at build time (window = img_size / 32), so inputs should have the configured size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn as nn
from timm.models.maxxvit import MaxxVit, grid_partition, model_cfgs, window_partition

from toolkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig, TokenLayout
from toolkit.registry import register_backbone


@dataclass(frozen=True)
class MaxViTConfig:
    img_size: int = 224
    embed_dim: tuple[int, ...] = (64, 128, 256, 512)  # channels per stage
    depths: tuple[int, ...] = (2, 2, 5, 2)
    stem_width: int = 64
    dim_head: int = 32
    tap_stage: int = 2  # 0-based; 2 = "stage 3"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "letterbox"


class MaxViTBackbone(Backbone):
    family = "maxvit"

    def __init__(self, cfg: MaxViTConfig):
        super().__init__()
        self.cfg = cfg
        base = model_cfgs["maxvit_tiny_tf"]  # TF conventions: 'same' padding, tanh-GELU, TF relative-position bias
        timm_cfg = replace(
            base, embed_dim=cfg.embed_dim, depths=cfg.depths, block_type=("M",) * len(cfg.depths),
            stem_width=cfg.stem_width, head_hidden_size=cfg.embed_dim[-1],
            transformer_cfg=replace(base.transformer_cfg, dim_head=cfg.dim_head),
        )
        self.model = MaxxVit(timm_cfg, img_size=cfg.img_size, num_classes=0)
        self.embed_dim, self.num_features = cfg.embed_dim[cfg.tap_stage], cfg.embed_dim[-1]
        self.data_config = DataConfig((cfg.img_size, cfg.img_size), cfg.mean, cfg.std, cfg.resize)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        # timm's intermediate index 0 is the stem, so stage i is index i + 1
        (x,) = self.model.forward_intermediates(
            images, indices=[self.cfg.tap_stage + 1], stop_early=True, intermediates_only=True
        )
        return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, C_last): avg pool -> norm -> pre-logits (fc + tanh), as the classifier sees it

    def grid(self, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        return self._stage_grid(self.cfg.tap_stage, img_size)

    def _stage_grid(self, stage: int, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = img_size or self.data_config.img_size
        for _ in range(stage + 2):  # stride-2 stem, then one stride 2 per stage ('same' padding: ceil)
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def attention_modules(self) -> Iterator[tuple[str, nn.Module]]:
        # Only stages up to the tap run in forward_tokens; each block has a window and a grid attention.
        for i in range(self.cfg.tap_stage + 1):
            for j, blk in enumerate(self.model.stages[i].blocks):
                yield f"stages.{i}.blocks.{j}.attn_block.attn", blk.attn_block.attn
                yield f"stages.{i}.blocks.{j}.attn_grid.attn", blk.attn_grid.attn

    def attention_layouts(self, img_size: tuple[int, int] | None = None) -> dict[str, TokenLayout]:
        """Block attention runs on non-overlapping p x p windows of its stage's grid, grid attention on the p x p
        groups of a dilated grid (tokens H/p apart); the index comes from timm's own ``window_partition`` /
        ``grid_partition`` applied to the stage grid's token numbers. Stages whose grid the partition does not
        divide (the model itself would refuse to run) are left out. The blocks of a stage share its grid and
        partitions, so each distinct layout is computed once and shared by the modules that use it."""
        out, made = {}, {}
        for i in range(self.cfg.tap_stage + 1):
            grid = self._stage_grid(i, img_size)
            for j, blk in enumerate(self.model.stages[i].blocks):
                for kind, part in (("attn_block", blk.attn_block), ("attn_grid", blk.attn_grid)):
                    if part is None:
                        continue
                    key = (grid, tuple(part.partition_size), part.partition_block)
                    if key not in made:
                        made[key] = _partition_layout(*key)
                    if made[key] is not None:
                        out[f"stages.{i}.blocks.{j}.{kind}.attn"] = made[key]
        return out

    def convert_state_dict(self, state_dict):
        from timm.models.maxxvit import checkpoint_filter_fn

        sd = checkpoint_filter_fn(state_dict, self.model)  # timm's own: resizes rel-pos tables, conv <-> linear shapes
        return {f"model.{k}": v for k, v in sd.items()}, 0

    def ignorable_checkpoint_keys(self) -> tuple[str, ...]:
        return ("model.head.fc.",)


def _partition_layout(grid: tuple[int, int], p: tuple[int, int], block: bool) -> TokenLayout | None:
    """The layout of block (``block``) or grid attention in ``p`` partitions of ``grid``; None where ``p`` does
    not divide it."""
    h, w = grid
    if h % p[0] or w % p[1]:
        return None
    ids = torch.arange(h * w).view(1, h, w, 1)  # channels-last, as the partition functions take it
    fn = window_partition if block else grid_partition
    return TokenLayout(grid, fn(ids, p).reshape(-1, p[0] * p[1]))


def _maxvit(cfg: MaxViTConfig, **overrides) -> MaxViTBackbone:
    return MaxViTBackbone(replace(cfg, **overrides))


@register_backbone(tags=("paper",))
def maxvit_t_in1k_224_s3(**kw) -> MaxViTBackbone:
    """MaxViT-T (timm ``maxvit_tiny_tf_224``) stage 3 at 224 px: 14x14 = 196 tokens x 256 channels."""
    return _maxvit(MaxViTConfig(), **kw)


@register_backbone(tags=("embedded",))
def maxvit_scene_128_s3(**kw) -> MaxViTBackbone:
    """Embedded-world MaxViT: 128 px, stage 3 -> 8x8 = 64 tokens x 128 channels, about as many parameters as
    vit-scene-128 and vmamba-scene-128-s3 (the last stage keeps 128 channels for that). The early stages are
    narrow (16, 32) because their MBConvs at 64x64 and 32x32 dominate a CPU step (benchmarks/RESULTS.md, "Measurements
    that were in docstrings")."""
    cfg = MaxViTConfig(img_size=128, embed_dim=(16, 32, 128, 128), depths=(1, 1, 1, 1), stem_width=16, dim_head=16,
                       mean=(0.5,) * 3, std=(0.25,) * 3)
    return _maxvit(cfg, **kw)


@register_backbone(tags=("test",))
def maxvit_test(**kw) -> MaxViTBackbone:
    """Tiny MaxViT for tests: 64 px (window 2), stage 3 -> 4x4 tokens x 32 channels."""
    cfg = MaxViTConfig(img_size=64, embed_dim=(8, 16, 32, 32), depths=(1, 1, 1, 1), stem_width=8, dim_head=8)
    return _maxvit(cfg, **kw)
