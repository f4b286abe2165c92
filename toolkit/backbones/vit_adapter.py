"""ViT-Adapter (Chen et al., ICLR 2023): a plain ViT plus a convolutional spatial prior exchanged through deformable
attention, written for the toolkit with the official segmentation backbone's state-dict layout (``ViTAdapter`` of
czczup/ViT-Adapter, ``segmentation/mmseg_custom``), so its mmseg files load with no renaming past ``backbone.``.

Pieces, with their official names:

* ``patch_embed.proj`` (16x16 conv), ``pos_embed`` ``(1, 1 + (224/16)^2, C)``: the DeiT pretraining table with its
  class-token slot, which the adapter never uses (it has no class token); the 14x14 part is resized bicubically to
  the token grid at every forward. ``blocks.{j}``: pre-norm ViT blocks (``norm1``, ``attn.qkv``, ``attn.proj``,
  ``norm2``, ``mlp.fc1``/``fc2``) with layer scale ``gamma1``/``gamma2`` (the official ViT's default, which the
  DeiT configs keep).
* ``spm``: the spatial prior module, a ResNet-style conv stem (``stem``, ``conv2..4``; BatchNorm where the release
  trains SyncBN, same keys) giving maps at strides 4/8/16/32, each projected to C by a 1x1 conv ``fc1..fc4``.
* ``level_embed`` ``(3, C)``, added to the stride 8/16/32 levels, which are then concatenated into one token list c.
* ``interactions.{i}``, one per ViT stage ``interaction_indexes[i]``: ``injector`` (ViT tokens attend to c through
  3-level deformable attention, scaled by ``gamma``), the stage's ViT blocks, ``extractor`` (c attends to the ViT
  tokens through 1-level deformable attention, then a conv FFN ``ffn.fc1``/``ffn.dwconv.dwconv``/``ffn.fc2`` after
  ``ffn_norm``); the last interaction runs two more extractors, ``extra_extractors.0``/``.1``.
* Output pyramid: c split back into its three maps, the stride-4 map = ``up`` (2x2 transposed conv) of the
  stride-8 map + ``spm.fc1`` of the stem; each level adds the ViT stage output resized to it, then ``norm1..norm4``.

Tap: the stride-16 level after ``norm3`` = ``norm3(c3 + x3)``, where x3 is the ViT output after the third
interaction and c3 has been through all four (so every block reaches it): (H/16)*(W/16) tokens, 32x32 = 1024 at
512 px. ``forward_pooled``: mean of the stride-32 level after ``norm4``. Inputs must be multiples of 32 px, as the
release's pipeline pads them: the three SPM levels must be exactly 2x, 1x and 0.5x the ViT grid.

Deformable attention is plain PyTorch (``F.grid_sample``, bilinear, zero padding, ``align_corners=False``), the
sampling of Deformable-DETR's PyTorch reference; the release's CUDA kernel computes the same bilinear sums.
Checkpoints: mmseg files ``{"meta": ..., "state_dict": {"backbone.*", "decode_head.*", "auxiliary_head.*"}}``;
``backbone.`` (and DDP's ``module.``) is stripped and the UperNet heads are dropped.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_, use_fused_attn

from toolkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig
from toolkit.registry import register_backbone

PATCH = 16  # the ViT's patch size is the SPM's stride-16 level: the architecture fixes it
Shapes = Sequence[tuple[int, int]]  # per level (H_l, W_l)


@dataclass(frozen=True)
class ViTAdapterConfig:
    img_size: int | tuple[int, int] = 512  # square side or (H, W); multiples of 32
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale: bool = True  # ViT blocks' gamma1/gamma2 (the official ViT's default)
    pretrain_size: int = 224  # pos_embed holds (pretrain_size // 16)^2 positions + the unused class slot
    conv_inplane: int = 64  # SPM width at stride 4 (x2 at 8, x4 at 16 and 32)
    n_points: int = 4  # sampling points per head and level
    deform_num_heads: int = 12
    deform_ratio: float = 0.5  # value_proj width = deform_ratio * embed_dim
    with_cffn: bool = True
    cffn_ratio: float = 0.25  # conv FFN hidden width = cffn_ratio * embed_dim
    init_values: float = 0.0  # injector gamma at initialisation
    interaction_indexes: tuple[tuple[int, int], ...] = ((0, 2), (3, 5), (6, 8), (9, 11))  # first, last block
    use_extra_extractor: bool = True  # two more extractors after the last interaction
    add_vit_feature: bool = True  # pyramid levels add the (resized) ViT stage outputs
    drop_path_rate: float = 0.3
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "shrink-and-pad"  # the release: shrink to fit (never enlarge), pad right/bottom to the square


# mmseg's UperNet around the backbone: decoder and auxiliary FCN head.
_MMSEG_HEADS = ("decode_head.", "auxiliary_head.")


# -- multi-scale deformable attention ------------------------------------------------------------------------------

def ms_deform_attn_sample(value: torch.Tensor, shapes: Shapes, locations: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable sampling: per query and head, a weighted sum of bilinear samples over levels and points.

    ``value (B, S, M, D)``: M heads of D channels at S = sum_l H_l * W_l positions, level by level, each row-major;
    ``shapes``: ``(H_l, W_l)`` per level; ``locations (B, Lq, M, L, P, 2)``: (x, y) per point, normalised so that 0
    and 1 are the outer edges of a level's map (a pixel centre sits at ``(j + 0.5) / W_l``); ``weights
    (B, Lq, M, L, P)``. Samples are bilinear with zeros outside the map. Returns ``(B, Lq, M * D)``.
    """
    b, _, m, d = value.shape
    _, lq, _, n_levels, p, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample's [-1, 1]; with align_corners=False -1/+1 are the outer edges
    sampled = []
    for lvl, (v, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        v = v.permute(0, 2, 3, 1).reshape(b * m, d, h, w)  # (B*M, D, H_l, W_l)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * m, lq, p, 2)  # (B*M, Lq, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M, D, Lq, P)
        sampled.append(s)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*M, D, Lq, L*P)
    attn = weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels * p)  # (B*M, 1, Lq, L*P)
    return (stacked * attn).sum(-1).view(b, m * d, lq).transpose(1, 2)  # (B, Lq, M*D)


