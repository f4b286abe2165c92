"""``selective_scan_triton``: the fused Triton selective scan, whose kernel pair also runs SS2D for
``ss2d_scan_triton`` (cross-scan + 4 directional scans + cross-merge in one launch).

A program owns (batch b, group g, a block of channels) and walks the sequence in tiles of BLOCK_L positions: each
tile is loaded straight from the spatial layout through direction g's index map (so no cross-scanned copy is ever
written), scanned with ``tl.associative_scan`` and joined to the previous tile through the carried state. For SS2D
the groups are the 4 directions, x is shared by all of them (group stride 0) and the outputs of the 4 directions
meet in y through fp32 atomic adds (that is the cross-merge). For the 1-D scan the groups are mamba-ssm's B/C groups.

The backward walks the tiles in reverse: it recomputes each tile's states from the state saved at the tile's start
by the forward (one (channels, N) state per tile, a few KB), runs the adjoint recurrence g_l = dh_l + a_{l+1} g_{l+1}
as a reverse associative scan, and forms every gradient in the same pass. All arithmetic is fp32 whatever the input
dtype; the definitions it must match are ``selective_scan_ref`` and ``ss2d_scan_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) is applied first: h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_pos(l, g, H, W, L, SS2D: tl.constexpr):
    """Spatial (row-major) index read at scan position l by direction g: 0 rows, 1 columns, 2/3 those reversed."""
    if SS2D:
        ll = tl.where(g >= 2, L - 1 - l, l)
        return tl.where(g % 2 == 1, (ll % H) * W + ll // H, ll)
    else:
        return l


@triton.jit
def _dt(raw, bias, SOFTPLUS: tl.constexpr):
    z = raw + bias
    if SOFTPLUS:
        return tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(z)))
    else:
        return z


@triton.jit
def _program_channels(A_ptr, D_ptr, bias_ptr, G, Dg, N, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch b, group g, channel block (ch indexes A, D, delta_bias and delta) and its parameters."""
    pid_bg = tl.program_id(0)
    b = pid_bg // G
    g = pid_bg % G
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Dg
    mask_n = offs_n < N
    ch = g * Dg + offs_d
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    return b, g, offs_d, offs_n, mask_d, mask_n, ch, mask_dn, A, bias, Dv


@triton.jit
def _fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, hs_ptr,
                G, Dg, N, L, H, W, su_b, su_g, n_tiles,
                SS2D: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    b, g, offs_d, offs_n, mask_d, mask_n, ch, mask_dn, A, bias, Dv = _program_channels(
        A_ptr, D_ptr, bias_ptr, G, Dg, N, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)

    u_base = u_ptr + b * su_b + g * su_g + offs_d[:, None] * L
    y_base = y_ptr + b * su_b + g * su_g + offs_d[:, None] * L
    dt_base = dt_ptr + (b * G * Dg + ch[:, None]) * L
    bc_off = (b * G + g) * N * L + offs_n[:, None] * L
    hs_base = hs_ptr + (b * G + g) * n_tiles * Dg * BLOCK_N + offs_d[:, None] * BLOCK_N + offs_n[None, :]

    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for t in range(n_tiles):
        tl.store(hs_base + t * Dg * BLOCK_N, h, mask=mask_d[:, None])  # state entering tile t, for the backward
        l = t * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = l < L
        p = _scan_pos(l, g, H, W, L, SS2D)
        m2 = mask_d[:, None] & mask_l[None, :]
        u = tl.load(u_base + p[None, :], mask=m2, other=0.0).to(tl.float32)
        dt = _dt(tl.load(dt_base + p[None, :], mask=m2, other=0.0).to(tl.float32), bias[:, None], SOFTPLUS)
        dt = tl.where(m2, dt, 0.0)
        mnl = mask_n[:, None] & mask_l[None, :]
        Bt = tl.load(B_ptr + bc_off + p[None, :], mask=mnl, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_off + p[None, :], mask=mnl, other=0.0).to(tl.float32)
        dA = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L)
        dBu = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, h_loc = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
        hh = h_loc + a_cum * h[:, :, None]
        y = tl.sum(hh * Ct[None, :, :], axis=1) + Dv[:, None] * u
        if SS2D:
            tl.atomic_add(y_base + p[None, :], y, mask=m2, sem="relaxed")
        else:
            tl.store(y_base + p[None, :], y, mask=m2)
        # positions past L carry dt = 0 (decay 1, input 0), so the tile's last column is the state at its end
        last = (tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, None, :]
        h = tl.sum(tl.where(last, hh, 0.0), axis=2)


