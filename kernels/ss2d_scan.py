"""``ss2d_scan_fn``: VMamba's SS2D scan (cross-scan -> 4 directional selective scans -> cross-merge), dispatched by
the package's backend rule to ``ss2d_scan_ref``, ``ss2d_scan_torch``, ``ss2d_scan_cpp``, ``ss2d_scan_triton`` or
mamba-ssm's CUDA selective scan between PyTorch cross-scan and cross-merge ("mamba")."""
from __future__ import annotations

import torch

from .cross_scan import K, cross_merge, cross_scan, to_scan_order
from .dispatch import implementation, prepare
from .selective_scan import mamba_selective_scan


def _ss2d_scan_mamba(x, delta, A, B, C, D, delta_bias, delta_softplus) -> torch.Tensor:
    Bb, Dd, H, W = x.shape
    L = H * W
    ys = mamba_selective_scan()(
        cross_scan(x).reshape(Bb, K * Dd, L), to_scan_order(delta).reshape(Bb, K * Dd, L), A.float(),
        to_scan_order(B.to(x.dtype)), to_scan_order(C.to(x.dtype)), None if D is None else D.float(),
        delta_bias=None if delta_bias is None else delta_bias.float(), delta_softplus=delta_softplus)
    return cross_merge(ys.float().view(Bb, K, Dd, L), H, W).view(Bb, Dd, H, W)


def ss2d_scan_fn(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                 delta_softplus: bool = True, backend: str | None = None) -> torch.Tensor:
    """VMamba v2 SS2D scan, channel-first, inputs in spatial layout.

    x: (B, D, H, W); delta: (B, K=4, D, H, W) raw dt (before bias and softplus); A: (K*D, N), negative;
    B, C: (B, K, N, H, W); D, delta_bias: (K*D,). Returns y (B, D, H, W) in fp32 (fp64 for fp64 inputs on "ref",
    "torch" and "cpp"). ``backend``: by the rule in the package docstring.
    """
    backend, hooked = prepare("ss2d_scan", backend, x, dict(x=x, delta=delta, A=A, B=B, C=C, D=D,
                                                            delta_bias=delta_bias, delta_softplus=delta_softplus))
    if hooked is not None:
        return hooked
    if backend == "mamba":
        return _ss2d_scan_mamba(x, delta, A, B, C, D, delta_bias, delta_softplus)
    return implementation("ss2d_scan", backend)(x, delta, A, B, C, D, delta_bias, delta_softplus)
