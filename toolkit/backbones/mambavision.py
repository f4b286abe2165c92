"""MambaVision (NVlabs), written for the toolkit with the official state-dict layout.

Module and parameter names follow the official classification models key for key, so the official
``.pth.tar`` files load with no renaming. Layout: a two-conv stem (stride 4) -> two convolutional stages
(residual ConvBlocks) -> two hybrid stages whose blocks run on non-overlapping windows, the first half of each
stage MambaVisionMixer blocks and the second half self-attention blocks -> BatchNorm -> average pool.
Every stage but the last ends in a stride-2 conv downsample; stage taps return the tokens after a stage's blocks
and before its downsample (MambaVision-B stage 3 at 224 px: 14x14 = 196 tokens x 512).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_

from toolkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig, TokenLayout
from toolkit.registry import register_backbone
from toolkit_kernels import selective_scan_fn


@dataclass(frozen=True)
class MambaVisionConfig:
    img_size: int = 224
    dim: int = 80  # stage i has dim * 2**i channels
    in_dim: int = 32  # width of the stem's first conv
    depths: tuple[int, int, int, int] = (1, 3, 8, 4)
    num_heads: tuple[int, int] = (8, 16)  # attention heads of stages 3 and 4 (stages 1-2 are convolutional)
    window_size: tuple[int, int] = (14, 7)  # window side of stages 3 and 4
    mlp_ratio: float = 4.0
    d_state: int = 8
    d_conv: int = 3
    layer_scale: float | None = None  # init of the per-channel residual scales (gamma_1, gamma_2); None = none
    drop_path_rate: float = 0.2
    tap_stage: int = 2  # 0-based; 2 = "stage 3"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "letterbox"


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * H/ws * W/ws, ws*ws, C)``: windows in row-major order, tokens row-major inside."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // ws, ws, w // ws, ws)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: ``(B * nW, ws*ws, C)`` -> ``(B, C, H, W)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, h, w)


class ConvBlock(nn.Module):
    """Residual conv3x3-BN-GELU(tanh)-conv3x3-BN on ``(B, C, H, W)``."""

    def __init__(self, dim: int, drop_path: float):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x))))))


class MambaVisionMixer(nn.Module):
    """Token mixer on ``(B, L, C)``: in_proj splits the channels in two halves; one half goes through a depthwise
    conv and a selective scan (S6), the other through a depthwise conv only (no gating); the halves are
    concatenated and projected back. No causal padding: the conv is symmetric ('same'), as in the official model."""

    def __init__(self, d_model: int, d_state: int, d_conv: int):
        super().__init__()
        self.d_inner = d_model  # expand = 1
        half = self.d_inner // 2
        self.d_state, self.dt_rank = d_state, math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half)
        self.A_log = nn.Parameter(torch.empty(half, d_state))  # (D/2, N)
        self.D = nn.Parameter(torch.ones(half))  # (D/2,)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # The official constructor passes bias=True//2 (= 0): the convs have no bias.
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's initialisation: dt log-uniform in [dt_min, dt_max] through an inverse softplus; A = -(1..N)."""
        bias = self.dt_proj.bias
        dt = torch.exp(torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)

    def ssm_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scan inputs for ``x (B, L, C)`` in mamba-ssm layout: what the scan and the scan-path maps consume.

        Returns u (B, D/2, L), delta (B, D/2, L) before delta_bias and softplus, A (D/2, N), B and C (B, N, L),
        D (D/2,), delta_bias (D/2,), and z (B, D/2, L), the non-SSM branch (concatenated, not a gate).
        """
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, D/2, L) each
        u, z = F.silu(self.conv1d_x(u)), F.silu(self.conv1d_z(z))
        dt, b, c = torch.split(self.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The official model applies dt_proj with its bias and passes that bias again as delta_bias, so it counts
        # twice; the released weights were trained that way, so it is kept.
        delta = self.dt_proj(dt).transpose(1, 2)  # (B, D/2, L)
        return dict(u=u, delta=delta, A=-torch.exp(self.A_log.float()), B=b.transpose(1, 2).contiguous(),
                    C=c.transpose(1, 2).contiguous(), D=self.D.float(), delta_bias=self.dt_proj.bias.float(), z=z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.ssm_inputs(x)
        y = selective_scan_fn(s["u"], s["delta"], s["A"], s["B"], s["C"], s["D"], s["delta_bias"], delta_softplus=True)
        y = torch.cat([y.to(x.dtype), s["z"]], dim=1)  # (B, D, L)
        return self.out_proj(y.transpose(1, 2))


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, N, C)`` (one window per batch row); timm's attribute names and switch:
    ``fused_attn`` (default) runs SDPA, ``False`` the explicit ``softmax(q k^T * scale)`` path, whose probabilities
    pass through ``attn_drop`` (an identity, no parameters: the hook point attention maps read)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5  # SDPA's default
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, hd) each
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm residual block on windowed tokens ``(B*nW, ws*ws, C)``: mixer (Mamba or attention), then MLP."""

    def __init__(self, dim: int, cfg: MambaVisionConfig, num_heads: int, attention: bool, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = Attention(dim, num_heads) if attention else MambaVisionMixer(dim, cfg.d_state, cfg.d_conv)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        ls = cfg.layer_scale
        self.gamma_1 = nn.Parameter(torch.full((dim,), ls)) if ls is not None else 1.0
        self.gamma_2 = nn.Parameter(torch.full((dim,), ls)) if ls is not None else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.mixer(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class MambaVisionLayer(nn.Module):
    """One stage: ConvBlocks, or hybrid Blocks run on ``window_size`` windows (zero-padded to whole windows),
    then an optional stride-2 downsample (``(B, C, H, W)`` -> ``(B, 2C, H/2, W/2)``)."""

    def __init__(self, blocks: list[nn.Module], dim: int, window_size: int | None, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.window_size = window_size  # None for the convolutional stages
        reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))
        self.downsample = nn.Sequential(OrderedDict(reduction=reduction)) if downsample else nn.Identity()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``: the stage before its downsample (the tap)."""
        if self.window_size is None:
            for blk in self.blocks:
                x = blk(x)
            return x
        h, w, ws = x.shape[2], x.shape[3], self.window_size
        x = F.pad(x, (0, -w % ws, 0, -h % ws))  # right/bottom zeros; they take part in attention and scan as upstream
        hp, wp = x.shape[2], x.shape[3]
        x = window_partition(x, ws)  # (B*nW, ws*ws, C)
        for blk in self.blocks:
            x = blk(x)
        return window_reverse(x, ws, hp, wp)[:, :, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


class MambaVisionBackbone(Backbone):
    family = "mambavision"

    def __init__(self, cfg: MambaVisionConfig):
        super().__init__()
        self.cfg = cfg
        dims = [cfg.dim * 2 ** i for i in range(4)]
        n = sum(cfg.depths)
        dpr = [cfg.drop_path_rate * k / max(n - 1, 1) for k in range(n)]  # plain Python: builds on `meta` too
        self.patch_embed = nn.Sequential(OrderedDict(conv_down=nn.Sequential(
            nn.Conv2d(3, cfg.in_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(cfg.in_dim, eps=1e-4), nn.ReLU(),
            nn.Conv2d(cfg.in_dim, cfg.dim, 3, 2, 1, bias=False), nn.BatchNorm2d(cfg.dim, eps=1e-4), nn.ReLU(),
        )))
        self.levels = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            dp = dpr[sum(cfg.depths[:i]):sum(cfg.depths[:i + 1])]
            if i < 2:
                blocks, ws = [ConvBlock(dims[i], dp[j]) for j in range(depth)], None
            else:
                # Mixers first, attention in the second half (the middle block of an odd depth is a mixer).
                first_attn = (depth + 1) // 2
                blocks = [Block(dims[i], cfg, cfg.num_heads[i - 2], j >= first_attn, dp[j]) for j in range(depth)]
                ws = cfg.window_size[i - 2]
            self.levels.append(MambaVisionLayer(blocks, dims[i], ws, downsample=i < 3))
        self.norm = nn.BatchNorm2d(dims[-1])
        self.embed_dim, self.num_features = dims[cfg.tap_stage], dims[-1]
        self.data_config = DataConfig((cfg.img_size, cfg.img_size), cfg.mean, cfg.std, cfg.resize)
        self.apply(_init_weights)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        for i in range(self.cfg.tap_stage):
            x = self.levels[i](x)
        x = self.levels[self.cfg.tap_stage].forward_blocks(x)  # (B, C, h, w), before the stage's downsample
        return x.flatten(2).transpose(1, 2)  # (B, h*w, C)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        for level in self.levels:
            x = level(x)
        return self.norm(x).mean(dim=(2, 3))  # (B, C_last), what the official head sees

    def grid(self, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        return self._stage_grid(self.cfg.tap_stage, img_size)

    def _stage_grid(self, stage: int, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = img_size or self.data_config.img_size
        for _ in range(2 + stage):  # two stride-2 stem convs, then one stride-2 conv per stage
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def _mixers(self, kind: type) -> Iterator[tuple[str, nn.Module]]:
        for i in range(self.cfg.tap_stage + 1):  # only stages up to the tap run in forward_tokens
            for j, blk in enumerate(self.levels[i].blocks):
                if isinstance(getattr(blk, "mixer", None), kind):
                    yield f"levels.{i}.blocks.{j}.mixer", blk.mixer

    def scan_modules(self) -> Iterator[tuple[str, nn.Module]]:
        return self._mixers(MambaVisionMixer)

    def attention_modules(self) -> Iterator[tuple[str, nn.Module]]:
        return self._mixers(Attention)

    def attention_layouts(self, img_size: tuple[int, int] | None = None) -> dict[str, TokenLayout]:
        return self._window_layouts(self.attention_modules(), img_size)

    def scan_layouts(self, img_size: tuple[int, int] | None = None) -> dict[str, TokenLayout]:
        """Each mixer scans one window's tokens, row-major inside it (``window_partition``'s order)."""
        return self._window_layouts(self.scan_modules(), img_size)

    def _window_layouts(self, modules: Iterator[tuple[str, nn.Module]],
                        img_size: tuple[int, int] | None) -> dict[str, TokenLayout]:
        """Hybrid blocks run on ``window_size`` windows of their stage's grid, zero-padded right and bottom to
        whole windows (the padding tokens are -1 in the index); the index is ``window_partition`` of the token
        numbers, as ``MambaVisionLayer.forward_blocks`` partitions the features."""
        out = {}
        for name, _ in modules:
            i = int(name.split(".")[1])
            (h, w), ws = self._stage_grid(i, img_size), self.levels[i].window_size
            ids = F.pad(torch.arange(h * w).view(1, 1, h, w), (0, -w % ws, 0, -h % ws), value=-1)
            out[name] = TokenLayout((h, w), window_partition(ids, ws)[..., 0])
        return out

    def convert_state_dict(self, state_dict):
        # Files saved from a DistributedDataParallel model carry a "module." prefix; the official loader strips it.
        if all(k.startswith("module.") for k in state_dict):
            return {k[len("module."):]: v for k, v in state_dict.items()}, len(state_dict)
        return state_dict, 0

    def ignorable_checkpoint_keys(self) -> tuple[str, ...]:
        return ("head.",)


@torch.no_grad()
def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    if isinstance(m, MambaVisionMixer):  # after its dt_proj (apply visits children first)
        m.reset_ssm_parameters()


def _mambavision(cfg: MambaVisionConfig, **overrides) -> MambaVisionBackbone:
    return MambaVisionBackbone(replace(cfg, **overrides))


# Official ImageNet-1K configs (NVlabs/MambaVision, mambavision==1.2.0).
_T = MambaVisionConfig(dim=80, in_dim=32, depths=(1, 3, 8, 4), drop_path_rate=0.2)
_T2 = MambaVisionConfig(dim=80, in_dim=32, depths=(1, 3, 11, 4), drop_path_rate=0.2)
_S = MambaVisionConfig(dim=96, in_dim=64, depths=(3, 3, 7, 5), drop_path_rate=0.2)
_B = MambaVisionConfig(dim=128, in_dim=64, depths=(3, 3, 10, 5), drop_path_rate=0.3, layer_scale=1e-5)
_L = MambaVisionConfig(dim=196, in_dim=64, depths=(3, 3, 10, 5), num_heads=(16, 32), drop_path_rate=0.3,
                       layer_scale=1e-5)


@register_backbone
def mambavision_t_in1k_224_s3(**kw) -> MambaVisionBackbone:
    """MambaVision-T stage 3 at 224 px: 14x14 = 196 tokens x 320 channels."""
    return _mambavision(_T, **kw)


@register_backbone
def mambavision_t2_in1k_224_s3(**kw) -> MambaVisionBackbone:
    """MambaVision-T2 stage 3 at 224 px: 196 tokens x 320 channels."""
    return _mambavision(_T2, **kw)


@register_backbone
def mambavision_s_in1k_224_s3(**kw) -> MambaVisionBackbone:
    """MambaVision-S stage 3 at 224 px: 196 tokens x 384 channels."""
    return _mambavision(_S, **kw)


@register_backbone(tags=("paper",))
def mambavision_b_in1k_224_s3(**kw) -> MambaVisionBackbone:
    """MambaVision-B stage 3 at 224 px: 196 tokens x 512 channels (the study's MambaVision)."""
    return _mambavision(_B, **kw)


@register_backbone
def mambavision_l_in1k_224_s3(**kw) -> MambaVisionBackbone:
    """MambaVision-L stage 3 at 224 px: 196 tokens x 784 channels."""
    return _mambavision(_L, **kw)


@register_backbone(tags=("embedded",))
def mambavision_scene_128_s3(**kw) -> MambaVisionBackbone:
    """Embedded-world MambaVision: 128 px, stage 3 -> 8x8 = 64 tokens x 128 channels (one 8x8 window)."""
    cfg = MambaVisionConfig(img_size=128, dim=32, in_dim=16, depths=(1, 1, 2, 1), num_heads=(4, 8), window_size=(8, 4),
                            drop_path_rate=0.05, mean=(0.5,) * 3, std=(0.25,) * 3)
    return _mambavision(cfg, **kw)


@register_backbone(tags=("test",))
def mambavision_test(**kw) -> MambaVisionBackbone:
    """Tiny MambaVision for tests: 32 px, stage 3 -> 2x2 tokens x 32 channels; both hybrid stages hold a mixer
    and an attention block, with layer scale."""
    cfg = MambaVisionConfig(img_size=32, dim=8, in_dim=8, depths=(1, 1, 2, 2), num_heads=(2, 2), window_size=(2, 1),
                            d_state=4, layer_scale=0.5, drop_path_rate=0.0)
    return _mambavision(cfg, **kw)