@triton.jit
def _bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, hs_ptr,
                du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                G, Dg, N, L, H, W, su_b, su_g, n_tiles,
                SS2D: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    b, g, offs_d, offs_n, mask_d, mask_n, ch, mask_dn, A, bias, Dv = _program_channels(
        A_ptr, D_ptr, bias_ptr, G, Dg, N, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)

    u_off = b * su_b + g * su_g + offs_d[:, None] * L
    dt_off = (b * G * Dg + ch[:, None]) * L
    bc_off = (b * G + g) * N * L + offs_n[:, None] * L
    hs_base = hs_ptr + (b * G + g) * n_tiles * Dg * BLOCK_N + offs_d[:, None] * BLOCK_N + offs_n[None, :]
    lane = tl.arange(0, BLOCK_L)

    g_next = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)  # adjoint state at the first position of the later tile
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dD_acc = tl.zeros([BLOCK_D], tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], tl.float32)
    for tt in range(n_tiles):
        t = n_tiles - 1 - tt
        l = t * BLOCK_L + lane
        mask_l = l < L
        p = _scan_pos(l, g, H, W, L, SS2D)
        m2 = mask_d[:, None] & mask_l[None, :]
        mnl = mask_n[:, None] & mask_l[None, :]
        u = tl.load(u_ptr + u_off + p[None, :], mask=m2, other=0.0).to(tl.float32)
        z = tl.load(dt_ptr + dt_off + p[None, :], mask=m2, other=0.0).to(tl.float32) + bias[:, None]
        dt = tl.where(m2, _dt(z, 0.0, SOFTPLUS), 0.0)
        Bt = tl.load(B_ptr + bc_off + p[None, :], mask=mnl, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_off + p[None, :], mask=mnl, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + u_off + p[None, :], mask=m2, other=0.0).to(tl.float32)

        dA = tl.exp(dt[:, None, :] * A[:, :, None])
        dBu = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, h_loc = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
        h0 = tl.load(hs_base + t * Dg * BLOCK_N, mask=mask_d[:, None], other=0.0)
        hh = h_loc + a_cum * h0[:, :, None]  # states h_l of this tile

        # the decay applied when leaving position l: a_{l+1}, 0 after the last position
        l1 = l + 1
        m1 = mask_d[:, None] & (l1 < L)[None, :]
        p1 = _scan_pos(l1, g, H, W, L, SS2D)
        dt1 = _dt(tl.load(dt_ptr + dt_off + p1[None, :], mask=m1, other=0.0).to(tl.float32), bias[:, None],
                  SOFTPLUS)
        a_next = tl.where(m1[:, None, :], tl.exp(dt1[:, None, :] * A[:, :, None]), 0.0)
        dh = dy[:, None, :] * Ct[None, :, :]
        r_cum, g_loc = tl.associative_scan((a_next, dh), axis=2, combine_fn=_combine, reverse=True)
        gg = g_loc + r_cum * g_next[:, :, None]  # dLoss/dh_l through every later position
        g_next = tl.sum(tl.where((lane == 0)[None, None, :], gg, 0.0), axis=2)

        dlog = gg * (hh - dBu)  # dLoss/d(dt_l A): a_l h_{l-1} = h_l - dt_l B_l u_l
        gB = tl.sum(gg * Bt[None, :, :], axis=1)  # (BLOCK_D, BLOCK_L)
        ddt = gB * u + tl.sum(dlog * A[:, :, None], axis=1)
        du = gB * dt + dy * Dv[:, None]
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-z))
        ddt = tl.where(m2, ddt, 0.0)
        tl.store(ddt_ptr + dt_off + p[None, :], ddt, mask=m2)
        if SS2D:
            tl.atomic_add(du_ptr + u_off + p[None, :], du, mask=m2, sem="relaxed")
        else:
            tl.store(du_ptr + u_off + p[None, :], du, mask=m2)
        tl.atomic_add(dB_ptr + bc_off + p[None, :], tl.sum(gg * (dt * u)[:, None, :], axis=0), mask=mnl, sem="relaxed")
        tl.atomic_add(dC_ptr + bc_off + p[None, :], tl.sum(dy[:, None, :] * hh, axis=0), mask=mnl, sem="relaxed")
        dA_acc += tl.sum(dlog * dt[:, None, :], axis=2)
        dD_acc += tl.sum(dy * u, axis=1)
        dbias_acc += tl.sum(ddt, axis=1)

    tl.atomic_add(dA_ptr + ch[:, None] * N + offs_n[None, :], dA_acc, mask=mask_dn, sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + ch, dD_acc, mask=mask_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + ch, dbias_acc, mask=mask_d, sem="relaxed")


