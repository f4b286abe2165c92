"""VMamba, written for the toolkit with the official state-dict layout: v2 (forward_type v05_noz) and v0 ("vanilla").

Module and parameter names follow the official models key for key (the fixture ``official_vmamba_keys.json``
pins them), so official ``.pth`` files load with no renaming; older files' legacy names are renamed as the
official loader does, and mmdet/mmseg dense files load after stripping ``backbone.``.
SS2D: in_proj -> depthwise conv -> SiLU -> 4-direction selective scan (fused cross-scan/merge,
``toolkit_kernels.ss2d_scan_fn``) -> out_norm [-> * SiLU(z), v0] -> out_proj. Stage taps return the tokens after a
stage's blocks and before its downsample (VMamba-S stage 3 at 224 px: 14x14 = 196 tokens).

Tap norm, as the paper's release does it (it builds the official ``Backbone_VSSM(out_indices=(tap,))``, which
applies ``outnorm{tap}`` to the tapped stage): dense checkpoints carry trained ``outnorm{i}`` weights; classification
checkpoints do not, so their tap norm stays at its initialisation, i.e. a LayerNorm without affine parameters.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from toolkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig
from toolkit.registry import register_backbone
from toolkit_kernels import ss2d_scan_fn


@dataclass(frozen=True)
class VMambaConfig:
    img_size: int | tuple[int, int] = 224  # square side or (H, W)
    patch_size: int = 4
    depths: tuple[int, ...] = (2, 2, 9, 2)
    dims: int = 96  # stage i has dims * 2**i channels
    d_state: int = 1
    ssm_ratio: float = 1.0
    dt_rank: int | str = "auto"  # "auto" = ceil(d_model / 16)
    d_conv: int = 3
    conv_bias: bool = False
    gated: bool = False  # v0: in_proj also yields z and the scan output is gated by SiLU(z) (v2 "_noz" drops it)
    mlp_ratio: float = 4.0  # 0: no MLP branch (v0)
    stem: str = "v2"  # official ``patchembed_version``: "v2" two 3x3 stride-2 convs, "v1" one conv k=s=patch_size
    downsample: str = "v3"  # official ``downsample_version``: "v3" 3x3 stride-2 conv + LN, "v1" PatchMerging2D
    drop_path_rate: float = 0.1
    tap_stage: int = 2  # 0-based; 2 = "stage 3"
    tap_norm: bool = False  # LayerNorm (no affine) at the tap: the release's untrained ``outnorm{tap}``
    dense: bool = False  # mmdet/mmseg backbone layout: trained ``outnorm{i}`` per stage, no classifier
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "letterbox"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    """A pointwise linear map on ``(B, C, H, W)`` (weights stored as ``nn.Linear``'s ``(out, in)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class SS2D(nn.Module):
    """2-D selective scan over 4 directions (K=4), parameters merged over directions as in the official files."""

    K = 4

    def __init__(self, d_model: int, d_state: int, ssm_ratio: float, dt_rank: int | str, d_conv: int, conv_bias: bool,
                 gated: bool = False):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        r = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_inner, self.d_state, self.dt_rank, self.gated = d_inner, d_state, r, gated
        self.in_proj = Linear2d(d_model, d_inner * (2 if gated else 1), bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        k = self.K
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * d_state, d_inner))  # (K, R+2N, D)
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, r))  # (K, D, R)
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))  # (K, D)
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))  # (K*D, N)
        self.Ds = nn.Parameter(torch.ones(k * d_inner))  # (K*D,)
        self.out_norm = LayerNorm2d(d_inner)
        self.out_proj = Linear2d(d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's initialisation: dt log-uniform in [dt_min, dt_max] through an inverse softplus; A = -(1..N)."""
        nn.init.uniform_(self.x_proj_weight, -self.d_inner ** -0.5, self.d_inner ** -0.5)
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(a).expand(self.A_logs.shape[0], -1))
        self.Ds.fill_(1.0)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x (B, d_model, H, W)`` -> scan input u (B, D, H, W) and, when gated, SiLU(z) (B, D, H, W)."""
        xz = self.in_proj(x)
        xs, z = xz.chunk(2, dim=1) if self.gated else (xz, None)
        return self.act(self.conv2d(xs)), (self.act(z) if z is not None else None)

    def _scan_inputs(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        r, n = self.dt_rank, self.d_state
        x_dbl = torch.einsum("bdhw,kcd->bkchw", u, self.x_proj_weight)  # (B, K, R+2N, H, W)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        delta = torch.einsum("bkrhw,kdr->bkdhw", dts, self.dt_projs_weight)  # (B, K, D, H, W)
        return dict(u=u, delta=delta, A=-torch.exp(self.A_logs.float()), B=bs, C=cs, D=self.Ds.float(),
                    delta_bias=self.dt_projs_bias.reshape(-1).float())

    def ssm_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scan inputs in spatial layout for ``x (B, d_model, H, W)``: what the scan and the scan-path maps consume.

        Returns u (B, D, H, W), delta (B, K, D, H, W) before bias/softplus, A (K*D, N), B and C (B, K, N, H, W),
        D (K*D,), delta_bias (K*D,).
        """
        return self._scan_inputs(self._branches(x)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, z = self._branches(x)
        s = self._scan_inputs(u)
        y = ss2d_scan_fn(s["u"], s["delta"], s["A"], s["B"], s["C"], s["D"], s["delta_bias"], delta_softplus=True)
        y = self.out_norm(y.to(x.dtype))  # (B, D, H, W)
        return self.out_proj(y if z is None else y * z)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = Linear2d(dim, hidden), nn.GELU(), Linear2d(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    def __init__(self, dim: int, cfg: VMambaConfig, drop_path: float):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(dim, cfg.d_state, cfg.ssm_ratio, cfg.dt_rank, cfg.d_conv, cfg.conv_bias, cfg.gated)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.has_mlp = cfg.mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = LayerNorm2d(dim)
            self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x))) if self.has_mlp else x


