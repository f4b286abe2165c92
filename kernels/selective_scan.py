"""``selective_scan_fn``: the 1-D selective scan in mamba-ssm's layout (MambaVision), dispatched by the package's
backend rule to ``selective_scan_ref``, ``selective_scan_torch``, ``selective_scan_cpp``, ``selective_scan_triton`` or
mamba-ssm's CUDA kernel ("mamba")."""
from __future__ import annotations

import torch

from .dispatch import implementation, prepare


def mamba_selective_scan():
    """mamba-ssm's ``selective_scan_fn``, the "mamba" backend of both scans; its CUDA extension must be built."""
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
    Returns y (B, D, L) in u's dtype, as mamba-ssm does; the state is fp32 on every backend (fp64 for fp64 inputs
    on "ref", "torch" and "cpp"). ``backend``: by the rule in the package docstring.
    """
    backend, hooked = prepare("selective_scan", backend, u, dict(u=u, delta=delta, A=A, B=B, C=C, D=D,
                                                                 delta_bias=delta_bias, delta_softplus=delta_softplus))
    if hooked is not None:
        return hooked
    if backend == "mamba":
        return mamba_selective_scan()(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return implementation("selective_scan", backend)(u, delta, A, B, C, D, delta_bias, delta_softplus).to(u.dtype)