# (BLOCK_D, BLOCK_L, num_warps) forced for every launch; for tuning sweeps (benchmarks/bench_ss2d.py --sweep)
BLOCK_OVERRIDE: tuple[int, int, int] | None = None


def _blocks(Dg: int, N: int, L: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_L, num_warps): few channels and long tiles, about 2048 fp32 elements per
    (BLOCK_D, BLOCK_N, BLOCK_L) tensor: more programs in flight, fewer sequential tiles each, ran faster on an H100
    (benchmarks/RESULTS.md, "Measurements that were in docstrings")."""
    bn = triton.next_power_of_2(max(N, 1))
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE[0], bn, BLOCK_OVERRIDE[1], BLOCK_OVERRIDE[2]
    bl = min(256 if bn <= 2 else 128 if bn <= 4 else 64 if bn <= 8 else 32, triton.next_power_of_2(max(L, 2)))
    bd = max(1, min(triton.next_power_of_2(Dg), 2048 // (bn * bl)))
    return bd, bn, bl, 4


def _launch_args(u, delta, A, B, C, G: int, ss2d: bool):
    Bb, _, L = u.shape
    Dg = delta.shape[1] // G
    return Bb, Dg, A.shape[1], L, u.stride(0), 0 if ss2d else Dg * L


class _FusedScan(torch.autograd.Function):
    """u (B, Du, L); delta (B, G*Dg, L); A (G*Dg, N); B, C (B, G, N, L); D, delta_bias (G*Dg,) or None.

    ss2d=True: Du = Dg, positions are spatial, y (B, Dg, L) sums the G=4 directions; else Du = G*Dg, y (B, Du, L).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus: bool, ss2d: bool, H: int, W: int):
        G = B.shape[1]
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D = None if D is None else D.contiguous()
        delta_bias = None if delta_bias is None else delta_bias.contiguous()
        Bb, Dg, N, L, su_b, su_g = _launch_args(u, delta, A, B, C, G, ss2d)
        bd, bn, bl, warps = _blocks(Dg, N, L)
        n_tiles = triton.cdiv(L, bl)
        y = (torch.zeros if ss2d else torch.empty)(u.shape, device=u.device, dtype=torch.float32)
        hs = torch.empty(Bb * G, n_tiles, Dg, bn, device=u.device, dtype=torch.float32)
        grid = (Bb * G, triton.cdiv(Dg, bd))
        _fwd_kernel[grid](u, delta, A, B, C, D if D is not None else A, delta_bias if delta_bias is not None else A,
                          y, hs, G, Dg, N, L, H, W, su_b, su_g, n_tiles,
                          SS2D=ss2d, HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                          BLOCK_D=bd, BLOCK_N=bn, BLOCK_L=bl, num_warps=warps)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, hs)
        ctx.cfg = (softplus, ss2d, H, W, G, bd, bn, bl, warps, n_tiles)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, hs = ctx.saved_tensors
        softplus, ss2d, H, W, G, bd, bn, bl, warps, n_tiles = ctx.cfg
        dy = dy.contiguous()
        Bb, Dg, N, L, su_b, su_g = _launch_args(u, delta, A, B, C, G, ss2d)
        f32 = dict(device=u.device, dtype=torch.float32)
        du = (torch.zeros if ss2d else torch.empty)(u.shape, **f32)
        ddelta = torch.empty(delta.shape, **f32)
        dA = torch.zeros(A.shape, **f32)
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        dD = torch.zeros(A.shape[0], **f32)
        dbias = torch.zeros(A.shape[0], **f32)
        grid = (Bb * G, triton.cdiv(Dg, bd))
        _bwd_kernel[grid](u, delta, A, B, C, D if D is not None else A, delta_bias if delta_bias is not None else A,
                          dy, hs, du, ddelta, dA, dB, dC, dD, dbias, G, Dg, N, L, H, W, su_b, su_g, n_tiles,
                          SS2D=ss2d, HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                          BLOCK_D=bd, BLOCK_N=bn, BLOCK_L=bl, num_warps=warps)
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if D is None else dD.to(D.dtype), None if delta_bias is None else dbias.to(delta_bias.dtype),
                None, None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Same contract as ``selective_scan_ref``: u, delta (B, D, L); A (D, N); B, C (B, N, L) or grouped
    (B, G, N, L); D, delta_bias (D,) -> y (B, D, L) fp32."""
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    if u.shape[1] % B.shape[1]:
        raise ValueError(f"{u.shape[1]} channels do not split into {B.shape[1]} groups of B/C")
    return _FusedScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, False, 1, u.shape[-1])
