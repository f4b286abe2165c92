"""Triton-kernel-vs-torch-backend cases, shared by tests/test_kernels.py and benchmarks (also runnable as a script).

``python tests/kernel_cases.py DTYPE DEVICE`` runs the grid for one dtype and prints one JSON line per case; the
CPU tests run it in a subprocess with TRITON_INTERPRET=1, which must be set before Triton is first imported.
"""
from __future__ import annotations

import json
import sys

import torch

# mamba-ssm's own test tolerances for its kernel against the reference (rtol, atol); gradients get twice these
TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (batch, channels, H, W, d_state): single and multiple tiles, d_state 1 to 16, odd grids, H != W
SS2D_CPU = [(1, 3, 3, 5, 1), (2, 4, 5, 4, 4), (1, 2, 12, 11, 1), (1, 3, 9, 7, 16)]
SS2D_GPU = [(2, 96, 56, 56, 1), (4, 192, 28, 28, 1), (2, 384, 14, 14, 1), (2, 768, 7, 7, 1), (2, 64, 17, 23, 16),
            (1, 48, 64, 96, 4)]
# (batch, channels, L, d_state, groups) for the 1-D scan
SCAN1D_CPU = [(2, 6, 37, 3, 1), (1, 8, 70, 16, 2)]
SCAN1D_GPU = [(2, 320, 196, 8, 1), (2, 256, 1024, 16, 2)]
NAMES = ("x", "delta", "A", "B", "C", "D", "delta_bias")


def ss2d_inputs(shape, dtype, device, seed=0):
    Bb, Dd, H, W, N = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ts = (r(Bb, Dd, H, W), 0.5 * r(Bb, 4, Dd, H, W) - 1.0, -(torch.rand(4 * Dd, N, generator=g) + 0.5),
          r(Bb, 4, N, H, W), r(Bb, 4, N, H, W), r(4 * Dd), 0.1 * r(4 * Dd))
    return _cast(ts, dtype, device)


def _cast(ts, dtype, device):
    """Activations (x/u, delta, B, C) in ``dtype``; A, D and the bias stay fp32 as in VMamba (all fp64 for fp64)."""
    low = (0, 1, 3, 4)
    return [(t.to(dtype) if i in low or dtype == torch.float64 else t).to(device).requires_grad_()
            for i, t in enumerate(ts)]


def scan1d_inputs(shape, dtype, device, seed=0):
    Bb, Dd, L, N, G = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ts = (r(Bb, Dd, L), 0.5 * r(Bb, Dd, L) - 1.0, -(torch.rand(Dd, N, generator=g) + 0.5), r(Bb, G, N, L),
          r(Bb, G, N, L), r(Dd), 0.1 * r(Dd))
    return _cast(ts, dtype, device)


def compare(kind: str, shape, dtype: torch.dtype, device: str) -> dict:
    """Max |kernel - torch| - (atol + rtol |torch|) per output and gradient (<= 0 passes), and rel. errors."""
    from toolkit_kernels import selective_scan_torch, ss2d_scan_torch
    from toolkit_kernels.selective_scan_triton import selective_scan_triton
    from toolkit_kernels.ss2d_scan_triton import ss2d_scan_triton
    # Against the torch backend, itself held to the definitions in fp64 (test_kernels.py): the definitions' loops
    # over positions would dominate the GPU cases' time.
    if kind == "ss2d":
        ins = ss2d_inputs(shape, dtype, device)
        ref, ker, kw = ss2d_scan_torch, ss2d_scan_triton, {"delta_softplus": True}
    else:
        ins = scan1d_inputs(shape, dtype, device)
        ref, ker, kw = selective_scan_torch, selective_scan_triton, {"delta_softplus": True}
    y_ref = ref(*ins, **kw)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(device)
    g_ref = torch.autograd.grad(y_ref, ins, dy)
    y = ker(*ins, **kw)
    g = torch.autograd.grad(y, ins, dy)
    rtol, atol = TOL[dtype]
    out = {"kind": kind, "shape": list(shape), "dtype": str(dtype).split(".")[-1], "excess": {}, "rel": {},
           "finite": bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(t).all()) for t in g)}
    for name, a, b, scale in [("y", y, y_ref, 1)] + [(f"d{n}", a, b, 2) for n, a, b in zip(NAMES, g, g_ref)]:
        a, b = a.double(), b.double()
        out["excess"][name] = float(((a - b).abs() - scale * (atol + rtol * b.abs())).max())
        out["rel"][name] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return out


def run_grid(dtype_name: str, device: str) -> list[dict]:
    gpu = device == "cuda"
    dtype = DTYPES[dtype_name]
    cases = ([("ss2d", s) for s in (SS2D_GPU if gpu else SS2D_CPU)]
             + [("1d", s) for s in (SCAN1D_GPU if gpu else SCAN1D_CPU)])
    return [compare(k, s, dtype, device) for k, s in cases]


if __name__ == "__main__":
    for rec in run_grid(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu"):
        print(json.dumps(rec), flush=True)
