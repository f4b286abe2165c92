"""``ss2d_scan_attention_fn``: the implicit attention (scan-path maps) of VMamba's SS2D scan, dispatched to
``ss2d_scan_attention_ref`` or ``ss2d_scan_attention_triton`` by the package's backend rule."""
from __future__ import annotations

import torch

from .dispatch import implementation, prepare

MAX_FULL_LEN = 1024  # L x L matrices per direction and channel grow as L^2: 32x32 grids at most
_REDUCE = ("mean", "none")


def ss2d_scan_attention_fn(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                           query: tuple[int, int] | None = None, channel_reduce: str = "mean",
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit attention of the SS2D scan, per direction and merged (summed over the 4 directions).

    delta: (B, K, D, H, W) raw dt; A: (K*D, N); B, C: (B, K, N, H, W); delta_bias: (K*D,) (same inputs as
    ``ss2d_scan_fn``, without x). ``channel_reduce="mean"`` averages over the D channels, ``"none"`` keeps them
    (then a D axis follows K).
    query=(row, col): how much each grid cell feeds the output at that cell -> per (B, K, H, W), merged (B, H, W).
    query=None: full matrices in spatial index order, [p, q] = weight of input q in output p -> per (B, K, L, L),
    merged (B, L, L); only for L <= MAX_FULL_LEN. Returns fp32. ``backend``: "ref" or "triton", by the rule in the
    package docstring.
    """
    if channel_reduce not in _REDUCE:
        raise ValueError(f"channel_reduce={channel_reduce!r}; expected one of {_REDUCE}")
    H, W = delta.shape[-2:]
    L = H * W
    if query is not None and not (0 <= query[0] < H and 0 <= query[1] < W):
        raise ValueError(f"query {query} lies outside the {H}x{W} grid")
    if query is None and L > MAX_FULL_LEN:
        raise ValueError(f"full {L}x{L} scan-attention matrices are limited to L <= {MAX_FULL_LEN} "
                         f"(grid {H}x{W}); pass query=(row, col) for one row instead")
    backend, hooked = prepare("ss2d_scan_attention", backend, delta,
                              dict(delta=delta, A=A, B=B, C=C, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                   query=query, channel_reduce=channel_reduce))
    if hooked is not None:
        return hooked
    return implementation("ss2d_scan_attention", backend)(delta, A, B, C, delta_bias, delta_softplus, query,
                                                          channel_reduce)
