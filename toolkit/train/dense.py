"""Dense-task tuning: the embedded stand-in for the study's COCO-detection and ADE20K-segmentation backbones.

A classification-pretrained backbone is tuned end to end with a light segmentation head on its tap tokens, on the
scene world's COCO instance masks (semantic labels: background + one class per COCO category), with one recipe
for every family (matched data, steps, optimizer). The tuned weights are the "dense-tuned" variant of that
backbone; the VLM then uses them frozen, exactly as it uses the classification weights.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.backbones.base import Backbone
from toolkit.config import DenseConfig
from toolkit.data.formats import IGNORE_PIXEL, load_coco_semantic
from toolkit.registry import create_backbone
from toolkit.vlm import load_backbone_weights
from toolkit.train.common import fit_minibatches, loss_curve, save_backbone, seed_everything
from toolkit.backbones.base import CHANNELS_LAST
from toolkit.geometry import fit_batch
from toolkit.train.pretrain import load_images, to_input


class SegHead(nn.Module):
    """Tap tokens ``(B, h*w, C)`` on grid (h, w) -> class logits ``(B, n_classes, H, W)`` at the label size:
    a 3x3 conv, GELU and a 1x1 classifier on the token grid, then bilinear upsampling (a one-level UperNet)."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, n_classes, 1))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)  # (B, C, h, w)
        return F.interpolate(self.net(x), size=out_hw, mode="bilinear", align_corners=False)


def load_segmentation_split(world_root: str | Path, split: str, backbone: Backbone, label_stride: int):
    """The world's COCO file of ``split`` -> uint8 images ``(N, 3, h, w)`` at the world's size, labels
    ``(N, H / stride, W / stride)`` int64 in the backbone's input frame (its resize strategy applied to the label
    maps, padding ignored), class names."""
    root = Path(world_root)
    coco = root / "coco" / f"instances_{split}.json"
    paths, labels, names = load_coco_semantic(coco, root / "images", stride=label_stride)
    images = load_images(paths)
    h, w = backbone.data_config.img_size
    labels = fit_batch(torch.from_numpy(labels).long()[:, None], (h // label_stride, w // label_stride),
                       backbone.data_config.resize, IGNORE_PIXEL, mode="nearest")[:, 0]
    return images, labels, names


@torch.no_grad()
def segmentation_scores(backbone: Backbone, head: SegHead, images: torch.Tensor, labels: torch.Tensor,
                        device: torch.device, n_classes: int, batch_size: int = 64) -> dict[str, float]:
    """Pixel accuracy and mean IoU over the classes present in ``labels`` (ignore pixels left out)."""
    backbone.eval()
    grid = backbone.grid()
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    for i in range(0, len(images), batch_size):
        x = to_input(images[i:i + batch_size].to(device), backbone)
        y = labels[i:i + batch_size]
        pred = head(backbone.forward_tokens(x), grid, tuple(y.shape[-2:])).argmax(1).cpu()
        keep = y != IGNORE_PIXEL
        conf += torch.bincount(y[keep] * n_classes + pred[keep], minlength=n_classes ** 2).view(n_classes, n_classes)
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    present = conf.sum(1) > 0
    return dict(pixel_acc=(inter.sum() / conf.sum().clamp(min=1)).item(),
                miou=(inter[present] / union[present].clamp(min=1)).mean().item())


def dense_tune_backbone(name: str, init_weights: str | Path, world_root: str | Path, cfg: DenseConfig,
                        out_path: Path, device: torch.device, seed: int = 0) -> dict:
    """Tune backbone ``name`` from ``init_weights`` on the world's train masks; save the backbone's weights
    (safetensors) and a JSON record with validation pixel accuracy and mIoU."""
    seed_everything(seed)
    backbone = create_backbone(name)
    load_backbone_weights(backbone, init_weights)  # pretrained here, or an official file
    backbone.to(device, memory_format=CHANNELS_LAST)
    images, labels, names = load_segmentation_split(world_root, "train", backbone, cfg.label_stride)
    label_hw = tuple(labels.shape[-2:])
    n_classes = len(names) + 1
    head = SegHead(backbone.embed_dim, n_classes).to(device)
    grid = backbone.grid()
    gen = torch.Generator().manual_seed(seed)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        x = to_input(images[idx].to(device), backbone)
        y = labels[idx].to(device)
        if torch.rand((), generator=gen) < 0.5:  # flips keep masks aligned with pixels
            x, y = x.flip(-1), y.flip(-1)
        return F.cross_entropy(head(backbone.forward_tokens(x), grid, label_hw), y, ignore_index=IGNORE_PIXEL)

    backbone.train()
    steps, seconds, losses = fit_minibatches(list(backbone.parameters()) + list(head.parameters()), batch_loss,
                                             len(images), cfg.batch_size, cfg.epochs, cfg.lr, cfg.weight_decay,
                                             cfg.warmup_steps, gen, f"dense-tune {name}",
                                             state_path=out_path.with_suffix(".state.pt"), modules=[backbone, head])
    val_images, val_labels, _ = load_segmentation_split(world_root, "val", backbone, cfg.label_stride)
    scores = segmentation_scores(backbone, head, val_images, val_labels, device, n_classes)
    record = dict(backbone=name, family=type(backbone).family, task="semantic segmentation",
                  classes=["background", *names], label_hw=list(label_hw), init=str(init_weights), steps=steps,
                  train_seconds=round(seconds, 1), **scores, recipe=asdict(cfg), loss_curve=loss_curve(losses))
    return save_backbone(backbone, out_path, record)
