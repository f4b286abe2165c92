"""Scan paths: the implicit attention of a selective scan from one query patch, per scan direction.

A selective scan mixes tokens through ``alpha[i, j] = C_i . prod_{k=j+1..i} exp(delta_k A) . delta_j B_j``
along each of its directions; the row of the query patch, put back on the 2-D grid, shows which patches feed it
and along which path. The math lives in ``toolkit_kernels.ss2d_scan_attention_fn``; this module only captures each
scan module's input (the ``scan_modules()`` contract), asks the module for its scan inputs (``ssm_inputs``) and
places the query. Two kinds of scan are placed: SS2D (VMamba), four directions over the module's own 2-D grid, and
1-D scans over partitions of a stage grid that the backbone declares in ``scan_layouts()`` (MambaVision's windows),
one direction in the layout's token order. Other 1-D scans are skipped with a reason.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from toolkit.backbones.base import TokenLayout
from toolkit_kernels import ss2d_scan_attention_fn
from toolkit_kernels.cross_scan import K


@dataclass(frozen=True)
class ScanPath:
    """One scan module's implicit attention from a query patch, on that module's own grid."""

    per_direction: torch.Tensor  # (K, h_s, w_s): K = 4 for SS2D, 1 for a 1-D scan
    merged: torch.Tensor  # (h_s, w_s), the sum over directions (SS2D merges its directions by summing)
    query: tuple[int, int]  # (row, col) on (h_s, w_s)
    grid: tuple[int, int]


@contextmanager
def capture_scan_inputs(backbone) -> Iterator[dict[str, torch.Tensor]]:
    """While active, every forward of ``backbone`` stores the input of each of its ``scan_modules()``."""
    store: dict[str, torch.Tensor] = {}
    handles = [mod.register_forward_hook(lambda m, inp, out, name=name: store.__setitem__(name, inp[0].detach()))
               for name, mod in backbone.scan_modules()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def cell_of(point: tuple[float, float], grid: tuple[int, int]) -> tuple[int, int]:
    """The (row, col) cell of ``grid`` that holds ``point = (y, x)`` in [0, 1] coordinates of the input frame."""
    return tuple(min(int(p * g), g - 1) for p, g in zip(point, grid))  # type: ignore[return-value]


def scan_directions(backbone) -> dict[str, int]:
    """Scan module -> how many directions its scan runs: 1 for a 1-D scan with a layout, else SS2D's K = 4."""
    one_d = backbone.scan_layouts()
    return {name: 1 if name in one_d else K for name, _ in backbone.scan_modules()}


@torch.no_grad()
def scan_paths_from_inputs(backbone, inputs: dict[str, torch.Tensor], point: tuple[float, float],
                           img_size: tuple[int, int] | None = None
                           ) -> tuple[dict[str, ScanPath], dict[str, str]]:
    """Scan paths from the patch at ``point = (y, x)`` (input-frame [0, 1] coordinates) for every captured module
    of one image's forward at ``img_size`` (default: the backbone's configured size).

    Returns (module name -> ScanPath, module name -> why skipped), in the backbone's order (the tap last).
    """
    layouts = backbone.scan_layouts(img_size)
    paths, skipped = {}, {}
    for name, mod in backbone.scan_modules():
        if name not in inputs:
            continue
        if name in layouts:
            path = _partitioned_scan_path(mod, inputs[name], layouts[name], point)
        else:
            path = _ss2d_scan_path(mod, inputs[name][:1], point)
        if isinstance(path, str):
            skipped[name] = path
        else:
            paths[name] = path
    return paths, skipped


def _ss2d_scan_path(mod, x: torch.Tensor, point: tuple[float, float]) -> ScanPath | str:
    """An SS2D module's path for its input ``x`` of one image, or why it has none."""
    s = mod.ssm_inputs(x)
    if s["delta"].dim() != 5:  # (B, K, D, H, W) is the 2-D layout the SS2D kernel reads
        return f"scan inputs are not 2-D (delta {tuple(s['delta'].shape)}) and the backbone gives no scan layout"
    grid = tuple(s["delta"].shape[-2:])
    q = cell_of(point, grid)
    per, merged = ss2d_scan_attention_fn(s["delta"], s["A"], s["B"], s["C"], delta_bias=s["delta_bias"],
                                         delta_softplus=True, query=q)  # (1, K, h, w), (1, h, w)
    return ScanPath(per[0].float().cpu(), merged[0].float().cpu(), q, grid)


def _partitioned_scan_path(mod, x: torch.Tensor, layout: TokenLayout, point: tuple[float, float]) -> ScanPath | str:
    """A 1-D scan module's path for its input ``x (windows, n, C)`` of one image (one window per row, tokens in
    ``layout``'s order), on the layout's stage grid; zero outside the query's window (the scan never leaves it)
    and on padding tokens, which feed the scan but are no place of the image."""
    nw, n = layout.index.shape
    if tuple(x.shape[:2]) != (nw, n):
        return f"partitioned scan off its layout: {x.shape[0]} window(s) of {x.shape[1]} tokens, not {nw} of {n}"
    h, w = layout.grid
    q = cell_of(point, layout.grid)
    win, pos = (layout.index == q[0] * w + q[1]).nonzero()[0].tolist()
    row = _scan_row(mod.ssm_inputs(x[win:win + 1]), pos)  # (n,)
    idx = layout.index[win].to(row.device).clone()
    idx[idx < 0] = h * w  # one spare cell collects the padding, then goes
    m = torch.zeros(h * w + 1, device=row.device).index_put_((idx,), row)[:-1].reshape(h, w).cpu()
    return ScanPath(m[None], m, q, (h, w))


def _scan_row(s: dict[str, torch.Tensor], pos: int) -> torch.Tensor:
    """Row ``pos`` of a 1-D selective scan's implicit attention, channels averaged: ``(n,)`` from mamba-ssm layout
    inputs (delta ``(1, D, n)``, A ``(D, N)``, B and C ``(1, N, n)``). SS2D's direction 0 over a ``1 x n`` grid
    is exactly this scan, so the SS2D definition computes it (the other three directions are computed and
    dropped) rather than a second copy of the formula."""
    as_grid = lambda t: t[:, None, :, None, :].expand(-1, K, -1, -1, -1).contiguous()  # noqa: E731 (1, K, ., 1, n)
    per, _ = ss2d_scan_attention_fn(as_grid(s["delta"]), s["A"].repeat(K, 1), as_grid(s["B"]), as_grid(s["C"]),
                                    delta_bias=s["delta_bias"].repeat(K), delta_softplus=True, query=(0, pos))
    return per[0, 0, 0].float()  # (1, K, 1, n) -> direction 0


@torch.no_grad()
def scan_paths(backbone, pixels: torch.Tensor, point: tuple[float, float] = (0.5, 0.5)
               ) -> tuple[dict[str, ScanPath], dict[str, str]]:
    """Scan paths of every scan module for one normalised image ``pixels (3, H, W)``; empty without scan modules."""
    with capture_scan_inputs(backbone) as inputs:
        backbone(pixels[None])
    return scan_paths_from_inputs(backbone, inputs, point, tuple(pixels.shape[-2:]))