class PatchMerging2D(nn.Module):
    """v0 downsample: 2x2 neighbours concatenated (pad bottom/right when odd) -> LN(4C) -> Linear(4C, 2C).

    Concatenation order (rows, cols) = (0, 0), (1, 0), (0, 1), (1, 1) is the official one; ``reduction`` depends on it.
    """

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.reduction = Linear2d(4 * dim, out, bias=False)
        self.norm = LayerNorm2d(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, w % 2, 0, h % 2))  # (B, C, H', W') with H', W' even
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        return self.reduction(self.norm(x))  # (B, out, ceil(H/2), ceil(W/2))


def _stem_v2(dim: int, patch_size: int) -> nn.Sequential:
    # Index layout (0 conv, 2 norm, 5 conv, 7 norm) is the official v2 patch embed's; Identity fills its permutes.
    s = patch_size // 2
    return nn.Sequential(
        nn.Conv2d(3, dim // 2, 3, s, 1), nn.Identity(), LayerNorm2d(dim // 2), nn.Identity(), nn.GELU(),
        nn.Conv2d(dim // 2, dim, 3, s, 1), nn.Identity(), LayerNorm2d(dim),
    )


def _stem_v1(dim: int, patch_size: int) -> nn.Sequential:
    # Official v1 layout: 0 conv, 1 permute (Identity here: we stay channel-first), 2 norm.
    return nn.Sequential(nn.Conv2d(3, dim, patch_size, patch_size), nn.Identity(), LayerNorm2d(dim))


def _downsample_v3(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Identity(), nn.Conv2d(dim, out, 3, 2, 1), nn.Identity(), LayerNorm2d(out))


_STEMS = {"v1": _stem_v1, "v2": _stem_v2}
_DOWNSAMPLES = {"v1": PatchMerging2D, "v3": _downsample_v3}


def _shrink(hw: tuple[int, int], modules) -> tuple[int, int]:
    """Spatial size after the strided modules among ``modules`` (conv arithmetic; patch merging rounds up)."""
    h, w = hw
    for m in modules:
        if isinstance(m, nn.Conv2d):
            (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
            h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        elif isinstance(m, PatchMerging2D):
            h, w = -(-h // 2), -(-w // 2)
    return h, w


# Legacy names the official loader renames (older classification checkpoints), as (old prefix, new prefix).
_LEGACY_PREFIXES = (("patch_embed.proj.", "patch_embed.0."), ("patch_embed.norm.", "patch_embed.2."),
                    ("norm.", "classifier.norm."), ("head.", "classifier.head."))
_LEGACY_BLOCK = re.compile(r"^(layers\.\d+\.blocks\.\d+\.)(ln_1|self_attention)\.")
_LEGACY_BLOCK_NAMES = {"ln_1": "norm", "self_attention": "op"}
# mmdet (Mask R-CNN) and mmseg (UperNet) files hold the backbone under ``backbone.`` beside these parts.
_DENSE_HEADS = ("neck.", "rpn_head.", "roi_head.", "decode_head.", "auxiliary_head.")


class VMambaBackbone(Backbone):
    family = "vmamba"

    def __init__(self, cfg: VMambaConfig):
        super().__init__()
        self.cfg = cfg
        dims = [cfg.dims * 2 ** i for i in range(len(cfg.depths))]
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()  # meta-safe
        self.patch_embed = _STEMS[cfg.stem](dims[0], cfg.patch_size)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            start = sum(cfg.depths[:i])
            blocks = nn.Sequential(*[VSSBlock(dims[i], cfg, dpr[start + j]) for j in range(depth)])
            down = _DOWNSAMPLES[cfg.downsample](dims[i], dims[i + 1]) if i + 1 < len(dims) else nn.Identity()
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=down)))
        if cfg.dense:  # official names ``outnorm{i}``: mmdet/mmseg files load with no renaming
            for i, d in enumerate(dims):
                self.add_module(f"outnorm{i}", LayerNorm2d(d))
        else:
            self.classifier = nn.Sequential(OrderedDict(norm=LayerNorm2d(dims[-1])))
            tap_dim = dims[cfg.tap_stage]
            self.tap_norm = LayerNorm2d(tap_dim, elementwise_affine=False) if cfg.tap_norm else nn.Identity()
        self.embed_dim, self.num_features = dims[cfg.tap_stage], dims[-1]
        hw = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
        self.data_config = DataConfig(hw, cfg.mean, cfg.std, cfg.resize)

    def _tap_norm(self) -> nn.Module:
        """Norm on the tapped stage: the trained ``outnorm{tap}`` (dense) or ``tap_norm`` (classification)."""
        return getattr(self, f"outnorm{self.cfg.tap_stage}") if self.cfg.dense else self.tap_norm

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        for i in range(self.cfg.tap_stage):
            x = self.layers[i](x)
        x = self.layers[self.cfg.tap_stage].blocks(x)  # (B, C, h, w), before the stage's downsample
        return self._tap_norm()(x).flatten(2).transpose(1, 2)  # (B, h*w, C)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Whole network, pooled after the classifier norm (dense: after the last stage's trained outnorm)."""
        x = self.patch_embed(images)
        for layer in self.layers:
            x = layer(x)
        norm = getattr(self, f"outnorm{len(self.layers) - 1}") if self.cfg.dense else self.classifier.norm
        return norm(x).mean(dim=(2, 3))  # (B, C_last)

    def grid(self, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        downs = [m for i in range(self.cfg.tap_stage) for m in self.layers[i].downsample.modules()]
        return _shrink(img_size or self.data_config.img_size, [*self.patch_embed.modules(), *downs])

    def scan_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for i in range(self.cfg.tap_stage + 1):
            for j, blk in enumerate(self.layers[i].blocks):
                yield f"layers.{i}.blocks.{j}.op", blk.op

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """Strip mmdet/mmseg's ``backbone.`` and apply the official loader's legacy renames.

        Returns the converted dict and the number of keys whose name changed.
        """
        out, renamed = {}, 0
        for key, v in state_dict.items():
            new = key.removeprefix("backbone.")
            old_new = next(((o, n) for o, n in _LEGACY_PREFIXES if new.startswith(o)), None)
            if old_new:
                new = old_new[1] + new[len(old_new[0]):]
            new = _LEGACY_BLOCK.sub(lambda m: f"{m[1]}{_LEGACY_BLOCK_NAMES[m[2]]}.", new)
            renamed += new != key
            out[new] = v
        return out, renamed

    def ignorable_checkpoint_keys(self) -> tuple[str, ...]:
        return ("classifier.head.", *_DENSE_HEADS)


def _vmamba(cfg: VMambaConfig, **overrides) -> VMambaBackbone:
    return VMambaBackbone(replace(cfg, **overrides))


_TINY = VMambaConfig(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2, tap_norm=True)
_SMALL = VMambaConfig(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3, tap_norm=True)
_BASE = VMambaConfig(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6, tap_norm=True)
# vanilla_vmamba_tiny (v0): d_state 16, conv bias, z gating, no MLP, k4/s4 conv stem, patch merging.
_V0_TINY = VMambaConfig(depths=(2, 2, 9, 2), dims=96, d_state=16, ssm_ratio=2.0, conv_bias=True, gated=True,
                        mlp_ratio=0.0, stem="v1", downsample="v1", drop_path_rate=0.2, tap_norm=True)
# Dense checkpoints as the paper's release feeds them: shrink to fit (never enlarge), pad right/bottom.
_DENSE = dict(dense=True, resize="shrink-and-pad")


@register_backbone
def vmamba_t_in1k_224_s3(**kw) -> VMambaBackbone:
    """VMamba-T (s1l8) stage 3 at 224 px: 196 tokens x 384 channels."""
    return _vmamba(_TINY, **kw)


@register_backbone(tags=("paper",))
def vmamba_s_in1k_224_s3(**kw) -> VMambaBackbone:
    """VMamba-S (s2l15) stage 3 at 224 px: 196 tokens (the study's best backbone)."""
    return _vmamba(_SMALL, **kw)


@register_backbone
def vmamba_b_in1k_224_s3(**kw) -> VMambaBackbone:
    """VMamba-B (s2l15) stage 3 at 224 px: 196 tokens x 512 channels."""
    return _vmamba(_BASE, **kw)


@register_backbone
def vmamba_v0_t_in1k_224_s3(**kw) -> VMambaBackbone:
    """Vanilla VMamba-T (v0) stage 3 at 224 px: 196 tokens x 384 channels."""
    return _vmamba(_V0_TINY, **kw)


@register_backbone(tags=("paper",))
def vmamba_s_coco_1333x800(**kw) -> VMambaBackbone:
    """VMamba-S from Mask R-CNN (COCO), stage 3 at 1333x800: stride 16 -> 50 x 84 = 4200 tokens x 384 channels.

    The paper lists 4150 = (800 // 16) * (1333 // 16); the padded stride-2 convs give ceil(1333 / 16) = 84 columns.
    """
    return _vmamba(_SMALL, img_size=(800, 1333), **_DENSE, **kw)


@register_backbone(tags=("paper",))
def vmamba_s_ade20k_512(**kw) -> VMambaBackbone:
    """VMamba-S from UperNet (ADE20K), stage 3 at 512 px: stride 16 -> 32 x 32 = 1024 tokens x 384 channels."""
    return _vmamba(_SMALL, img_size=512, **_DENSE, **kw)


@register_backbone(tags=("embedded",))
def vmamba_scene_128_s3(**kw) -> VMambaBackbone:
    """Embedded-world VMamba: 128 px, stage 3 -> 8x8 = 64 tokens x 128 channels, matched to vit-scene-128."""
    cfg = VMambaConfig(img_size=128, depths=(1, 1, 2, 1), dims=32, ssm_ratio=1.0, drop_path_rate=0.05,
                       mean=(0.5,) * 3, std=(0.25,) * 3)
    return _vmamba(cfg, **kw)


@register_backbone(tags=("test",))
def vmamba_test(**kw) -> VMambaBackbone:
    """Tiny VMamba for tests: 32 px, stage 3 -> 2x2 tokens."""
    return _vmamba(VMambaConfig(img_size=32, depths=(1, 1, 1, 1), dims=8, d_state=2, drop_path_rate=0.0), **kw)


@register_backbone(tags=("test",))
def vmamba_v0_test(**kw) -> VMambaBackbone:
    """Tiny vanilla (v0) VMamba for tests: 32 px, stage 3 -> 2x2 tokens."""
    return _vmamba(replace(_V0_TINY, img_size=32, depths=(1, 1, 1, 1), dims=8, d_state=2, drop_path_rate=0.0), **kw)


@register_backbone(tags=("test",))
def vmamba_dense_test(**kw) -> VMambaBackbone:
    """Tiny dense-layout VMamba for tests: 48x32 input (non-square), stage 3 -> 3x2 tokens, trained tap norm."""
    return _vmamba(VMambaConfig(img_size=(48, 32), depths=(1, 1, 1, 1), dims=8, d_state=2, drop_path_rate=0.0,
                                **_DENSE), **kw)
