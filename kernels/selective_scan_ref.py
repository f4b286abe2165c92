"""``selective_scan_ref``: the selective scan (S6) by its definition, a loop over positions; what the other backends
are tested against. Slow on purpose: nothing in it is there for speed."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def acc_dtype(u: torch.Tensor) -> torch.dtype:
    """State/output dtype: fp32 for fp32/bf16/fp16 inputs; fp64 inputs stay fp64 (so gradcheck can run)."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _expand_groups(BC: torch.Tensor, Dd: int) -> torch.Tensor:
    """B or C, (B, N, L) or grouped (B, G, N, L) -> per channel (B, D, N, L) (channel d uses group d // (D/G))."""
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    Bb, G, N, L = BC.shape
    if Dd % G:
        raise ValueError(f"{Dd} channels do not split into {G} groups of B/C")
    return BC.unsqueeze(2).expand(Bb, G, Dd // G, N, L).reshape(Bb, Dd, N, L)


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                       delta_softplus: bool = False) -> torch.Tensor:
    """Sequential selective scan, the definition: h_l = exp(dt_l A) h_{l-1} + dt_l B_l u_l,  y_l = C_l . h_l + D u_l.

    u, delta: (B, D, L); A: (D, N); B, C: (B, N, L) or grouped (B, G, N, L); D, delta_bias: (D,);
    dt = softplus(delta + delta_bias) when ``delta_softplus``. Returns y (B, D, L) in fp32 (fp64 for fp64 inputs),
    the state in the same dtype.
    """
    acc = acc_dtype(u)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    a = (dt[:, :, None, :] * A.to(acc)[None, :, :, None]).exp()  # (B, D, N, L)
    dBu = (dt * u.to(acc))[:, :, None, :] * _expand_groups(B.to(acc), u.shape[1])
    Cx = _expand_groups(C.to(acc), u.shape[1])
    h = torch.zeros_like(dBu[..., 0])  # (B, D, N)
    ys = []
    for i in range(u.shape[-1]):
        h = a[..., i] * h + dBu[..., i]
        ys.append((h * Cx[..., i]).sum(-1))
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    return y if D is None else y + u.to(acc) * D.to(acc)[:, None]
