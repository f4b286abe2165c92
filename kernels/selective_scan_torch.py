"""``selective_scan_torch``: the selective scan in plain PyTorch, vectorised over batch, channels and state,
position-major, with a hand-written backward; fast enough to train a small VMamba on a CPU. Never imports Triton."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .selective_scan_ref import acc_dtype


def _chunk_len(L: int) -> int:
    """~sqrt(L) balances the two sequential loops (T steps inside chunks, L/T steps across them)."""
    return max(1, math.isqrt(L - 1) + 1) if L > 1 else 1


def _recurrence_chunked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h_l = a_l h_{l-1} + b_l`` over dim 0 of (L, M) tensors in two levels, for GPUs (few, wide launches).

    Every chunk of T steps is scanned from a zero state (all chunks at once, T vector steps), then the chunk-end
    states are carried across chunks (L/T small steps) and added back through the cumulative decay. Only products
    of decays <= 1 appear, so nothing overflows, unlike exp(cumsum) differences over long sequences.
    """
    L, M = a.shape
    T = _chunk_len(L)
    nc = -(-L // T)
    pad = (0, 0, 0, nc * T - L)
    a = F.pad(a, pad, value=1.0).view(nc, T, M).permute(1, 2, 0).contiguous()  # (T, M, nc)
    h = F.pad(b, pad).view(nc, T, M).permute(1, 2, 0).contiguous()  # local states, filled in place
    for t in range(1, T):
        h[t].addcmul_(a[t], h[t - 1])
    decay = torch.cumprod(a, dim=0)  # (T, M, nc): decay from each chunk's start to step t
    carry = torch.zeros_like(h[0])  # (M, nc): state entering each chunk
    for c in range(1, nc):
        carry[:, c] = torch.addcmul(h[-1, :, c - 1], decay[-1, :, c - 1], carry[:, c - 1])
    h.addcmul_(decay, carry)
    return h.permute(2, 0, 1).reshape(nc * T, M)[:L]


def _recurrence(a: torch.Tensor, b: torch.Tensor, adjoint: bool = False, chunked: bool | None = None) -> torch.Tensor:
    """The linear recurrence at the heart of the scan, over dim 0 of (L, M) fp32/fp64 tensors, a in [0, 1].

    Forward: ``h_l = a_l h_{l-1} + b_l`` (h_{-1} = 0). ``adjoint``: ``h_l = a_{l+1} h_{l+1} + b_l`` (h_L = 0), the
    same recurrence run backwards, which is the gradient of the forward one.
    On the CPU each step is one fused multiply-add over a contiguous M-wide slice: at VMamba's shapes that beats the
    two-level chunked scan, whose layout changes cost more than its fewer steps save (benchmarks/RESULTS.md,
    "Measurements that were in docstrings"). On a GPU (``chunked`` None follows the device) the chunked form keeps kernel launches to
    about 2*sqrt(L).
    """
    if a.is_cuda if chunked is None else chunked:
        if not adjoint:
            return _recurrence_chunked(a, b)
        a_next = F.pad(a[1:], (0, 0, 0, 1))  # decay applied when leaving step l
        return _recurrence_chunked(a_next.flip(0), b.flip(0)).flip(0)
    h = b.clone()
    if adjoint:
        for t in range(h.shape[0] - 2, -1, -1):
            h[t].addcmul_(a[t + 1], h[t + 1])
    else:
        for t in range(1, h.shape[0]):
            h[t].addcmul_(a[t], h[t - 1])
    return h


class _Recurrence(torch.autograd.Function):
    """Autograd for ``_recurrence``: dL/db = the adjoint recurrence of dL/dh, dL/da_l = that times h_{l-1}."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = _recurrence(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        a, h = ctx.saved_tensors
        g = _recurrence(a, dh.contiguous(), adjoint=True)
        da = torch.empty_like(g)
        da[0] = 0
        torch.mul(g[1:], h[:-1], out=da[1:])
        return da, g


def scan_lfirst(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """The selective scan without its skip term, position-major so every step reads contiguous memory.

    u, delta: (L, B, D) contiguous, in the accumulation dtype; A: (D, N); B, C: (L, B, G, N), group g serving
    channels g*D/G..(g+1)*D/G-1. Returns y (L, B, D).
    """
    L, Bb, Dd = u.shape
    G, N = B.shape[-2:]
    if Dd % G:
        raise ValueError(f"{Dd} channels do not split into {G} groups of B/C")
    dt = delta if delta_bias is None else delta + delta_bias.to(delta.dtype)
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.reshape(L, Bb, G, Dd // G, 1)
    a = torch.exp(dt * A.to(dt.dtype).reshape(G, Dd // G, N))  # (L, B, G, D/G, N)
    b = (dt * u.reshape(L, Bb, G, Dd // G, 1)) * B.to(dt.dtype).reshape(L, Bb, G, 1, N)
    h = _Recurrence.apply(a.reshape(L, -1), b.reshape(L, -1)).view(L, Bb, G, Dd // G, N)
    return (h * C.to(h.dtype).reshape(L, Bb, G, 1, N)).sum(-1).view(L, Bb, Dd)


def selective_scan_torch(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                         delta_softplus: bool = False) -> torch.Tensor:
    """Same function and shapes as ``selective_scan_ref``, vectorised over batch, channels and state, with the
    adjoint recurrence as its backward; any device."""
    acc = acc_dtype(u)
    BC = (B, C) if B.dim() == 4 else (B.unsqueeze(1), C.unsqueeze(1))  # (B, G, N, L)
    lfirst = lambda t: t.to(acc).permute(-1, *range(t.dim() - 1)).contiguous()  # noqa: E731  (..., L) -> (L, ...)
    y = scan_lfirst(lfirst(u), lfirst(delta), A.to(acc), lfirst(BC[0]), lfirst(BC[1]), delta_bias, delta_softplus)
    y = y.permute(1, 2, 0)  # (B, D, L)
    return (y if D is None else y + u.to(acc) * D.to(acc)[:, None]).contiguous()
