"""``ss2d_scan_torch``: VMamba's SS2D scan in plain PyTorch, built on ``selective_scan_torch``'s position-major
scan with the cross-scan and cross-merge done as layout changes of that order. Never imports Triton."""
from __future__ import annotations

import torch

from .cross_scan import K
from .selective_scan_ref import acc_dtype
from .selective_scan_torch import scan_lfirst


def to_scan_order_lfirst(t: torch.Tensor) -> torch.Tensor:
    """``to_scan_order`` laid out position-major: t (B, K, C, H, W), or (B, C, H, W) read by every direction,
    -> (L, B, K, C). ``unbind`` rather than indexing: its backward is one ``stack``, not K zero-filled copies."""
    H, W = t.shape[-2:]
    rows = lambda s: s.permute(2, 3, 0, 1).flatten(0, 1)  # noqa: E731  (B, C, H, W) -> (L, B, C), row-major
    cols = lambda s: s.permute(3, 2, 0, 1).flatten(0, 1)  # noqa: E731  column-major
    if t.dim() == 4:
        r, c = rows(t), cols(t)
        parts = (r, c, r, c)
    else:
        t0, t1, t2, t3 = t.unbind(1)
        parts = (rows(t0), cols(t1), rows(t2), cols(t3))
    return torch.stack([parts[0], parts[1], parts[2].flip(0), parts[3].flip(0)], dim=2)


def to_grid_merged_lfirst(ys: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Cross-merge of position-major outputs: ys (L, B, K, C) -> the directions' sum on the grid (B, C, H, W)."""
    _, Bb, _, C = ys.shape
    y0, y1, y2, y3 = ys.unbind(2)
    by_rows = (y0 + y2.flip(0)).view(H, W, Bb, C)  # directions 0 and 2 both end up in row-major order
    by_cols = (y1 + y3.flip(0)).view(W, H, Bb, C).transpose(0, 1)
    return (by_rows + by_cols).permute(2, 3, 0, 1).contiguous()


def ss2d_scan_torch(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                    delta_softplus: bool = True) -> torch.Tensor:
    """``ss2d_scan_ref``'s contract (shapes, dtypes, directions), vectorised: all four directions as one
    L-first scan with a hand-written backward."""
    Bb, Dd, H, W = x.shape
    L, acc = H * W, acc_dtype(x)
    xs = to_scan_order_lfirst(x.to(acc)).view(L, Bb, K * Dd)
    ds = to_scan_order_lfirst(delta.to(acc)).view(L, Bb, K * Dd)
    ys = scan_lfirst(xs, ds, A.to(acc), to_scan_order_lfirst(B.to(acc)), to_scan_order_lfirst(C.to(acc)),
                     delta_bias, delta_softplus)
    y = to_grid_merged_lfirst(ys.view(L, Bb, K, Dd), H, W)
    # The skip term D_k * x is the same grid map in every direction, so it merges before the scan order is left.
    return y if D is None else y + x.to(acc) * D.to(acc).view(K, Dd).sum(0)[:, None, None]
