"""SS2D's scan orders, cross-scan and cross-merge in plain PyTorch: the layout that ``ss2d_scan_ref``,
``ss2d_scan_attention_ref`` and the "mamba" backend read, and that the torch and Triton paths reproduce in place.

Cross-scan order (VMamba ``scans=0``): direction 0 reads the grid row-major, 1 column-major, 2 and 3 are 0 and 1
reversed. Cross-merge maps each direction's outputs back onto the grid and sums them.
"""
from __future__ import annotations

import torch

K = 4  # SS2D directions


def to_scan_order(t: torch.Tensor) -> torch.Tensor:
    """Direction k's sequence of slice k: t (B, K, C, H, W) -> (B, K, C, L), L = H*W."""
    rows, cols = t.flatten(-2), t.transpose(-1, -2).flatten(-2)  # (B, K, C, L) each
    return torch.stack([rows[:, 0], cols[:, 1], rows[:, 2].flip(-1), cols[:, 3].flip(-1)], dim=1)


def to_grid_order(ys: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Inverse of ``to_scan_order``: ys (B, K, C, L) in scan order -> (B, K, C, H, W) on the grid."""
    Bb, _, C, _ = ys.shape
    row = lambda s: s.reshape(Bb, C, H, W)  # noqa: E731
    col = lambda s: s.reshape(Bb, C, W, H).transpose(-1, -2)  # noqa: E731
    return torch.stack([row(ys[:, 0]), col(ys[:, 1]), row(ys[:, 2].flip(-1)), col(ys[:, 3].flip(-1))], dim=1)


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """x (B, D, H, W) -> xs (B, K, D, L): the four scan-order copies of the grid."""
    return to_scan_order(x.unsqueeze(1).expand(-1, K, -1, -1, -1))


def cross_merge(ys: torch.Tensor, H: int | None = None, W: int | None = None) -> torch.Tensor:
    """Sum of the four directions mapped back onto the grid: ys (B, K, D, H, W) or (B, K, D, L) -> y (B, D, L).

    As in VMamba, a 5-D ``ys`` only carries the grid size: its last two dims are still the scan-order sequence.
    """
    if ys.dim() == 5:
        H, W = ys.shape[-2:]
        ys = ys.flatten(-2)
    if H is None or W is None:
        raise ValueError(f"cross_merge needs H and W for ys of shape {tuple(ys.shape)}")
    return to_grid_order(ys, H, W).sum(1).flatten(-2)
