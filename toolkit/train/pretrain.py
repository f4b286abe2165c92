"""Matched classification pretraining: one recipe (data, steps, optimizer, augmentation) for every family.

The embedded world's single-object set stands in for ImageNet-1K: a linear head on each backbone's
pooled features, AdamW, warm-up + cosine, label smoothing, random flips and shifts.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from toolkit.checkpoints import save_safetensors
from toolkit.config import PretrainConfig
from toolkit.registry import create_backbone
from toolkit.train.common import fit_minibatches, seed_everything


def load_image_folder(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageFolder tree -> uint8 images ``(N, 3, H, W)``, labels ``(N,)``, class names (held in memory)."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root))
    return load_images([p for p, _ in ds.samples]), torch.tensor(ds.targets), ds.classes


def load_images(paths) -> torch.Tensor:
    """Same-size image files -> uint8 ``(N, 3, H, W)`` RGB, held in memory."""
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # (N, H, W, 3)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


def normalize(images_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float normalised."""
    x = images_u8.float() / 255.0
    m = torch.tensor(mean, device=x.device)[:, None, None]
    s = torch.tensor(std, device=x.device)[:, None, None]
    return (x - m) / s


def augment(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random translation (reflect-padded) per batch of ``(B, 3, H, W)``."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    if max_shift > 0:
        dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
        x = F.pad(x, (max_shift,) * 4, mode="reflect")
        h, w = x.shape[-2] - 2 * max_shift, x.shape[-1] - 2 * max_shift
        x = x[..., max_shift + dy: max_shift + dy + h, max_shift + dx: max_shift + dx + w]
    return x


@torch.no_grad()
def evaluate_top1(backbone: nn.Module, head: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device, batch_size: int = 128) -> float:
    backbone.eval()
    dc = backbone.data_config
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device), dc.mean, dc.std)
        correct += (head(backbone.forward_pooled(x)).argmax(-1).cpu() == labels[i:i + batch_size]).sum().item()
    return correct / max(1, len(images))


def pretrain_backbone(name: str, train: tuple, val: tuple, cfg: PretrainConfig, out_path: Path,
                      device: torch.device, seed: int = 0, backbone_overrides: dict | None = None) -> dict:
    """Train ``name`` on (images, labels, classes) tuples; save weights (safetensors) and a JSON record."""
    seed_everything(seed)
    images, labels, classes = train
    backbone = create_backbone(name, **(backbone_overrides or {})).to(device)
    head = nn.Linear(backbone.num_features, len(classes)).to(device)
    gen = torch.Generator().manual_seed(seed)
    dc = backbone.data_config

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        x = augment(normalize(images[idx].to(device), dc.mean, dc.std), cfg.max_shift, gen)
        return F.cross_entropy(head(backbone.forward_pooled(x)), labels[idx].to(device),
                               label_smoothing=cfg.label_smoothing)

    backbone.train()
    total, train_time = fit_minibatches(list(backbone.parameters()) + list(head.parameters()), batch_loss, len(images),
                                        cfg.batch_size, cfg.epochs, cfg.lr, cfg.weight_decay, cfg.warmup_steps, gen,
                                        f"pretrain {name}")
    top1 = evaluate_top1(backbone, head, val[0], val[1], device)
    save_safetensors(backbone.state_dict(), out_path)
    record = dict(backbone=name, family=type(backbone).family, top1=top1, n_classes=len(classes), steps=total,
                  train_seconds=round(train_time, 1), params=sum(p.numel() for p in backbone.parameters()),
                  recipe=asdict(cfg))
    out_path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record
