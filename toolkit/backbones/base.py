"""The feature contract every vision backbone honours.

images ``(B, 3, H, W)``, normalised with ``data_config.mean/std`` ->
visual tokens ``(B, N, C)`` at the configured tap, laid out row-major on a known grid ``(h, w)``, N = h * w.
The VLM, the trainers and the analysis use only this contract, never a family's internals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from abc import ABCMeta, abstractmethod

# Backbones train and encode in channels-last layout: oneDNN's CPU convolutions run faster in it (benchmarks/RESULTS.md,
# "Channels-last"), and it is the layout GPU tensor cores prefer.
CHANNELS_LAST = torch.channels_last

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing a backbone expects: input size (H, W), normalisation, default resize strategy."""

    img_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "letterbox"


@dataclass(frozen=True)
class LoadReport:
    """What a checkpoint load did; ``missing``/``unexpected`` are empty after a strict success."""

    path: str
    missing: tuple[str, ...] = field(default=())
    unexpected: tuple[str, ...] = field(default=())
    renamed: int = 0


@dataclass(frozen=True)
class TokenLayout:
    """Where a partitioned (windowed) attention or scan module's tokens sit: the stage's token grid ``(H, W)`` and, per
    partition in the order the module sees them (one image), the row-major flat index on that grid of each of its
    tokens in order; -1 marks padding tokens that exist only inside the partition. ``index``: ``(windows, n)``."""

    grid: tuple[int, int]
    index: torch.Tensor


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model; the message lists the offending keys."""


class Backbone(nn.Module, metaclass=ABCMeta):
    """Base class: subclasses set ``family``, ``embed_dim``, ``num_features``, ``data_config`` and implement
    ``forward_tokens`` (tap), ``forward_pooled`` (whole network, for classification pretraining) and ``grid``."""

    family: str  # no default: the registry reads it, and a subclass without one must fail there
    embed_dim: int
    num_features: int
    data_config: DataConfig

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 3, H, W)`` -> tokens ``(B, N, C)`` at the tap."""
        return self.forward_tokens(images)

    @abstractmethod
    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, N, C)`` at the tap."""

    @abstractmethod
    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_features)``: the whole network, pooled, for classification."""

    @abstractmethod
    def grid(self, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Token grid ``(h, w)`` at the tap for an input of ``img_size`` (default: the configured size)."""

    def num_tokens(self, img_size: tuple[int, int] | None = None) -> int:
        h, w = self.grid(img_size)
        return h * w

    # -- analysis hooks: families that have them override; the analysis asks, never branches on family --
    def attention_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Self-attention modules whose attention maps the analysis may capture (name, module)."""
        return iter(())

    def attention_layouts(self, img_size: tuple[int, int] | None = None) -> dict[str, TokenLayout]:
        """``TokenLayout`` of the attention modules that run over partitions of a stage's token grid (windows, dilated
        grids), for an input of ``img_size``; modules absent here attend globally over the tap grid's tokens."""
        return {}

    def scan_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Selective-scan modules whose scan paths the analysis may compute (name, module); each offers
        ``ssm_inputs(x)`` for its captured input ``x``."""
        return iter(())

    def scan_layouts(self, img_size: tuple[int, int] | None = None) -> dict[str, TokenLayout]:
        """``TokenLayout`` of the scan modules that run a 1-D selective scan over partitions of a stage's token grid
        (one partition per batch row, scanned in the layout's token order), for an input of ``img_size``; modules
        absent here run SS2D's 2-D cross-scan over their grid."""
        return {}

    # -- checkpoints ------------------------------------------------------------------------------
    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """Official key layout -> this module's keys; returns (state_dict, number of keys renamed)."""
        return state_dict, 0

    def load_official(self, path: str | Path, *, strict: bool = True) -> LoadReport:
        """Load an official pretrained file (``.safetensors``, or ``.pth``/``.bin`` with ``weights_only=True``).

        Classification heads and keys this backbone does not use past its tap are ignored on purpose:
        the VLM uses the tap only. Anything else missing or unexpected raises ``CheckpointMismatchError``.
        """
        from toolkit.checkpoints import load_state_dict_file, unwrap_state_dict

        sd = unwrap_state_dict(load_state_dict_file(path))
        sd, renamed = self.convert_state_dict(sd)
        own = self.state_dict()
        ignorable = self.ignorable_checkpoint_keys()
        unexpected = tuple(sorted(k for k in sd if k not in own and not any(k.startswith(p) for p in ignorable)))
        missing = tuple(sorted(k for k in own if k not in sd))
        shape_bad = tuple(sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                                 for k in own if k in sd and sd[k].shape != own[k].shape))
        if strict and (missing or unexpected or shape_bad):
            raise CheckpointMismatchError(_mismatch_message(path, missing, unexpected, shape_bad))
        self.load_state_dict({k: v for k, v in sd.items() if k in own and sd[k].shape == own[k].shape}, strict=False)
        return LoadReport(str(path), missing, unexpected, renamed)

    def ignorable_checkpoint_keys(self) -> tuple[str, ...]:
        """Key prefixes an official file may carry that this backbone drops on purpose (e.g. the head)."""
        return ()


def _mismatch_message(path, missing, unexpected, shape_bad, limit: int = 12) -> str:
    parts = [f"checkpoint {path} does not fit the model:"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape_bad)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{len(keys)} {label} key(s): {shown}")
    return "\n  ".join(parts)
