"""Our VMamba and ViTDet as timm models, under the official VMamba function names.

``import toolkit.timm_compat`` registers them; then ``timm.create_model("vmamba_small_s2l15",
checkpoint_path="vssm_small_0229_ckpt_epoch_222.pth")`` builds the model and loads the official file.

What timm's ``checkpoint_path`` does (timm 1.0 ``load_checkpoint``): reads the file with ``weights_only=True``
(safetensors by suffix); takes ``state_dict_ema`` or ``model_ema`` FIRST when present (``use_ema=True``), else
``state_dict``, else ``model``; strips DDP's ``module.``; then calls ``model.load_state_dict(sd, strict=True)``.
Two consequences: an official VMamba file that also holds ``model_ema`` loads its EMA weights through timm (our
``load_official`` takes ``model``), and the load is strict. So these models carry the official ImageNet head
(``classifier.head``), and rename official keys in ``_load_from_state_dict`` before torch's strict check, as the
official VMamba does for its legacy names: legacy names, mmdet/mmseg ``backbone.`` and detectron2 ``backbone.net.``
prefixes all load; detection/segmentation heads are dropped.

Unlike the toolkit's backbones (whose ``forward`` returns tap tokens), these follow timm: ``forward`` returns logits
(or pooled features when ``num_classes=0``); ``forward_tokens`` still gives the tap.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg

from toolkit.backbones import vitdet, vmamba
from toolkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD


class _OfficialNamesOnLoad:
    """Converts official key names in place before torch's (strict) ``load_state_dict`` checks them."""

    _dropped: tuple[str, ...] = ()  # checkpoint parts outside this model (detection/segmentation heads)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        own = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
        converted, _ = self.convert_state_dict(own)
        state_dict.update({prefix + k: v for k, v in converted.items() if not k.startswith(self._dropped)})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TimmVMamba(_OfficialNamesOnLoad, vmamba.VMambaBackbone):
    """VMamba with the official classifier (``classifier.norm`` -> mean pool -> ``classifier.head``) and timm's API."""

    _dropped = vmamba._DENSE_HEADS

    def __init__(self, cfg: vmamba.VMambaConfig, num_classes: int = 1000):
        super().__init__(cfg)
        self.num_classes = num_classes
        self.classifier.add_module("head", nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity())

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> last stage after ``classifier.norm``: ``(B, C_last, h, w)``."""
        x = self.patch_embed(images)
        for layer in self.layers:
            x = layer(x)
        return self.classifier.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (B, C_last)
        return x if pre_logits else self.classifier.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


class TimmViTDet(_OfficialNamesOnLoad, vitdet.ViTDetBackbone):
    """ViTDet with timm's API; no head (``num_classes`` 0): ``forward`` returns mean-pooled last-block features."""

    _dropped = vitdet._DETECTRON2_HEADS
    num_classes = 0

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> last block tokens ``(B, h*w, C)``."""
        return self.forward_tokens(images)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _cfg(size: int, **kw) -> dict:
    return dict(dict(url="", num_classes=1000, input_size=(3, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     interpolation="bicubic", crop_pct=224 / 256, first_conv="patch_embed.0",
                     classifier="classifier.head", license="mit"), **kw)


default_cfgs = generate_default_cfgs({
    "vmamba_tiny_s1l8": _cfg(224), "vmamba_small_s2l15": _cfg(224), "vmamba_base_s2l15": _cfg(224),
    "vanilla_vmamba_tiny": _cfg(224),
    "vitdet_base_patch16_1024": _cfg(1024, num_classes=0, interpolation="bilinear", crop_pct=1.0,
                                     first_conv="patch_embed.proj", classifier="", license="apache-2.0"),
})


def _build(cls, name: str, cfg, pretrained: bool, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
           **kwargs) -> nn.Module:
    if pretrained:
        raise ValueError(f"`{name}`: nothing is downloaded here; pass checkpoint_path=<official file> to "
                         "timm.create_model instead of pretrained=True")
    num_classes = kwargs.pop("num_classes", None)
    model = cls(replace(cfg, **kwargs), **({} if num_classes is None else dict(num_classes=num_classes)))
    pcfg = resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay)
    model.pretrained_cfg = model.default_cfg = pcfg.to_dict()
    return model


@register_model
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs) -> TimmVMamba:
    return _build(TimmVMamba, "vmamba_tiny_s1l8", vmamba._TINY, pretrained, **kwargs)


@register_model
def vmamba_small_s2l15(pretrained: bool = False, **kwargs) -> TimmVMamba:
    return _build(TimmVMamba, "vmamba_small_s2l15", vmamba._SMALL, pretrained, **kwargs)


@register_model
def vmamba_base_s2l15(pretrained: bool = False, **kwargs) -> TimmVMamba:
    return _build(TimmVMamba, "vmamba_base_s2l15", vmamba._BASE, pretrained, **kwargs)


@register_model
def vanilla_vmamba_tiny(pretrained: bool = False, **kwargs) -> TimmVMamba:
    return _build(TimmVMamba, "vanilla_vmamba_tiny", vmamba._V0_TINY, pretrained, **kwargs)


@register_model
def vitdet_base_patch16_1024(pretrained: bool = False, **kwargs) -> TimmViTDet:
    return _build(TimmViTDet, "vitdet_base_patch16_1024", vitdet.ViTDetConfig(), pretrained, **kwargs)
