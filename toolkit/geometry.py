"""Image geometry: resize strategies with exact forward and inverse box transforms.

Every strategy maps an original image (W0, H0) onto the model input (W, H) by a scale per axis
and an offset, ``x_in = x0 * sx + ox``; boxes travel through the same affine map, so a box
predicted on the model's input maps back onto the original image exactly.

| strategy | what it does | resampling | from |
|---|---|---|---|
| ``resize-naive`` | stretch to (H, W) | bicubic | Prismatic |
| ``resize-crop`` | scale the shorter side to cover (H, W), centre crop | bicubic | Prismatic/timm, crop_pct 1 |
| ``letterbox`` | pad to a centred square with ``fill``, then resize | bicubic | Prismatic |
| ``resize-and-pad`` | scale up or down to fit (H, W) keeping aspect, pad right/bottom | bilinear | mmdet keep_ratio |
| ``shrink-and-pad`` | as ``resize-and-pad``, never enlarging (a fitting image is only padded) | bilinear | release |
| ``letterbox-square-N`` | ``shrink-and-pad`` to N x N (N: 224/256/512/1024), any backbone size | bilinear | release |

"release" is the paper's public release, which feeds its dense backbones (and ``letterbox-square-N``) this way.

``resize-crop`` is the only strategy that loses pixels: a box that leaves the crop is clipped to the
input frame by ``box_to_input``, so its round trip returns the visible part, not the original box.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
SQUARE_SIZES = (224, 256, 512, 1024)


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

    def box_to_input(self, box_xyxy: Sequence[float]) -> Box:
        """Original pixels -> input pixels, clipped to the input frame (only a crop ever clips)."""
        x1, y1, x2, y2 = box_xyxy
        fx = lambda v: min(max(v * self.sx + self.ox, 0.0), float(self.in_w))  # noqa: E731
        fy = lambda v: min(max(v * self.sy + self.oy, 0.0), float(self.in_h))  # noqa: E731
        return (fx(x1), fy(y1), fx(x2), fy(y2))

    def box_to_original(self, box_xyxy_in: Sequence[float]) -> Box:
        """Input pixels -> original pixels, clipped to the original image (padding maps outside it)."""
        x1, y1, x2, y2 = box_xyxy_in
        fx = lambda v: min(max((v - self.ox) / self.sx, 0.0), float(self.orig_w))  # noqa: E731
        fy = lambda v: min(max((v - self.oy) / self.sy, 0.0), float(self.orig_h))  # noqa: E731
        return (fx(x1), fy(y1), fx(x2), fy(y2))

    def norm_input_to_original(self, box_norm_in: Sequence[float]) -> Box:
        """A box normalised by the input size -> pixels of the original image."""
        x1, y1, x2, y2 = box_norm_in
        return self.box_to_original((x1 * self.in_w, y1 * self.in_h, x2 * self.in_w, y2 * self.in_h))

    def original_to_norm_input(self, box_xyxy: Sequence[float]) -> Box:
        """Original pixels -> the box normalised by the input size (the frame the model sees)."""
        x1, y1, x2, y2 = self.box_to_input(box_xyxy)
        return (x1 / self.in_w, y1 / self.in_h, x2 / self.in_w, y2 / self.in_h)

    def norm_original_to_norm_input(self, box_norm_orig: Sequence[float]) -> Box:
        """RefCOCO-style ground truth (normalised by the ORIGINAL size) -> normalised in the input frame.

        The two frames differ whenever the strategy pads or crops (letterbox of a non-square image), which is
        why a model trained on input-frame boxes is scored wrong against original-frame ground truth.
        """
        x1, y1, x2, y2 = box_norm_orig
        return self.original_to_norm_input((x1 * self.orig_w, y1 * self.orig_h, x2 * self.orig_w, y2 * self.orig_h))

    def cell_edges(self, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Edges of a ``grid = (h, w)`` laid over the input frame, in original pixels clipped to the image:
        ``xs (w + 1,)``, ``ys (h + 1,)``. Cell (r, c) covers ``[xs[c], xs[c+1]] x [ys[r], ys[r+1]]``; a cell in the
        padding has zero width or height (the clipping ``box_to_original`` applies, coordinate by coordinate)."""
        h, w = grid
        xs = np.clip((np.linspace(0.0, self.in_w, w + 1) - self.ox) / self.sx, 0.0, self.orig_w)
        ys = np.clip((np.linspace(0.0, self.in_h, h + 1) - self.oy) / self.sy, 0.0, self.orig_h)
        return xs, ys

    def cell_at(self, x: float, y: float, grid: tuple[int, int], clamp: bool = False) -> tuple[int, int] | None:
        """The (row, col) of a ``grid = (h, w)`` laid over the input frame that holds the point ``(x, y)`` of the
        ORIGINAL image (pixels, continuous: pixel i spans [i, i + 1), so a pixel index names its top-left corner).

        None for a point the model never saw: off the image (where a letterbox pads) or cut off by a crop; with
        ``clamp`` such a point takes the nearest cell instead (a point a front end already holds, not a click)."""
        xi, yi = (x * self.sx + self.ox) / self.in_w, (y * self.sy + self.oy) / self.in_h
        seen = 0 <= x < self.orig_w and 0 <= y < self.orig_h and 0 <= xi < 1 and 0 <= yi < 1
        if not (seen or clamp):
            return None
        h, w = grid
        return min(max(int(yi * h), 0), h - 1), min(max(int(xi * w), 0), w - 1)


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(round(255 * m)) for m in mean)  # type: ignore[return-value]


