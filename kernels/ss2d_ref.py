"""Plain-PyTorch reference of the selective scan (S6) and of VMamba's SS2D scan; never imports Triton.

Two paths compute the same function:
- ``selective_scan_ref``: a sequential loop over positions, the definition of correct (slow, kept short).
- ``selective_scan_chunked``: a two-level chunked scan with a hand-written backward, fast enough to train a small
  VMamba on a CPU. It is also what ``backend="ref"`` runs, on any device.

SS2D cross-scan order (VMamba ``scans=0``): direction 0 reads the grid row-major, 1 column-major, 2 and 3 are 0 and
1 reversed. Cross-merge maps each direction's outputs back onto the grid and sums them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def cross_scan_ref(x: torch.Tensor) -> torch.Tensor:
    """x (B, D, H, W) -> xs (B, K, D, L): the four scan-order copies of the grid."""
    return to_scan_order(x.unsqueeze(1).expand(-1, K, -1, -1, -1))


def cross_merge_ref(ys: torch.Tensor, H: int | None = None, W: int | None = None) -> torch.Tensor:
    """Sum of the four directions mapped back onto the grid: ys (B, K, D, H, W) or (B, K, D, L) -> y (B, D, L).

    As in VMamba, a 5-D ``ys`` only carries the grid size: its last two dims are still the scan-order sequence.
    """
    if ys.dim() == 5:
        H, W = ys.shape[-2:]
        ys = ys.flatten(-2)
    if H is None or W is None:
        raise ValueError(f"cross_merge_ref needs H and W for ys of shape {tuple(ys.shape)}")
    return to_grid_order(ys, H, W).sum(1).flatten(-2)


def _expand_groups(BC: torch.Tensor, Dd: int) -> torch.Tensor:
    """B or C, (B, N, L) or grouped (B, G, N, L) -> per channel (B, D, N, L) (channel d uses group d // (D/G))."""
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    Bb, G, N, L = BC.shape
    if Dd % G:
        raise ValueError(f"{Dd} channels do not split into {G} groups of B/C")
    return BC.unsqueeze(2).expand(Bb, G, Dd // G, N, L).reshape(Bb, Dd, N, L)


def _acc(u: torch.Tensor) -> torch.dtype:
    """State/output dtype: fp32 for fp32/bf16/fp16 inputs; fp64 inputs stay fp64 (so gradcheck can run)."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _discretise(u, delta, A, B, delta_bias, delta_softplus):
    """Log-decays dA = dt*A and inputs dBu = dt*B*u, both (B, D, N, L), in the accumulation dtype."""
    acc = _acc(u)
    u, dt = u.to(acc), delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dA = dt[:, :, None, :] * A.to(acc)[None, :, :, None]
    dBu = (dt * u)[:, :, None, :] * _expand_groups(B.to(acc), u.shape[1])
    return dA, dBu


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                       delta_softplus: bool = False) -> torch.Tensor:
    """Sequential selective scan, the definition: h_l = exp(dt_l A) h_{l-1} + dt_l B_l u_l,  y_l = C_l . h_l + D u_l.

    u, delta: (B, D, L); A: (D, N); B, C: (B, N, L) or grouped (B, G, N, L); D, delta_bias: (D,);
    dt = softplus(delta + delta_bias) when ``delta_softplus``. Returns y (B, D, L) in fp32 (fp64 for fp64 inputs), the state in the same dtype.
    """
    dA, dBu = _discretise(u, delta, A, B, delta_bias, delta_softplus)
    Cx = _expand_groups(C.to(dA.dtype), u.shape[1])  # (B, D, N, L)
    a = dA.exp()
    h = torch.zeros_like(dBu[..., 0])  # (B, D, N)
    ys = []
    for i in range(u.shape[-1]):
        h = a[..., i] * h + dBu[..., i]
        ys.append((h * Cx[..., i]).sum(-1))
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    return y if D is None else y + u.to(y.dtype) * D.to(y.dtype)[:, None]


def _chunk_len(L: int) -> int:
    """~sqrt(L) balances the two sequential loops (T steps inside chunks, L/T steps across them)."""
    return max(1, math.isqrt(L - 1) + 1) if L > 1 else 1


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_l = a_l h_{l-1} + b_l along the last dim (h_{-1} = 0), a in [0, 1]; a, b: (M, L) fp32 -> h (M, L).

    Two levels: every chunk of T steps is scanned from a zero state (all chunks at once, T vector steps), then the
    chunk-end states are carried across chunks (L/T small steps) and added back through the cumulative decay.
    Only products of decays <= 1 appear, so nothing overflows, unlike exp(cumsum) differences over long sequences.
    """
    M, L = a.shape
    T = _chunk_len(L)
    nc = -(-L // T)
    a = F.pad(a, (0, nc * T - L), value=1.0).view(M, nc, T).permute(2, 0, 1).contiguous()  # (T, M, nc)
    h = F.pad(b, (0, nc * T - L)).view(M, nc, T).permute(2, 0, 1).contiguous()  # local states, filled in place
    for t in range(1, T):
        h[t].addcmul_(a[t], h[t - 1])
    decay = torch.cumprod(a, dim=0)  # (T, M, nc): decay from each chunk's start to step t
    carry = torch.zeros_like(h[0])  # (M, nc): state entering each chunk
    for c in range(1, nc):
        carry[:, c] = torch.addcmul(h[-1, :, c - 1], decay[-1, :, c - 1], carry[:, c - 1])
    h.addcmul_(decay, carry)
    return h.permute(1, 2, 0).reshape(M, nc * T)[:, :L]


class _LinearScan(torch.autograd.Function):
    """Autograd for ``_linear_scan``: the adjoint is the same scan run backwards, g_l = dh_l + a_{l+1} g_{l+1}."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = _linear_scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        a, h = ctx.saved_tensors
        a_next = F.pad(a[:, 1:], (0, 1))  # (M, L): decay applied when leaving step l
        g = _linear_scan(a_next.flip(-1), dh.flip(-1)).flip(-1)  # dL/dh_l, all paths
        h_prev = F.pad(h[:, :-1], (1, 0))
        return g * h_prev, g


def selective_scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                           delta_softplus: bool = False) -> torch.Tensor:
    """Same function and shapes as ``selective_scan_ref``, vectorised: a two-level chunked scan (about 2*sqrt(L)
    Python steps over (B*D*N)-wide tensors instead of L) with the reverse scan as its backward."""
    dA, dBu = _discretise(u, delta, A, B, delta_bias, delta_softplus)
    Bb, Dd, N, L = dBu.shape
    h = _LinearScan.apply(dA.exp().reshape(-1, L), dBu.reshape(-1, L)).view(Bb, Dd, N, L)
    y = (h * _expand_groups(C.to(h.dtype), Dd)).sum(2)  # (B, D, L)
    return y if D is None else y + u.to(y.dtype) * D.to(y.dtype)[:, None]


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
    y = selective_scan_chunked(cross_scan_ref(x).reshape(Bb, K * Dd, L), to_scan_order(delta).reshape(Bb, K * Dd, L),
                               A, to_scan_order(B), to_scan_order(C), D, delta_bias, delta_softplus)
    return cross_merge_ref(y.view(Bb, K, Dd, L), H, W).view(Bb, Dd, H, W)
