"""``ss2d_scan_attention_ref``: the implicit attention of VMamba's SS2D selective scan by its definition.

For one direction, output position i and input position j <= i (scan order):
    alpha[i, j] = sum_n C[i, n] * exp(sum_{k=j+1..i} dt_k A[n]) * dt_j B[j, n],
so the scan output before the D skip is y_i = sum_j alpha[i, j] u_j, channel by channel. The four directions are
mapped back onto the grid: rows and columns of the maps are spatial (row-major) indices.

The definition is already a handful of vectorised float64 ops on (D, N, L) tensors (any device), so this op has no
separate ``torch`` backend; ``ss2d_scan_attention_triton`` walks the scan backwards from each query in fp32, O(i) per
row, without the (D, N, L, L) intermediates of the full matrix here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cross_scan import K, to_scan_order


def _scan_terms(delta, A, B, C, delta_bias, delta_softplus):
    """Per direction, in scan order and float64: cumulative log-decay S (B, K, D, N, L), dt*B (B, K, D, N, L),
    C (B, K, 1, N, L).

    float64 keeps S_i - S_j exact enough over long sequences (it is <= 0 for j <= i, so exp never overflows).
    """
    Bb, _, Dd, H, W = delta.shape
    dt = delta.double()
    if delta_bias is not None:
        dt = dt + delta_bias.double().view(1, K, Dd, 1, 1)
    if delta_softplus:
        dt = F.softplus(dt)
    dt = to_scan_order(dt)  # (B, K, D, L)
    S = torch.cumsum(dt[:, :, :, None, :] * A.double().view(1, K, Dd, -1, 1), dim=-1)
    dtB = dt[:, :, :, None, :] * to_scan_order(B.double())[:, :, None]
    return S, dtB, to_scan_order(C.double())[:, :, None]


def _spatial_to_scan(H: int, W: int, device) -> torch.Tensor:
    """pos (K, L): pos[k, p] = scan-order position of spatial (row-major) index p in direction k."""
    perm = to_scan_order(torch.arange(H * W, device=device).view(1, 1, 1, H, W).expand(1, K, 1, H, W))[0, :, 0]
    return torch.argsort(perm, dim=-1)


def ss2d_scan_attention_ref(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                            delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                            query: tuple[int, int] | None = None, channel_reduce: str = "mean"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, in float64 on delta's device: same contract as ``ss2d_scan_attention_fn`` (arguments checked
    there)."""
    Bb, _, Dd, H, W = delta.shape
    L = H * W
    S, dtB, Cs = _scan_terms(delta, A, B, C, delta_bias, delta_softplus)
    pos = _spatial_to_scan(H, W, delta.device)  # (K, L)
    reduce = (lambda t: t.mean(2)) if channel_reduce == "mean" else (lambda t: t)  # noqa: E731
    if query is not None:
        r, c = query
        i = pos[:, r * W + c].view(1, K, 1, 1, 1).expand(Bb, K, Dd, S.shape[3], 1)  # scan position per direction
        Si, Ci = S.gather(-1, i), Cs.gather(-1, i[:, :, :1])  # (B, K, D, N, 1), (B, K, 1, N, 1)
        j = torch.arange(L, device=delta.device)
        w = torch.where(j <= i, torch.exp((Si - S).clamp(max=0)), 0.0)  # (B, K, D, N, L) decay from j to i
        row = (Ci * w * dtB).sum(3)  # (B, K, D, L) in scan order
        per = row.gather(-1, pos.view(1, K, 1, L).expand(Bb, K, Dd, L)).view(Bb, K, Dd, H, W)
        per = reduce(per).float()
        return per, per.sum(1)
    tril = torch.ones(L, L, dtype=torch.bool, device=delta.device).tril()
    mats = []
    for k in range(K):  # one direction at a time bounds memory to (B, D, N, L, L)
        Sk = S[:, k]  # (B, D, N, L)
        w = torch.where(tril, torch.exp((Sk[..., :, None] - Sk[..., None, :]).clamp(max=0)), 0.0)
        m = (Cs[:, k, ..., :, None] * w * dtB[:, k, ..., None, :]).sum(2)  # (B, D, L, L) in scan order
        p = pos[k]
        mats.append(m[..., p, :][..., :, p])  # rows and columns to spatial order
    per = reduce(torch.stack(mats, dim=1)).float()  # (B, K, [D,] L, L)
    return per, per.sum(1)