def _resize_naive(image: Image.Image, h: int, w: int, fill) -> tuple[Image.Image, Geometry]:
    w0, h0 = image.size
    return image.resize((w, h), Image.BICUBIC), Geometry(w0, h0, w, h, w / w0, h / h0, 0.0, 0.0)


def _resize_crop(image: Image.Image, h: int, w: int, fill) -> tuple[Image.Image, Geometry]:
    w0, h0 = image.size
    s = max(w / w0, h / h0)  # cover (H, W): the shorter side (relative to the target) fits exactly
    rw, rh = max(w, round(w0 * s)), max(h, round(h0 * s))
    left, top = (rw - w) // 2, (rh - h) // 2
    out = image.resize((rw, rh), Image.BICUBIC).crop((left, top, left + w, top + h))
    return out, Geometry(w0, h0, w, h, rw / w0, rh / h0, float(-left), float(-top))


def _letterbox(image: Image.Image, h: int, w: int, fill) -> tuple[Image.Image, Geometry]:
    w0, h0 = image.size
    side = max(w0, h0)
    px, py = (side - w0) // 2, (side - h0) // 2
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, (px, py))
    sx, sy = w / side, h / side
    return canvas.resize((w, h), Image.BICUBIC), Geometry(w0, h0, w, h, sx, sy, px * sx, py * sy)


def _fit_and_pad(image: Image.Image, h: int, w: int, fill, enlarge: bool) -> tuple[Image.Image, Geometry]:
    w0, h0 = image.size
    s = min(w / w0, h / h0)
    if not enlarge:
        s = min(s, 1.0)
    # Rounded per axis as mmdet and the release do; the geometry keeps the exact per-axis scale it produced.
    nw, nh = min(w, max(1, round(w0 * s))), min(h, max(1, round(h0 * s)))
    resized = image if (nw, nh) == (w0, h0) else image.resize((nw, nh), Image.BILINEAR)
    canvas = Image.new("RGB", (w, h), fill)
    canvas.paste(resized, (0, 0))
    return canvas, Geometry(w0, h0, w, h, nw / w0, nh / h0, 0.0, 0.0)


