"""``ss2d_scan_attention_triton``: the SS2D scan's implicit attention (scan-path maps) in Triton, built on
``ss2d_scan_rows_triton``, its rows for a batch of query patches.

For direction k, query patch q at scan position i = i_k(q) and input position j <= i:
    alpha[i, j] = sum_n C_i[n] * w_j[n] * dt_j B_j[n],   w_j = prod_{m=j+1..i} exp(dt_m A[n]),
the definition that ``ss2d_scan_attention_ref`` evaluates in float64 from differences of cumulative sums.

A program owns (batch b, direction k, query q, a split of the channel blocks). It walks the scan backwards from the
query, in tiles of BLOCK_L positions read straight from the spatial layout through direction k's index map, and
carries w, the decay from the tile's end to i, as a running product of per-step decays exp(dt A) <= 1. Inside a
tile the decays come from a reverse cumulative sum of dt*A over at most BLOCK_L steps, so no long cumulative sum is
ever differenced: w's relative error stays about fp32 eps * (-log w + tiles crossed), where a difference of fp32
cumulative sums from position 0 errs by eps * |sum over 0..i| (on a 64x64 grid, relative errors of the map entries
above 1e-3 of the largest: 7e-7 here, 4e-5 for the reference's formula run in fp32). The program stops at
position 0, so a row costs O(i) and the full matrix (every cell as a query) O(L^2 / 2).
Rows land in spatial order: per channel through plain stores, or averaged over the channels through fp32 atomic
adds (the splits of one row meet there). All arithmetic is fp32 whatever the input dtype (fp32, bf16, fp16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cross_scan import K as _K
from .selective_scan_triton import _dt, _scan_pos

TARGET_PROGRAMS = 1024  # channel blocks are split over programs until about this many run (query mode: few rows)


@triton.jit
def _query_pos(p, g, H, W, L):
    """Scan position of spatial (row-major) index p in direction g: the inverse of ``_scan_pos``."""
    ll = tl.where(g % 2 == 1, (p % W) * H + p // W, p)
    return tl.where(g >= 2, L - 1 - ll, ll)


@triton.jit
def _rows_kernel(dt_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, q_ptr, out_ptr,
                 Dd, N, L, H, W, Q, n_split, K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, MEAN: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0)  # ((b, k), q): the rows of one (b, k) run side by side and share its dt, B in cache
    split = tl.program_id(1)
    q = pid % Q
    bk = pid // Q  # b * K + k
    k = bk % K
    bk64, pid64 = bk.to(tl.int64), pid.to(tl.int64)  # offsets: outputs of B*K*Q*D*L elements pass 2^31
    p_q = tl.load(q_ptr + q)  # spatial index of the query
    i = _query_pos(p_q, k, H, W, L)  # its scan position in direction k

    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    bc_base = bk64 * N * L + offs_n[:, None] * L
    Ci = tl.load(C_ptr + bk64 * N * L + offs_n * L + p_q, mask=mask_n, other=0.0).to(tl.float32)  # (BLOCK_N,)
    lane = tl.arange(0, BLOCK_L)
    n_t = i // BLOCK_L + 1  # tiles holding positions 0..i
    if MEAN:
        out_base = out_ptr + pid64 * L  # out (B, K, Q, L)
    else:
        out_base = out_ptr + pid64 * Dd * L  # out (B, K, Q, D, L)

    for db in range(split, tl.cdiv(Dd, BLOCK_D), n_split):
        offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < Dd
        ch = k * Dd + offs_d  # row of A / delta_bias
        A = tl.load(A_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_d[:, None] & mask_n[None, :],
                    other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
        bias = tl.zeros([BLOCK_D], tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
        dt_base = dt_ptr + (bk64 * Dd + offs_d[:, None]) * L
        carry = tl.full([BLOCK_D, BLOCK_N], 1.0, tl.float32)  # prod exp(dt_m A) over m after this tile, up to i
        for tt in range(n_t):
            t = n_t - 1 - tt
            l = t * BLOCK_L + lane
            valid = l <= i
            p = _scan_pos(l, k, H, W, L, True)
            m2 = mask_d[:, None] & valid[None, :]
            raw = tl.load(dt_base + p[None, :], mask=m2, other=0.0).to(tl.float32)
            dt = tl.where(m2, _dt(raw, bias[:, None], SOFTPLUS), 0.0)  # (BLOCK_D, BLOCK_L); 0 past i
            Bt = tl.load(B_ptr + bc_base + p[None, :], mask=mask_n[:, None] & valid[None, :],
                         other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_L)
            dA = dt[:, None, :] * A[:, :, None]  # (BLOCK_D, BLOCK_N, BLOCK_L) log-decays, 0 past i
            after = tl.cumsum(dA, axis=2, reverse=True) - dA  # sum over m = l+1 .. tile end, <= 0
            w = tl.exp(after) * carry[:, :, None]  # decay from l to i
            alpha = tl.sum(w * (Ci[:, None] * Bt)[None, :, :], axis=1) * dt  # (BLOCK_D, BLOCK_L)
            carry = carry * tl.exp(tl.sum(dA, axis=2))
            if MEAN:
                tl.atomic_add(out_base + p, tl.sum(alpha, axis=0), mask=valid, sem="relaxed")
            else:
                tl.store(out_base + offs_d[:, None] * L + p[None, :], alpha, mask=m2)


# (BLOCK_D, BLOCK_L) forced for every launch: tests use it to get many tiles and channel blocks on tiny grids
BLOCK_OVERRIDE: tuple[int, int] | None = None


def _blocks(Dd: int, N: int, L: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_L): long tiles, about 2048 fp32 elements per (BLOCK_D, BLOCK_N, BLOCK_L) tensor,
    as in ``selective_scan_triton._blocks``."""
    bn = triton.next_power_of_2(max(N, 1))
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE[0], bn, BLOCK_OVERRIDE[1]
    bl = min(256 if bn <= 2 else 128 if bn <= 4 else 64 if bn <= 8 else 32, triton.next_power_of_2(max(L, 2)))
    bd = max(1, min(triton.next_power_of_2(Dd), 2048 // (bn * bl)))
    return bd, bn, bl


def ss2d_scan_rows_triton(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          queries: torch.Tensor, delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                          channel_reduce: str = "mean") -> torch.Tensor:
    """Rows of the per-direction scan attention for a batch of query patches, in spatial order.

    delta: (B, K, D, H, W) raw dt; A: (K*D, N); B, C: (B, K, N, H, W); delta_bias: (K*D,); queries: (Q,) spatial
    (row-major) indices. Returns fp32 (B, K, Q, L) for ``channel_reduce="mean"``, (B, K, Q, D, L) for ``"none"``:
    [b, k, q, (d,) p] = weight of input cell p in direction k's output at query cell q.
    """
    Bb, K, Dd, H, W = delta.shape
    N, L, Q = A.shape[1], H * W, queries.numel()
    if K != _K:
        raise ValueError(f"delta has {K} directions; SS2D scans {_K} (delta (B, 4, D, H, W))")
    if channel_reduce not in ("mean", "none"):
        raise ValueError(f"channel_reduce={channel_reduce!r}; expected 'mean' or 'none'")
    if Q and not (0 <= int(queries.min()) and int(queries.max()) < L):
        raise ValueError(f"queries must be spatial indices in [0, {L}) of the {H}x{W} grid; got "
                         f"{int(queries.min())}..{int(queries.max())}")
    mean = channel_reduce == "mean"
    delta, A, B, C = (t.contiguous() for t in (delta, A, B, C))
    bias = None if delta_bias is None else delta_bias.contiguous()
    queries = queries.to(device=delta.device, dtype=torch.int32).contiguous()
    bd, bn, bl = _blocks(Dd, N, L)
    n_dblk = triton.cdiv(Dd, bd)
    n_split = max(1, min(n_dblk, triton.cdiv(TARGET_PROGRAMS, Bb * K * Q)))
    shape = (Bb, K, Q, L) if mean else (Bb, K, Q, Dd, L)
    out = torch.zeros(shape, device=delta.device, dtype=torch.float32)  # cells after the query stay 0
    if out.numel() == 0:
        return out
    grid = (Bb * K * Q, n_split)
    _rows_kernel[grid](delta, A, B, C, bias if bias is not None else A, queries, out,
                       Dd, N, L, H, W, Q, n_split, K=_K,
                       HAS_BIAS=bias is not None, SOFTPLUS=delta_softplus, MEAN=mean,
                       BLOCK_D=bd, BLOCK_N=bn, BLOCK_L=bl, num_warps=4)
    return out / Dd if mean else out


def ss2d_scan_attention_triton(delta, A, B, C, delta_bias=None, delta_softplus=True, query=None,
                               channel_reduce="mean"):
    """Same contract as ``ss2d_scan_attention_ref`` (arguments already checked by ``ss2d_scan_attention_fn``):
    query=(row, col) -> per (B, K, [D,] H, W), merged (B, [D,] H, W); query=None -> per (B, K, [D,] L, L),
    merged (B, [D,] L, L); fp32."""
    Bb, K, Dd, H, W = delta.shape
    L = H * W
    if query is not None:
        qs = torch.tensor([query[0] * W + query[1]], device=delta.device)
        rows = ss2d_scan_rows_triton(delta, A, B, C, qs, delta_bias, delta_softplus, channel_reduce)
        per = rows[:, :, 0].reshape(Bb, K, *rows.shape[3:-1], H, W)  # (B, K, [D,] H, W)
    else:
        rows = ss2d_scan_rows_triton(delta, A, B, C, torch.arange(L, device=delta.device), delta_bias,
                                     delta_softplus, channel_reduce)  # (B, K, L, [D,] L)
        per = rows if channel_reduce == "mean" else rows.transpose(2, 3).contiguous()  # (B, K, [D,] L, L)
    return per, per.sum(1)
