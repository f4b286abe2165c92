"""Image geometry: resize strategies with exact forward and inverse box transforms.

Every strategy maps an original image (W0, H0) onto the model input (W, H) by a scale per axis
and an offset (padding), ``x_in = x0 * sx + ox``; boxes travel through the same affine map, so a
box predicted on the model's input maps back onto the original image exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

STRATEGIES = ("resize-naive", "letterbox")


@dataclass(frozen=True)
class Geometry:
    """Affine map original pixels -> input pixels: ``x_in = x0 * sx + ox``, ``y_in = y0 * sy + oy``."""

    orig_w: int
    orig_h: int
    in_w: int
    in_h: int
    sx: float
    sy: float
    ox: float
    oy: float

    def box_to_input(self, box_xyxy: Sequence[float]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = box_xyxy
        return (x1 * self.sx + self.ox, y1 * self.sy + self.oy, x2 * self.sx + self.ox, y2 * self.sy + self.oy)

    def box_to_original(self, box_xyxy_in: Sequence[float]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = box_xyxy_in
        fx = lambda v: min(max((v - self.ox) / self.sx, 0.0), float(self.orig_w))  # noqa: E731
        fy = lambda v: min(max((v - self.oy) / self.sy, 0.0), float(self.orig_h))  # noqa: E731
        return (fx(x1), fy(y1), fx(x2), fy(y2))

    def norm_input_to_original(self, box_norm_in: Sequence[float]) -> tuple[float, float, float, float]:
        """A box normalised by the input size -> pixels of the original image."""
        x1, y1, x2, y2 = box_norm_in
        return self.box_to_original((x1 * self.in_w, y1 * self.in_h, x2 * self.in_w, y2 * self.in_h))

    def original_to_norm_input(self, box_xyxy: Sequence[float]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self.box_to_input(box_xyxy)
        return (x1 / self.in_w, y1 / self.in_h, x2 / self.in_w, y2 / self.in_h)


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(round(255 * m)) for m in mean)  # type: ignore[return-value]


def apply_geometry(
    image: Image.Image, size: tuple[int, int], strategy: str, fill: tuple[int, int, int] = (0, 0, 0)
) -> tuple[Image.Image, Geometry]:
    """Resize ``image`` to ``size = (H, W)`` with ``strategy``; returns the input image and its geometry.

    ``letterbox`` pads to a square with ``fill`` (Prismatic pads with the normalisation mean) before resizing,
    so aspect ratio is kept; ``resize-naive`` stretches.
    """
    h, w = size
    w0, h0 = image.size
    image = image.convert("RGB")
    if strategy == "resize-naive":
        out = image.resize((w, h), Image.BICUBIC)
        return out, Geometry(w0, h0, w, h, w / w0, h / h0, 0.0, 0.0)
    if strategy == "letterbox":
        side = max(w0, h0)
        px, py = (side - w0) // 2, (side - h0) // 2
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, (px, py))
        out = canvas.resize((w, h), Image.BICUBIC)
        sx, sy = w / side, h / side
        return out, Geometry(w0, h0, w, h, sx, sy, px * sx, py * sy)
    raise ValueError(f"unknown image_resize_strategy `{strategy}`; choose one of {STRATEGIES}")


def to_tensor_normalized(image: Image.Image, mean: Sequence[float], std: Sequence[float]):
    """PIL RGB -> float tensor (3, H, W) normalised by ``mean``/``std``."""
    import torch

    arr = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    t = torch.from_numpy(arr).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s
