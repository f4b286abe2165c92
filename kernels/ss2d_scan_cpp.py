"""``ss2d_scan_cpp``: VMamba's SS2D scan on ``selective_scan_cpp``'s C++ kernel pair, run with the 4 directions as
its groups so that cross-scan, cross-merge and the D term happen inside the kernel (see that module)."""
from __future__ import annotations

import torch

from .selective_scan_cpp import _check_device, _CppScan


def ss2d_scan_cpp(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                  delta_softplus: bool = True) -> torch.Tensor:
    """Same contract as ``ss2d_scan_ref``: x (B, D, H, W), delta (B, 4, D, H, W), A (4D, N), B, C (B, 4, N, H, W),
    D, delta_bias (4D,) -> y (B, D, H, W) in fp32 (fp64 for fp64 inputs), laid out like x; CPU tensors."""
    _check_device(x)
    return _CppScan.apply(x, delta, A, B, C, D, delta_bias, delta_softplus, True)