_Strategy = Callable[[Image.Image, int, int, tuple], tuple[Image.Image, Geometry]]
_STRATEGIES: dict[str, _Strategy] = {
    "resize-naive": _resize_naive,
    "resize-crop": _resize_crop,
    "letterbox": _letterbox,
    "resize-and-pad": lambda im, h, w, f: _fit_and_pad(im, h, w, f, enlarge=True),
    "shrink-and-pad": lambda im, h, w, f: _fit_and_pad(im, h, w, f, enlarge=False),
    **{f"letterbox-square-{n}": (lambda im, h, w, f, n=n: _fit_and_pad(im, n, n, f, enlarge=False))
       for n in SQUARE_SIZES},
}
STRATEGIES = tuple(_STRATEGIES)


def apply_geometry(
    image: Image.Image, size: tuple[int, int], strategy: str, fill: tuple[int, int, int] = (0, 0, 0)
) -> tuple[Image.Image, Geometry]:
    """Resize ``image`` for a backbone configured at ``size = (H, W)``; returns the input image and its geometry.

    ``fill`` colours the padding (Prismatic and the release pad with the normalisation mean).
    ``letterbox-square-N`` ignores ``size``: its input is N x N.
    """
    try:
        fn = _STRATEGIES[strategy]
    except KeyError:
        raise ValueError(f"unknown image_resize_strategy `{strategy}`; choose one of {STRATEGIES}") from None
    h, w = size
    return fn(image.convert("RGB"), h, w, fill)


def normalize(images_u8, mean: Sequence[float], std: Sequence[float]):
    """uint8 RGB ``(3, H, W)`` or ``(B, 3, H, W)`` tensor -> float, normalised by ``mean``/``std``; a batch comes back
    channels-last (the layout the backbones run in: ``toolkit.backbones.base.CHANNELS_LAST``)."""
    import torch

    x = images_u8.float() / 255.0
    m = torch.tensor(mean, device=x.device)[:, None, None]
    s = torch.tensor(std, device=x.device)[:, None, None]
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@functools.lru_cache(maxsize=64)
def _geometry_of(w0: int, h0: int, size: tuple[int, int], strategy: str) -> Geometry:
    """The geometry ``apply_geometry`` gives any image of ``w0 x h0`` (it depends on the sizes only)."""
    return apply_geometry(Image.new("RGB", (w0, h0)), size, strategy)[1]


def fit_batch(images, size: tuple[int, int], strategy: str, fill=0, mode: str = "bilinear"):
    """A batch ``(B, C, h, w)`` (uint8 images, or integer label maps with ``mode="nearest"``) onto ``size = (H, W)``
    through ``strategy``, with the geometry ``apply_geometry`` gives one image of that size. Resampled by torch
    (bilinear with antialiasing), so pixels differ slightly from PIL's bicubic; used where a whole training set is
    fed to a backbone configured at another size. ``fill``: a value per channel or one for all. A batch the strategy
    leaves unchanged comes back as is."""
    import torch
    import torch.nn.functional as F

    b, c, h0, w0 = images.shape
    g = _geometry_of(w0, h0, tuple(size), strategy)
    if (g.in_h, g.in_w, g.sx, g.sy, g.ox, g.oy) == (h0, w0, 1.0, 1.0, 0.0, 0.0):
        return images
    rh, rw = max(1, round(h0 * g.sy)), max(1, round(w0 * g.sx))
    x = images.float()
    if mode == "nearest":
        x = F.interpolate(x, size=(rh, rw), mode="nearest-exact")
    else:
        x = F.interpolate(x, size=(rh, rw), mode=mode, antialias=True, align_corners=False).round().clamp(0, 255)
    fill_t = torch.as_tensor(fill, dtype=x.dtype).reshape(-1, 1, 1).expand(c, 1, 1)
    out = fill_t.expand(c, g.in_h, g.in_w).repeat(b, 1, 1, 1)
    oy, ox = round(g.oy), round(g.ox)
    ys, xs, ye, xe = max(0, oy), max(0, ox), min(g.in_h, oy + rh), min(g.in_w, ox + rw)
    out[..., ys:ye, xs:xe] = x[..., ys - oy:ye - oy, xs - ox:xe - ox]
    return out.to(images.dtype)
