"""``ss2d_scan_ref``: VMamba's SS2D scan by its definition, cross-scan -> ``selective_scan_ref`` over the four
directions -> cross-merge; what the other backends are tested against."""
from __future__ import annotations

import torch

from .cross_scan import K, cross_merge, cross_scan, to_scan_order
from .selective_scan_ref import selective_scan_ref


def ss2d_scan_ref(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                  delta_softplus: bool = True) -> torch.Tensor:
    """SS2D scan (VMamba v2, channel-first): cross-scan -> selective scan per direction -> cross-merge.

    x: (B, D, H, W); delta: (B, K, D, H, W) raw dt in spatial layout; A: (K*D, N); B, C: (B, K, N, H, W) spatial;
    D, delta_bias: (K*D,). Direction k uses channels k*D..(k+1)*D-1 of A/D/delta_bias and B[:, k], C[:, k], each
    read in direction k's order. Returns y (B, D, H, W) in fp32 (fp64 for fp64 inputs).
    """
    Bb, Dd, H, W = x.shape
    L = H * W
    # Direction k's channels are rows k*D..(k+1)*D-1 of one (B, K*D, L) scan whose B/C groups are the directions.
    ys = selective_scan_ref(cross_scan(x).reshape(Bb, K * Dd, L), to_scan_order(delta).reshape(Bb, K * Dd, L),
                            A, to_scan_order(B), to_scan_order(C), D, delta_bias, delta_softplus)
    return cross_merge(ys.view(Bb, K, Dd, L), H, W).view(Bb, Dd, H, W)
