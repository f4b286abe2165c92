"""Scan paths: the implicit attention of a 2-D selective scan (SS2D) from one query patch, per scan direction.

A selective scan mixes tokens through ``alpha[i, j] = C_i . prod_{k=j+1..i} exp(delta_k A) . delta_j B_j``
along each of its K=4 directions; the row of the query patch, put back on the 2-D grid, shows which patches
feed it and along which path. The math lives in ``toolkit_kernels.ss2d_scan_attention_fn``; this module only
captures each scan module's input (the ``scan_modules()`` contract), asks the module for its scan inputs
(``ssm_inputs``) and places the query. Scans whose inputs are not in the 2-D layout (MambaVision's 1-D scans
over windows) are skipped with a reason.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from toolkit_kernels import ss2d_scan_attention_fn


@dataclass(frozen=True)
class ScanPath:
    """One scan module's implicit attention from a query patch, on that module's own grid."""

    per_direction: torch.Tensor  # (K, h_s, w_s)
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


@torch.no_grad()
def scan_paths_from_inputs(backbone, inputs: dict[str, torch.Tensor], point: tuple[float, float]
                           ) -> tuple[dict[str, ScanPath], dict[str, str]]:
    """Scan paths from the patch at ``point = (y, x)`` (input-frame [0, 1] coordinates) for every captured module.

    Returns (module name -> ScanPath, module name -> why skipped), in the backbone's order (the tap last).
    """
    paths, skipped = {}, {}
    for name, mod in backbone.scan_modules():
        if name not in inputs:
            continue
        s = mod.ssm_inputs(inputs[name][:1])
        if s["delta"].dim() != 5:  # (B, K, D, H, W) is the 2-D layout the SS2D kernel reads
            skipped[name] = f"scan inputs are not 2-D (delta {tuple(s['delta'].shape)})"
            continue
        grid = tuple(s["delta"].shape[-2:])
        q = cell_of(point, grid)
        per, merged = ss2d_scan_attention_fn(s["delta"], s["A"], s["B"], s["C"], delta_bias=s["delta_bias"],
                                             delta_softplus=True, query=q)  # (1, K, h, w), (1, h, w)
        paths[name] = ScanPath(per[0].float().cpu(), merged[0].float().cpu(), q, grid)
    return paths, skipped


@torch.no_grad()
def scan_paths(backbone, pixels: torch.Tensor, point: tuple[float, float] = (0.5, 0.5)
               ) -> tuple[dict[str, ScanPath], dict[str, str]]:
    """Scan paths of every scan module for one normalised image ``pixels (3, H, W)``; empty without scan modules."""
    with capture_scan_inputs(backbone) as inputs:
        backbone(pixels[None])
    return scan_paths_from_inputs(backbone, inputs, point)
