"""Scan kernels (import name ``toolkit_kernels``): each op has a plain-PyTorch reference beside its Triton version and
one dispatching entry (``*_fn``); ``TOOLKIT_FORCE_REF=1`` or ``backend="ref"`` forces the reference.

Triton is imported only when a Triton backend runs, so CPU-only installs work without it.
"""
from .scan_paths import MAX_FULL_LEN, ss2d_scan_attention
from .ss2d import BACKENDS, scan_backend, selective_scan_fn, ss2d_scan_fn
from .ss2d_ref import (cross_merge_ref, cross_scan_ref, selective_scan_ref, selective_scan_torch, ss2d_scan_ref,
                       to_grid_order, to_scan_order)

__all__ = ["BACKENDS", "MAX_FULL_LEN", "cross_merge_ref", "cross_scan_ref", "scan_backend", "selective_scan_torch",
           "selective_scan_fn", "selective_scan_ref", "ss2d_scan_attention", "ss2d_scan_fn", "ss2d_scan_ref",
           "to_grid_order", "to_scan_order"]
