"""Maps and boxes drawn on the ORIGINAL image.

Every map of ``toolkit.interpret`` covers the model's input frame, letterbox padding included, at its own
resolution (a token grid, a scan block's grid, or input pixels). ``map_on_original`` samples it at the original
image's pixels through the inverse of the image's ``Geometry``, so padding drops out and the map lands where
the model saw it. Plot axes are in original pixels, so boxes need no conversion.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from PIL import Image

from toolkit.geometry import Geometry

PRED_COLOR, GT_COLOR = "#00e5ff", "#ffd400"


def display_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size = (W, H)`` scaled down so that its longer side is at most ``max_side``."""
    w, h = size
    s = min(1.0, max_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def map_on_original(m: torch.Tensor, geom: Geometry, size: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """A map ``(h, w)`` over the input frame -> ``(H, W)`` samples at the centres of a ``size = (W, H)`` grid
    laid over the original image: upsampling the map, then cropping off the padding, in one step. ``nearest``
    keeps each token a visible patch; ``bilinear`` smooths. Pixels a crop cut off are NaN (drawn transparent)."""
    w_out, h_out = size
    x0 = (torch.arange(w_out, dtype=torch.float64) + 0.5) * geom.orig_w / w_out  # original pixels
    y0 = (torch.arange(h_out, dtype=torch.float64) + 0.5) * geom.orig_h / h_out
    gx = 2 * (x0 * geom.sx + geom.ox) / geom.in_w - 1  # input frame, grid_sample's [-1, 1] (align_corners=False)
    gy = 2 * (y0 * geom.sy + geom.oy) / geom.in_h - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None].float()  # (1, H, W, 2) as (x, y)
    out = F.grid_sample(m.detach().float().cpu()[None, None], grid, mode=mode, padding_mode="border",
                        align_corners=False)[0, 0]  # (H, W)
    out[(gy.abs() > 1)[:, None] | (gx.abs() > 1)[None, :]] = float("nan")  # cropped away: the model never saw it
    return out.numpy()


def image_trace(image: Image.Image, max_side: int = 512) -> go.Image:
    """The image as a JPEG-backed trace whose axes are in original pixels (compact: no per-pixel JSON)."""
    w0, h0 = image.size
    small = image.convert("RGB").resize(display_size(image.size, max_side), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)  # a quarter of a PNG's size in the figure's JSON
    dx, dy = w0 / small.width, h0 / small.height
    return go.Image(source="data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(),
                    x0=dx / 2, y0=dy / 2, dx=dx, dy=dy, hoverinfo="skip")


def heatmap_trace(m: torch.Tensor, geom: Geometry, *, side: int = 128, colorscale: str = "Inferno",
                  zmid: float | None = None, opacity: float = 0.55, name: str = "") -> go.Heatmap:
    """A translucent heatmap of ``m`` over the original image, sampled on a grid of at most ``side`` cells."""
    w, h = display_size((geom.orig_w, geom.orig_h), side)
    z = map_on_original(m, geom, (w, h))
    dx, dy = geom.orig_w / w, geom.orig_h / h
    return go.Heatmap(z=z, x0=dx / 2, dx=dx, y0=dy / 2, dy=dy, colorscale=colorscale, zmid=zmid, opacity=opacity,
                      showscale=False, zsmooth=False, name=name, hovertemplate="%{z:.3f}<extra>" + name + "</extra>")


def cell_box(cell: tuple[int, int], grid: tuple[int, int], geom: Geometry) -> tuple[float, float, float, float]:
    """The original-pixel box of token ``cell = (row, col)`` of a ``grid`` laid over the input frame."""
    (r, c), (xs, ys) = cell, geom.cell_edges(grid)
    return (float(xs[c]), float(ys[r]), float(xs[c + 1]), float(ys[r + 1]))


def box_shapes(pred_box=None, gt_box=None, query_box=None) -> list[dict]:
    """Labelled rectangles (original pixels): predicted (solid), ground-truth (dashed) and query patch (dotted
    white)."""
    out = []
    for box, color, dash, text in ((pred_box, PRED_COLOR, "solid", "predicted"), (gt_box, GT_COLOR, "dash", "truth"),
                                   (query_box, "white", "dot", "")):
        if box is not None:
            x1, y1, x2, y2 = box
            out.append(dict(type="rect", x0=x1, y0=y1, x1=x2, y1=y2, line=dict(color=color, width=2, dash=dash),
                            label=dict(text=text, textposition="top left", font=dict(size=9, color=color))))
    return out