class MSDeformAttn(nn.Module):
    """Deformable attention of queries over ``n_levels`` feature maps (Deformable-DETR), value width ``ratio * dim``.

    Each query predicts, per head, ``n_points`` offsets per level (in pixels of that level) around its reference
    point, and softmax weights over all ``n_levels * n_points`` samples.
    """

    def __init__(self, dim: int, n_levels: int, n_heads: int, n_points: int, ratio: float = 1.0):
        super().__init__()
        inner = int(dim * ratio)
        if inner % n_heads:
            raise ValueError(f"value width {inner} is not divisible by {n_heads} heads")
        self.n_levels, self.n_heads, self.n_points, self.head_dim = n_levels, n_heads, n_points, inner // n_heads
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, inner)
        self.output_proj = nn.Linear(inner, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable-DETR's initialisation: offsets start on a ring of directions, one per head, at radius 1..P."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        ring = torch.stack([angle.cos(), angle.sin()], -1)  # (M, 2)
        ring = ring / ring.abs().amax(-1, keepdim=True)
        radius = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = ring.view(self.n_heads, 1, 1, 2) * radius  # (M, 1, P, 2)
        self.sampling_offsets.bias.copy_(bias.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, feat: torch.Tensor,
                shapes: Shapes) -> torch.Tensor:
        """``query (B, Lq, C)``, ``reference_points (1 or B, Lq, 1 or L, 2)`` normalised (x, y), ``feat (B, S, C)``
        with S = sum of ``shapes``' H_l * W_l -> ``(B, Lq, C)``."""
        b, lq, _ = query.shape
        m, n_levels, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(feat).view(b, feat.shape[1], m, self.head_dim)  # (B, S, M, D)
        offsets = self.sampling_offsets(query).view(b, lq, m, n_levels, p, 2)  # pixels of each level, (x, y)
        weights = self.attention_weights(query).view(b, lq, m, n_levels * p).softmax(-1).view(b, lq, m, n_levels, p)
        size_xy = torch.tensor([(w, h) for h, w in shapes], dtype=query.dtype, device=query.device)  # (L, 2)
        locations = reference_points[:, :, None, :, None, :] + offsets / size_xy[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_sample(value, shapes, locations, weights))


def reference_points(shapes: Shapes, device=None) -> torch.Tensor:
    """Pixel centres of each level's grid, normalised (x, y), levels concatenated: ``(1, sum H_l*W_l, 1, 2)``."""
    pts = []
    for h, w in shapes:
        y, x = torch.meshgrid((torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
                              (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w, indexing="ij")
        pts.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
    return torch.cat(pts)[None, :, None]


# -- adapter modules -------------------------------------------------------------------------------------------------

class DWConv(nn.Module):
    """One 3x3 depthwise conv applied to each level of a token list laid out as ``shapes`` (levels concatenated)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        b, _, c = x.shape
        outs = []
        for t, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes):
            outs.append(self.dwconv(t.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2))
        return torch.cat(outs, dim=1)


class ConvFFN(nn.Module):
    """fc1 -> depthwise 3x3 per level -> GELU -> fc2 on ``(B, N, C)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), shapes)))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class Injector(nn.Module):
    """ViT tokens (queries) gather from the 3-level spatial prior: ``x + gamma * attn(norm(x), norm(c))``."""

    def __init__(self, dim: int, n_heads: int, n_points: int, ratio: float, init_values: float):
        super().__init__()
        self.query_norm = _layer_norm(dim)
        self.feat_norm = _layer_norm(dim)
        self.attn = MSDeformAttn(dim, 3, n_heads, n_points, ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor, ref: torch.Tensor, c: torch.Tensor, c_shapes: Shapes) -> torch.Tensor:
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), c_shapes)


