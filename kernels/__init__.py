"""Scan kernels, imported as ``toolkit_kernels`` (the folder is ``kernels/``).

Ops. An op ``<op>`` is these functions, each in the file ``<op>.py`` / ``<op>_ref.py`` / ... of its name:
    <op>_fn       the dispatcher (``<op>.py``): what models and tools call; picks a backend by the rule below
    <op>_ref      the definition: plain and obviously correct, slow; what tests hold the others to
    <op>_torch    vectorised plain PyTorch with a hand-written backward, any device (where the definition is slow)
    <op>_cpp      the fused CPU kernel in C++/OpenMP (``selective_scan_cpp.cpp``), built by the machine's compiler on
                  first use and cached in torch's extension directory
    <op>_triton   the fused Triton kernel; Triton is imported only when it runs
    op                    shapes (see its ``_fn``)                                   backends
    selective_scan        u (B, D, L) -> y (B, D, L); MambaVision's 1-D scan          ref torch cpp triton mamba
    ss2d_scan             x (B, D, H, W) -> y (B, D, H, W); VMamba's cross-scan,      ref torch cpp triton mamba
                          4 directional selective scans, cross-merge
    ss2d_scan_attention   delta (B, 4, D, H, W) -> maps; the SS2D scan's implicit     ref triton
                          attention (its definition is already vectorised)
"mamba" is mamba-ssm's CUDA ``selective_scan_fn`` (``scripts/build_mamba_ssm.sh`` builds it), for SS2D between
PyTorch cross-scan and cross-merge (``cross_scan.py``: the SS2D scan orders, ``cross_scan``, ``cross_merge``).

Backend rule (``dispatch.py`` implements it; nothing else states it). A call runs the first of:
    1. its ``backend=`` argument;
    2. the innermost ``with scan_backend(name):`` block around it;
    3. the environment variable ``TOOLKIT_SCAN_BACKEND``, read at each call;
    4. "auto": "triton" on CUDA tensors; "cpp" on CPU tensors for an op with "cpp" when its extension builds (the
       first such call of a process builds or loads it; where it cannot, one warning says why and "auto" goes on to
       the next choice); otherwise "torch", or "ref" for an op without "torch".
An unknown name, or an argument naming a backend its op lacks, raises ValueError. A block or the variable naming a
backend an op lacks (e.g. "mamba" while scan-path maps are drawn), or naming "cpp" for a call it cannot run (tensors
not on the CPU, or no build), means "auto" for that op: one setting switches a whole model and the tools around it.
An argument ``backend="cpp"`` that cannot run raises. "triton" on CPU tensors runs only under ``TRITON_INTERPRET=1``.

Call hooks. Within ``with call_hook(hook):`` every ``<op>_fn`` call, once its backend is picked, first calls
``hook(op, args)``: ``op`` the op's name, ``args`` the call's arguments by name (tensors as passed, "backend" the one
picked). A hook that returns None lets the call run; any other value is returned in its place and no backend runs
(``toolkit.zoo`` counts scan FLOPs this way, on ``meta`` tensors that no backend could run). Hooks nest: every
active hook sees every call, innermost first, and the innermost non-None result is the one returned.
"""
from .cross_scan import cross_merge, cross_scan, to_grid_order, to_scan_order
from .dispatch import BACKENDS, call_hook, scan_backend
from .selective_scan import selective_scan_fn
from .selective_scan_cpp import selective_scan_cpp
from .selective_scan_ref import selective_scan_ref
from .selective_scan_torch import selective_scan_torch
from .ss2d_scan import ss2d_scan_fn
from .ss2d_scan_attention import MAX_FULL_LEN, ss2d_scan_attention_fn
from .ss2d_scan_attention_ref import ss2d_scan_attention_ref
from .ss2d_scan_cpp import ss2d_scan_cpp
from .ss2d_scan_ref import ss2d_scan_ref
from .ss2d_scan_torch import ss2d_scan_torch

__all__ = ["BACKENDS", "MAX_FULL_LEN", "call_hook", "cross_merge", "cross_scan", "scan_backend", "selective_scan_cpp",
           "selective_scan_fn", "selective_scan_ref", "selective_scan_torch", "ss2d_scan_attention_fn",
           "ss2d_scan_attention_ref", "ss2d_scan_cpp", "ss2d_scan_fn", "ss2d_scan_ref", "ss2d_scan_torch",
           "to_grid_order", "to_scan_order"]
