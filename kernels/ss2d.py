"""Dispatching entry points for the selective scan and the SS2D scan.

backend: None/"auto" runs the fused Triton kernels on CUDA tensors and the reference on CPU tensors; "ref" the
plain-PyTorch chunked reference (any device); "triton" the Triton kernels (on CPU only under TRITON_INTERPRET=1);
"mamba" mamba-ssm's CUDA ``selective_scan_fn`` with separate PyTorch cross-scan and cross-merge.
The environment variable ``TOOLKIT_FORCE_REF=1`` forces the reference everywhere, whatever ``backend`` says.
Calls that pass no backend (the models do not) use the process default: ``TOOLKIT_SCAN_BACKEND`` or, scoped,
``with scan_backend("mamba"): ...``; this is how benchmarks and tests switch a whole model between backends.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .ss2d_ref import K, cross_merge_ref, cross_scan_ref, selective_scan_torch, ss2d_scan_ref, to_scan_order

BACKENDS = ("auto", "ref", "triton", "mamba")
_default = [os.environ.get("TOOLKIT_SCAN_BACKEND", "auto")]


@contextlib.contextmanager
def scan_backend(name: str):
    """Within the block, scans called without an explicit backend use ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}; expected one of {BACKENDS}")
    _default.append(name)
    try:
        yield
    finally:
        _default.pop()


def resolve_backend(backend: str | None, t: torch.Tensor, choices: tuple[str, ...] = BACKENDS) -> str:
    """The backend a call on tensor ``t`` runs: ``TOOLKIT_FORCE_REF`` wins, "auto" (or None) means Triton on CUDA
    tensors and the reference elsewhere, anything else must be one of ``choices``. Shared with the scan-path maps."""
    if os.environ.get("TOOLKIT_FORCE_REF", "0") not in ("", "0"):
        return "ref"
    backend = backend or "auto"
    if backend not in choices:
        raise ValueError(f"backend={backend!r}; expected one of {choices}")
    if backend == "auto":
        return "triton" if t.is_cuda else "ref"
    return backend


def _resolve(backend: str | None, x: torch.Tensor) -> str:
    return resolve_backend(backend or _default[-1], x)


def _mamba_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        import selective_scan_cuda  # noqa: F401  (the compiled extension, not a CPU placeholder)
    except ImportError as e:
        raise ImportError("backend='mamba' needs mamba-ssm built with its CUDA extension "
                          "(MAMBA_FORCE_BUILD=TRUE pip install mamba-ssm on a CUDA machine)") from e
    return selective_scan_fn


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                      delta_softplus: bool = False, backend: str | None = None) -> torch.Tensor:
    """1-D selective scan in mamba-ssm's layout (for MambaVision).

    u, delta: (B, D, L); A: (D, N); B, C: (B, N, L) or grouped (B, G, N, L); D, delta_bias: (D,).
    Returns y (B, D, L) in u's dtype, as mamba-ssm does; the state is fp32 on every backend.
    """
    backend = _resolve(backend, u)
    if backend == "ref":
        y = selective_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus)
    elif backend == "triton":
        from .ss2d_triton import selective_scan_triton
        y = selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus)
    else:
        return _mamba_scan()(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return y.to(u.dtype)


def ss2d_scan_fn(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                 delta_softplus: bool = True, backend: str | None = None) -> torch.Tensor:
    """VMamba v2 SS2D scan (cross-scan -> 4 selective scans -> cross-merge), channel-first, inputs in spatial layout.

    x: (B, D, H, W); delta: (B, K=4, D, H, W) raw dt (before bias and softplus); A: (K*D, N), negative;
    B, C: (B, K, N, H, W); D, delta_bias: (K*D,). Returns y (B, D, H, W) in fp32. See ``ss2d_scan_ref``.
    """
    backend = _resolve(backend, x)
    if backend == "ref":
        return ss2d_scan_ref(x, delta, A, B, C, D, delta_bias, delta_softplus)
    if backend == "triton":
        from .ss2d_triton import ss2d_scan_triton
        return ss2d_scan_triton(x, delta, A, B, C, D, delta_bias, delta_softplus)
    Bb, Dd, H, W = x.shape
    L = H * W
    ys = _mamba_scan()(cross_scan_ref(x).reshape(Bb, K * Dd, L), to_scan_order(delta).reshape(Bb, K * Dd, L),
                       A.float(), to_scan_order(B.to(x.dtype)), to_scan_order(C.to(x.dtype)),
                       None if D is None else D.float(), delta_bias=None if delta_bias is None else delta_bias.float(),
                       delta_softplus=delta_softplus)
    return cross_merge_ref(ys.float().view(Bb, K, Dd, L), H, W).view(Bb, Dd, H, W)
