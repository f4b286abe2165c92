"""``ss2d_scan_triton``: VMamba's SS2D scan on ``selective_scan_triton``'s kernel pair, run with the 4 directions as
its groups so that cross-scan and cross-merge happen inside the kernel (see that module)."""
from __future__ import annotations

import torch

from .cross_scan import K
from .selective_scan_triton import _FusedScan


def ss2d_scan_triton(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                     delta_softplus: bool = True) -> torch.Tensor:
    """Same contract as ``ss2d_scan_ref``: x (B, D, H, W), delta (B, 4, D, H, W), A (4D, N),
    B, C (B, 4, N, H, W), D, delta_bias (4D,) -> y (B, D, H, W) fp32."""
    Bb, Dd, H, W = x.shape
    L = H * W
    N = A.shape[1]
    y = _FusedScan.apply(x.reshape(Bb, Dd, L), delta.reshape(Bb, K * Dd, L), A, B.reshape(Bb, K, N, L),
                         C.reshape(Bb, K, N, L), D, delta_bias, delta_softplus, True, H, W)
    return y.view(Bb, Dd, H, W)
