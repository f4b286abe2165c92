"""ViTDet: a plain ViT with windowed attention in most blocks and global attention in a few (detectron2's ``ViT``).

Parameter names are detectron2's (``norm1``, ``attn.qkv``, ``attn.proj``, ``attn.rel_pos_h``/``rel_pos_w``, ``norm2``,
``mlp.fc1``/``fc2``); windowed attention pads the token grid to a multiple of the window (timm's SAM-ViT window
helpers), and the relative position bias is decomposed into height and width terms (timm's MViTv2-style helper).
The absolute position embedding keeps its 224 px pretraining shape (14x14 + a class-token slot, as the MAE
initialisation left it) and is resized bicubically to the token grid at every forward, as detectron2 does.
Tap: the last block's output, with no final norm (detectron2's ``last_feat``): 64x64 = 4096 tokens at 1024 px.

Checkpoints: detectron2 Mask R-CNN files hold the ViT under ``backbone.net.``; the simple feature pyramid
(``backbone.simfp_*``), the RPN and the ROI heads are dropped. ``model_final_*.pkl`` files (a pickle of numpy
arrays) are read by an unpickler that admits numpy arrays only; ``.pth``/``.safetensors`` go through the safe loader.
"""
from __future__ import annotations

import pickle
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, use_fused_attn
from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias, window_partition, window_unpartition

from toolkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig, LoadReport, TokenLayout
from toolkit.registry import register_backbone


@dataclass(frozen=True)
class ViTDetConfig:
    img_size: int | tuple[int, int] = 1024  # square side or (H, W); sizes the global blocks' rel-pos tables
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)  # every other block attends within windows
    pretrain_img_size: int = 224  # the absolute position embedding's grid: pretrain_img_size // patch_size
    drop_path_rate: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "shrink-and-pad"  # the release: shrink to fit (never enlarge), pad right/bottom to the square


# detectron2's Mask R-CNN around the ViT: pyramid, proposal generator, box/mask heads.
_DETECTRON2_HEADS = ("backbone.simfp_", "proposal_generator.", "roi_heads.")
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnly(pickle.Unpickler):
    """Unpickler that builds dicts and numpy arrays and refuses every other global (no code runs)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"`{module}.{name}` is not allowed in a weights file")


def read_detectron2_pkl(path: str | Path) -> dict[str, torch.Tensor]:
    """A detectron2 ``model_final_*.pkl`` (``{"model": {name: ndarray}, ...}``) -> ``{name: tensor}``."""
    with open(path, "rb") as f:
        obj = _ArraysOnly(f, encoding="latin1").load()
    weights = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{path} is not a detectron2 checkpoint (no `model` dict)")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items() if isinstance(v, np.ndarray)}


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a ``(B, H, W, C)`` grid with decomposed relative position bias.

    Attention probabilities are ``(B, heads, N, N)``; the non-fused path passes them through ``attn_drop`` (a no-op
    dropout) so the analysis can hook them, as it does for timm's attention.
    """

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]):
        super().__init__()
        self.num_heads, head_dim = num_heads, dim // num_heads
        self.scale = head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(0.0)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))  # (2H-1, hd)
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))  # (2W-1, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n, nh = h * w, self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, nh, -1).permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
        bias = get_decomposed_rel_pos_bias(q.reshape(b * nh, n, -1), self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        bias = bias.view(b, nh, n, n)  # from the unscaled q, as detectron2 computes it
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, heads, N, N)
            x = self.attn_drop(attn) @ v
        return self.proj(x.transpose(1, 2).reshape(b, h, w, c))


