"""Explanation scores: does a map point at the ground-truth object, and does the answer need what it points at?

``mass_in_box`` and ``pointing_game`` read a map ``(h, w)`` over the model's input frame against a box in the
original image's pixels, through the image's ``Geometry`` (``Geometry.cell_edges``: the same inverse map that
draws maps on the original image), so letterbox padding carries no weight. Both count positive values only.
``deletion_curves`` replaces the visual tokens a map ranks highest by the image's mean token and grounds again:
the sooner the IoU falls, the more the answer relied on what the map marked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from toolkit.geometry import Geometry
from toolkit.interpret.context import MapContext, grounding_iou

DELETION_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def _overlap(edges: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Length of each interval ``[edges[i], edges[i+1]]`` inside ``[lo, hi]``."""
    return (np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo)).clip(min=0)


def mass_in_box(map_hw: torch.Tensor, box: Sequence[float], geometry: Geometry) -> float:
    """Share of the map's positive mass that lies inside ``box`` (x1, y1, x2, y2 in original pixels).

    Each cell weighs its value times its area on the original image (a padding cell has none), and the part of that
    area inside the box counts as inside: the share a map drawn on the original image would show. NaN when no
    positive mass falls on the image.
    """
    v = torch.as_tensor(map_hw, dtype=torch.float64).clamp(min=0).numpy()
    xs, ys = geometry.cell_edges(v.shape)
    total = (v * np.outer(np.diff(ys), np.diff(xs))).sum()
    inside = (v * np.outer(_overlap(ys, box[1], box[3]), _overlap(xs, box[0], box[2]))).sum()
    return float(inside / total) if total > 0 else float("nan")


def pointing_game(map_hw: torch.Tensor, box: Sequence[float], geometry: Geometry) -> bool:
    """Whether the map's maximum points into ``box`` (original pixels): the centre of the argmax cell's part on the
    image lies inside the box, edges included.

    No pixel tolerance (the original pointing game's 15 px): the map's resolution is a cell (8-32 px of input),
    so the cell centre already is the pointing resolution, and a tolerance in pixels would favour coarse grids.
    Ties go to the first cell in row-major order; a flat map points nowhere and an argmax in the padding points off
    the image: both miss.
    """
    m = torch.as_tensor(map_hw, dtype=torch.float64)
    if m.max() == m.min():
        return False
    r, c = np.unravel_index(int(m.argmax()), tuple(m.shape))
    xs, ys = geometry.cell_edges(tuple(m.shape))
    if xs[c + 1] <= xs[c] or ys[r + 1] <= ys[r]:
        return False
    cx, cy = (xs[c] + xs[c + 1]) / 2, (ys[r] + ys[r + 1]) / 2
    return bool(box[0] <= cx <= box[2] and box[1] <= cy <= box[3])


def curve_auc(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``fractions``, divided by the fractions' span: the curve's mean, in
    [0, 1] for IoUs."""
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    return float(((v[1:] + v[:-1]) / 2 * np.diff(f)).sum() / (f[-1] - f[0]))


@dataclass(frozen=True)
class DeletionCurve:
    fractions: tuple[float, ...]
    deleted: tuple[int, ...]  # visual tokens replaced at each fraction: round(fraction * N)
    answers: tuple[str, ...]
    ious: tuple[float, ...]  # with the ground-truth box; 0 for an answer that is not a box

    @property
    def auc(self) -> float:
        """Lower: the answer lost its box sooner, i.e. the map ranked what the answer used first."""
        return curve_auc(self.fractions, self.ious)


def random_map(grid: tuple[int, int], seed: int) -> torch.Tensor:
    """A seeded uniform random ``(h, w)`` map: as a deletion ranking, the baseline a map should beat."""
    return torch.rand(grid, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
def deletion_curves(ctx: MapContext, maps: Mapping[str, torch.Tensor], gt_box: Sequence[float],
                    fractions: Sequence[float] = DELETION_FRACTIONS) -> dict[str, DeletionCurve]:
    """Per map ``(h, w)`` on ``ctx``'s tap grid, the deletion curve: for each fraction f, the top ``round(f * N)``
    visual tokens by the map's value (ties in row-major order) are replaced by the image's mean visual token and
    ``ctx.vlm`` generates the box again from ``ctx``'s prompt. Every map's every fraction goes through one
    ``generate`` call."""
    if not maps:
        return {}
    f = tuple(float(x) for x in fractions)
    if len(f) < 2 or any(b <= a for a, b in zip(f, f[1:])) or f[0] < 0 or f[-1] > 1:
        raise ValueError(f"fractions must increase within [0, 1], at least two of them; got {fractions}")
    tokens = ctx.tokens[0]  # (N, C_vis)
    n = tokens.shape[0]
    counts = tuple(round(x * n) for x in f)
    mean = tokens.mean(0)
    rows = []
    for name, m in maps.items():
        if tuple(m.shape) != tuple(ctx.grid):
            raise ValueError(f"map `{name}` is {tuple(m.shape)}, not on the {ctx.grid} tap grid")
        order = torch.argsort(m.flatten(), descending=True, stable=True).to(tokens.device)
        for k in counts:
            t = tokens.clone()
            t[order[:k]] = mean
            rows.append(t)
    answers = ctx.vlm.generate(torch.stack(rows), [ctx.prompt] * len(rows), ctx.max_new_tokens)
    out = {}
    for i, name in enumerate(maps):
        got = answers[i * len(f):(i + 1) * len(f)]
        ious = tuple(grounding_iou(ctx.vlm.read_box(a, ctx.geometry), gt_box) for a in got)
        out[name] = DeletionCurve(f, counts, tuple(got), ious)
    return out


def deletion_curve(ctx: MapContext, map_hw: torch.Tensor, gt_box: Sequence[float],
                   fractions: Sequence[float] = DELETION_FRACTIONS) -> DeletionCurve:
    """``deletion_curves`` of one map."""
    return deletion_curves(ctx, {"map": map_hw}, gt_box, fractions)["map"]
