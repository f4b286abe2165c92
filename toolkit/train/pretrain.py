"""Matched classification pretraining: one recipe (data, steps, optimizer, augmentation, head) for every family.

The embedded world's single-object set stands in for ImageNet-1K: a classification head on each backbone
(``PretrainConfig.head``), AdamW, warm-up + cosine, label smoothing, random flips and shifts.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from toolkit.backbones.base import CHANNELS_LAST
from toolkit.config import PretrainConfig
from toolkit.geometry import fit_batch, mean_fill, normalize
from toolkit.registry import create_backbone
from toolkit.train.common import fit_minibatches, loss_curve, save_backbone, seed_everything


def load_image_folder(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageFolder tree -> uint8 images ``(N, 3, H, W)``, labels ``(N,)``, class names (held in memory)."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root))
    return load_images([p for p, _ in ds.samples]), torch.tensor(ds.targets), ds.classes


def load_images(paths) -> torch.Tensor:
    """Same-size image files -> uint8 ``(N, 3, H, W)`` RGB, held in memory."""
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # (N, H, W, 3)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


def augment(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random translation (reflect-padded) per batch of ``(B, 3, H, W)``."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    if max_shift > 0:
        dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
        x = F.pad(x, (max_shift,) * 4, mode="reflect")
        h, w = x.shape[-2] - 2 * max_shift, x.shape[-1] - 2 * max_shift
        x = x[..., max_shift + dy: max_shift + dy + h, max_shift + dx: max_shift + dx + w]
    return x.contiguous(memory_format=CHANNELS_LAST)


HEADS = ("tap-max", "pooled")


class Classifier(nn.Module):
    """A backbone with a classification head: images ``(B, 3, H, W)`` -> logits ``(B, n_classes)``.

    ``head="tap-max"``: LayerNorm on the tap tokens ``(B, N, C)``, max over tokens, linear. It trains exactly the
    tokens the VLM reads (the stages past the tap are skipped), and max pooling lets the loss reach the few tokens
    that hold the object: a scene object covers 1-5% of the image, and a mean over tokens buries it in the
    background (with ``"pooled"`` every family sat near the colour-only plateau, ln 6, for hundreds of steps:
    benchmarks/RESULTS.md). ``head="pooled"``: ``forward_pooled`` (the whole network, mean-pooled last stage, as
    ImageNet training does) and a linear layer.
    """

    def __init__(self, backbone: nn.Module, n_classes: int, head: str = "tap-max"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown pretraining head `{head}`; choose one of {HEADS}")
        self.backbone, self.kind = backbone, head
        dim = backbone.embed_dim if head == "tap-max" else backbone.num_features
        self.norm = nn.LayerNorm(dim) if head == "tap-max" else nn.Identity()
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "pooled":
            return self.fc(self.backbone.forward_pooled(images))
        return self.fc(self.norm(self.backbone.forward_tokens(images)).amax(dim=1))


def to_input(images: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    """uint8 images ``(B, 3, h, w)`` of any size -> the backbone's normalised input ``(B, 3, H, W)``, through its own
    resize strategy (a paper-size backbone trained on the 128 px world sees its own input size, as it will in the
    VLM)."""
    dc = backbone.data_config
    return normalize(fit_batch(images, dc.img_size, dc.resize, mean_fill(dc.mean)), dc.mean, dc.std)


@torch.no_grad()
def evaluate_top1(model: Classifier, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                  batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = to_input(images[i:i + batch_size].to(device), model.backbone)
        correct += (model(x).argmax(-1).cpu() == labels[i:i + batch_size]).sum().item()
    return correct / max(1, len(images))


def pretrain_backbone(name: str, train: tuple, val: tuple, cfg: PretrainConfig, out_path: Path,
                      device: torch.device, seed: int = 0, backbone_overrides: dict | None = None) -> dict:
    """Train ``name`` on (images, labels, classes) tuples; save weights (safetensors) and a JSON record."""
    seed_everything(seed)
    images, labels, classes = train
    backbone = create_backbone(name, **(backbone_overrides or {}))
    model = Classifier(backbone, len(classes), cfg.head).to(device, memory_format=CHANNELS_LAST)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        x = augment(to_input(images[idx].to(device), backbone), cfg.max_shift, gen)
        return F.cross_entropy(model(x), labels[idx].to(device), label_smoothing=cfg.label_smoothing)

    model.train()
    total, train_time, losses = fit_minibatches(list(model.parameters()), batch_loss, len(images), cfg.batch_size,
                                                cfg.epochs, cfg.lr, cfg.weight_decay, cfg.warmup_steps, gen,
                                                f"pretrain {name}", state_path=out_path.with_suffix(".state.pt"),
                                                modules=[model])
    top1 = evaluate_top1(model, val[0], val[1], device)
    record = dict(backbone=name, family=type(backbone).family, top1=top1, n_classes=len(classes), steps=total,
                  train_seconds=round(train_time, 1), params=sum(p.numel() for p in backbone.parameters()),
                  recipe=asdict(cfg), loss_curve=loss_curve(losses))
    return save_backbone(backbone, out_path, record)