class ViTDetBlock(nn.Module):
    """Pre-norm block on ``(B, H, W, C)``; ``window_size`` > 0 attends within (padded) windows, 0 globally."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, window_size: int,
                 input_size: tuple[int, int]):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, num_heads, (window_size, window_size) if window_size else input_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        y = self.norm1(x)
        if self.window_size:
            y, pad_hw = window_partition(y, self.window_size)  # (B * windows, ws, ws, C)
            y = window_unpartition(self.attn(y), self.window_size, (h, w), pad_hw)
        else:
            y = self.attn(y)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTDetBackbone(Backbone):
    family = "vitdet"

    def __init__(self, cfg: ViTDetConfig):
        super().__init__()
        self.cfg = cfg
        hw = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
        self.data_config = DataConfig(hw, cfg.mean, cfg.std, cfg.resize)
        self.embed_dim = self.num_features = cfg.embed_dim
        self.patch_embed = nn.Sequential(OrderedDict(
            proj=nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size)))
        n = cfg.pretrain_img_size // cfg.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n * n, cfg.embed_dim))  # (1, 1 + n*n, C), slot 0 unused
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # meta-safe
        self.blocks = nn.ModuleList(
            ViTDetBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, dpr[i],
                        0 if i in cfg.global_blocks else cfg.window_size, self.grid())
            for i in range(cfg.depth)
        )

    def _abs_pos(self, h: int, w: int) -> torch.Tensor:
        """Pretraining position embedding resized to the ``(h, w)`` grid: ``(1, h, w, C)``."""
        n = self.cfg.pretrain_img_size // self.cfg.patch_size
        pos = self.pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, C, n, n)
        if (n, n) != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).permute(0, 2, 3, 1)  # (B, h, w, C)
        x = x + self._abs_pos(x.shape[1], x.shape[2])
        for blk in self.blocks:
            x = blk(x)
        return x.flatten(1, 2)  # (B, h*w, C)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the last block's tokens ``(B, C)``: ViTDet has no classification head."""
        return self.forward_tokens(images).mean(1)

    def grid(self, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = img_size or self.data_config.img_size
        return h // self.cfg.patch_size, w // self.cfg.patch_size

    def attention_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for i, blk in enumerate(self.blocks):
            yield f"blocks.{i}.attn", blk.attn

    def attention_layouts(self, img_size: tuple[int, int] | None = None) -> dict[str, TokenLayout]:
        """Windowed blocks attend within ``window_size`` windows of the token grid, padded right and bottom to whole
        windows (padding tokens are -1 in the index); global blocks are absent (they attend over the whole grid).
        The index is timm's ``window_partition`` of the token numbers, the call the blocks make on the features."""
        h, w = self.grid(img_size)
        ids = torch.arange(1, h * w + 1).view(1, h, w, 1)  # from 1: window_partition pads with 0, the -1 below
        out = {}
        for (name, _), blk in zip(self.attention_modules(), self.blocks):
            if blk.window_size:
                windows, _ = window_partition(ids, blk.window_size)  # (windows, ws, ws, 1)
                out[name] = TokenLayout((h, w), windows.flatten(1) - 1)
        return out

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """detectron2 names -> ours: strip ``backbone.net.`` (and DDP's ``module.``); returns the count renamed."""
        pairs = [(k, k.removeprefix("module.").removeprefix("backbone.net.")) for k in state_dict]
        return {new: state_dict[k] for k, new in pairs}, sum(k != new for k, new in pairs)

    def ignorable_checkpoint_keys(self) -> tuple[str, ...]:
        return _DETECTRON2_HEADS

    def load_official(self, path: str | Path, *, strict: bool = True) -> LoadReport:
        """As ``Backbone.load_official``, plus detectron2's ``.pkl`` files (read with numpy arrays only)."""
        path = Path(path)
        if path.suffix != ".pkl":
            return super().load_official(path, strict=strict)
        from toolkit.checkpoints import save_safetensors

        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / f"{path.stem}.safetensors"
            save_safetensors(read_detectron2_pkl(path), tmp)
            return replace(super().load_official(tmp, strict=strict), path=str(path))


def _vitdet(cfg: ViTDetConfig, **overrides) -> ViTDetBackbone:
    return ViTDetBackbone(replace(cfg, **overrides))


@register_backbone(tags=("paper",))
def vitdet_b_coco_1024(**kw) -> ViTDetBackbone:
    """ViTDet-B from Mask R-CNN (COCO) at 1024 px: last block, 64x64 = 4096 tokens x 768 channels."""
    return _vitdet(ViTDetConfig(), **kw)


@register_backbone(tags=("test",))
def vitdet_test(**kw) -> ViTDetBackbone:
    """Tiny ViTDet for tests: 32 px, patch 8 -> 4x4 tokens; window 3 (padded windows), block 2 global."""
    cfg = ViTDetConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=3,
                       global_blocks=(2,), pretrain_img_size=16, drop_path_rate=0.0)
    return _vitdet(cfg, **kw)