class Extractor(nn.Module):
    """Spatial-prior tokens (queries) gather from the ViT grid, then a conv FFN: both residual."""

    def __init__(self, dim: int, n_heads: int, n_points: int, ratio: float, with_cffn: bool, cffn_ratio: float,
                 drop_path: float):
        super().__init__()
        self.query_norm = _layer_norm(dim)
        self.feat_norm = _layer_norm(dim)
        self.attn = MSDeformAttn(dim, 1, n_heads, n_points, ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = _layer_norm(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, c: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, x_shape: tuple[int, int],
                c_shapes: Shapes) -> torch.Tensor:
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), (x_shape,))
        if self.with_cffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), c_shapes))
        return c


class InteractionBlock(nn.Module):
    """inject (prior -> ViT), run this stage's ViT blocks, extract (ViT -> prior) [, two extra extractions]."""

    def __init__(self, cfg: ViTAdapterConfig, extra_extractor: bool):
        super().__init__()
        dim, heads, pts, ratio = cfg.embed_dim, cfg.deform_num_heads, cfg.n_points, cfg.deform_ratio
        self.injector = Injector(dim, heads, pts, ratio, cfg.init_values)
        self.extractor = Extractor(dim, heads, pts, ratio, cfg.with_cffn, cfg.cffn_ratio, cfg.drop_path_rate)
        self.extra_extractors = nn.Sequential(*[
            Extractor(dim, heads, pts, ratio, cfg.with_cffn, cfg.cffn_ratio, cfg.drop_path_rate) for _ in range(2)
        ]) if extra_extractor else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, blocks: nn.Module, x_shape: tuple[int, int],
                c_shapes: Shapes, x_ref: torch.Tensor, c_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, h*w, C)`` ViT tokens on ``x_shape``; ``c (B, sum H_l*W_l, C)`` prior tokens on ``c_shapes``;
        ``x_ref``/``c_ref`` their pixel centres (``reference_points``). Returns the updated ``(x, c)``."""
        x = self.injector(x, x_ref, c, c_shapes)
        x = blocks(x)
        c = self.extractor(c, c_ref, x, x_shape, c_shapes)
        for extractor in self.extra_extractors or ():
            c = extractor(c, c_ref, x, x_shape, c_shapes)
        return x, c


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Conv stem -> maps at strides 4, 8, 16, 32, each projected to ``dim`` channels by a 1x1 conv."""

    def __init__(self, inplanes: int, dim: int):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, dim, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, 3, H, W)`` -> (stride-4 stem map ``(B, inplanes, H/4, W/4)``, not yet projected by ``fc1``,
        [stride 8, 16, 32 maps ``(B, dim, H/s, W/s)``])."""
        s4 = self.stem(images)
        s8 = self.conv2(s4)
        s16 = self.conv3(s8)
        s32 = self.conv4(s16)
        return s4, [self.fc2(s8), self.fc3(s16), self.fc4(s32)]


# -- the ViT (official names: blocks.{j}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2/gamma1/gamma2) ----------------

class Attention(nn.Module):
    """Multi-head self-attention on ``(B, N, C)``; the non-fused path passes its ``(B, heads, N, N)``
    probabilities through ``attn_drop`` (a no-op dropout) so the analysis can hook them."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
            x = self.attn_drop(attn) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm ViT block with optional layer scale: ``x + gamma1 * attn(norm1(x))``, ``x + gamma2 * mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, layer_scale: bool):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale = layer_scale
        if layer_scale:
            self.gamma1 = nn.Parameter(torch.ones(dim))
            self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_scale:
            x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
            return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _init_adapter_weights(m: nn.Module) -> None:
    """The release's initialisation of the adapter parts (Linear: truncated normal; conv: He normal on fan-out)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# -- the backbone ---------------------------------------------------------------------------------------------------

class ViTAdapterBackbone(Backbone):
    family = "vit-adapter"

    def __init__(self, cfg: ViTAdapterConfig):
        super().__init__()
        self.cfg = cfg
        hw = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
        self.data_config = DataConfig(hw, cfg.mean, cfg.std, cfg.resize)
        self.embed_dim = self.num_features = dim = cfg.embed_dim
        idx = [i for pair in cfg.interaction_indexes for i in pair]
        if len(cfg.interaction_indexes) != 4 or idx != sorted(idx) or idx[0] != 0 or idx[-1] != cfg.depth - 1:
            raise ValueError(f"interaction_indexes {cfg.interaction_indexes} must be 4 stages covering blocks "
                             f"0..{cfg.depth - 1} in order (stage i feeds pyramid level i)")

        self.patch_embed = nn.Sequential(OrderedDict(proj=nn.Conv2d(3, dim, PATCH, PATCH)))
        n = cfg.pretrain_size // PATCH
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n * n, dim))  # (1, 1 + n*n, C), slot 0 (class) unused
        trunc_normal_(self.pos_embed, std=0.02)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # stochastic depth rule
        self.blocks = nn.Sequential(*[Block(dim, cfg.num_heads, cfg.mlp_ratio, dpr[j], cfg.layer_scale)
                                      for j in range(cfg.depth)])

        self.level_embed = nn.Parameter(torch.zeros(3, dim))  # added to the stride 8 / 16 / 32 prior levels
        self.spm = SpatialPriorModule(cfg.conv_inplane, dim)
        last = len(cfg.interaction_indexes) - 1
        self.interactions = nn.Sequential(*[InteractionBlock(cfg, cfg.use_extra_extractor and i == last)
                                            for i in range(len(cfg.interaction_indexes))])
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))  # SyncBN in release

        for part in (self.up, self.spm, self.interactions):
            part.apply(_init_adapter_weights)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    # -- forward pieces ---------------------------------------------------------------------------------------------
    def _pos(self, h: int, w: int) -> torch.Tensor:
        """Pretraining table, class slot dropped, resized bicubically to the ``(h, w)`` grid: ``(1, h*w, C)``."""
        n = self.cfg.pretrain_size // PATCH
        pos = self.pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, C, n, n)
        if (n, n) != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Stem map, prior maps after all interactions ``[(B, C, 2h, 2w), (B, C, h, w), (B, C, h/2, w/2)]`` and ViT
        outputs after each interaction ``[(B, C, h, w)] * len(interactions)``, for ``(B, 3, 16h, 16w)`` images."""
        H, W = images.shape[-2:]
        if H % 32 or W % 32:
            raise ValueError(f"ViT-Adapter needs an input whose sides are multiples of 32 px, got {H}x{W}")
        h, w = H // PATCH, W // PATCH
        c_shapes = ((2 * h, 2 * w), (h, w), (h // 2, w // 2))  # strides 8, 16, 32

        s4, prior = self.spm(images)
        c = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i] for i, p in enumerate(prior)], dim=1)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = x + self._pos(h, w)
        x_ref, c_ref = reference_points([(h, w)], images.device), reference_points(c_shapes, images.device)

        b, _, dim = x.shape
        vit_maps = []
        for (first, last), layer in zip(self.cfg.interaction_indexes, self.interactions):
            x, c = layer(x, c, self.blocks[first:last + 1], (h, w), c_shapes, x_ref, c_ref)
            vit_maps.append(x.transpose(1, 2).reshape(b, dim, h, w))
        prior_maps = [t.transpose(1, 2).reshape(b, dim, hh, ww)
                      for t, (hh, ww) in zip(c.split([hh * ww for hh, ww in c_shapes], dim=1), c_shapes)]
        return s4, prior_maps, vit_maps

    def forward_pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """What the UperNet head reads: ``[f1, f2, f3, f4]`` at strides 4, 8, 16, 32, each ``(B, C, H/s, W/s)``."""
        s4, (c2, c3, c4), xs = self._run(images)
        c1 = self.up(c2) + self.spm.fc1(s4)
        levels = [c1, c2, c3, c4]
        if self.cfg.add_vit_feature:
            scales = (4, 2, 1, 0.5)
            levels = [c + (x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                      for c, x, s in zip(levels, xs, scales)]
        return [norm(f) for norm, f in zip((self.norm1, self.norm2, self.norm3, self.norm4), levels)]

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The stride-16 level after ``norm3``: ``(B, h*w, C)``."""
        _, (_, c3, _), xs = self._run(images)
        f3 = self.norm3(c3 + xs[2] if self.cfg.add_vit_feature else c3)
        return f3.flatten(2).transpose(1, 2)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the stride-32 level after ``norm4`` ``(B, C)``: the adapter has no classification head."""
        _, (_, _, c4), xs = self._run(images)
        if self.cfg.add_vit_feature:
            c4 = c4 + F.interpolate(xs[3], scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.norm4(c4).mean(dim=(2, 3))

    def grid(self, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = img_size or self.data_config.img_size
        return h // PATCH, w // PATCH

    def attention_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for j, blk in enumerate(self.blocks):  # every block reaches the tap (through the last extractors)
            yield f"blocks.{j}.attn", blk.attn

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """mmseg names -> ours: strip ``backbone.`` (and DDP's ``module.``); returns the count renamed."""
        pairs = [(k, k.removeprefix("module.").removeprefix("backbone.")) for k in state_dict]
        return {new: state_dict[k] for k, new in pairs}, sum(k != new for k, new in pairs)

    def ignorable_checkpoint_keys(self) -> tuple[str, ...]:
        return _MMSEG_HEADS


def _vit_adapter(cfg: ViTAdapterConfig, **overrides) -> ViTAdapterBackbone:
    return ViTAdapterBackbone(replace(cfg, **overrides))


@register_backbone(tags=("paper",))
def vit_adapter_deit_b_ade20k_512(**kw) -> ViTAdapterBackbone:
    """ViT-Adapter-B (DeiT-B) from UperNet 160k on ADE20K, 512 px: stride-16 level, 32x32 = 1024 tokens x 768."""
    return _vit_adapter(ViTAdapterConfig(), **kw)


@register_backbone(tags=("test",))
def vit_adapter_test(**kw) -> ViTAdapterBackbone:
    """Tiny ViT-Adapter for tests: 64 px -> 4x4 tokens; 4 interactions of one block each, extra extractors on."""
    cfg = ViTAdapterConfig(img_size=64, embed_dim=32, depth=4, num_heads=2, pretrain_size=32, conv_inplane=8,
                           n_points=2, deform_num_heads=2, interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)),
                           drop_path_rate=0.0, init_values=0.5)
    return _vit_adapter(cfg, **kw)
