"""``selective_scan_cpp``: the fused CPU selective scan in C++ with OpenMP (``selective_scan_cpp.cpp``), forward and
backward, whose kernel pair also runs SS2D for ``ss2d_scan_cpp`` (cross-scan, 4 directions, cross-merge and the D
term inside the kernel, reading every input through its strides: no permuted copies).

The extension is built with the machine's C++ compiler (and ninja) on first use through
``torch.utils.cpp_extension.load`` and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), so later processes only load it. ``cpp_available()`` says whether it builds here;
the dispatchers' "auto" uses it on CPU tensors and falls back to "torch", with one warning, when it does not.
"""
from __future__ import annotations

import hashlib
import logging
import platform
import re
import threading
import time
import warnings
from pathlib import Path

import torch

from .selective_scan_ref import acc_dtype

SOURCE = Path(__file__).with_name("selective_scan_cpp.cpp")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]  # resolves to the libgomp torch already loaded (same soname): one OpenMP runtime

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {"ext": None, "error": None, "warned": False, "build_s": None}


def _cpu_tag() -> str:
    """-march=native code runs only on CPUs like this one: the name of the cached build carries the CPU's flags."""
    text = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text += next(ln for ln in lines if ln.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _load():
    """Compile (or, when cached and up to date, just load) the extension module. torch's own notes on the way (no
    CUDA runtime on a CPU machine, compiler checks) are silenced: the outcome is reported once, by ``cpp_available``."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
        return load(name=f"toolkit_scan_cpp_{_cpu_tag()}", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                    extra_ldflags=LDFLAGS, verbose=False)
    finally:
        quiet.setLevel(level)


_CAUSE = re.compile(r"not found|no such file|error:|is required|command not found|permission denied", re.I)


def _reason(e: Exception) -> str:
    """One line for a failed build: torch's headline, and the line of the build log that says what went wrong."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    head = re.split(r": \[\d+/\d+\] ", f"{type(e).__name__}: {lines[0] if lines else ''}")[0]  # not ninja's command
    cause = next((ln for ln in lines[1:] if _CAUSE.search(ln)), None)
    return (head if cause is None else f"{head}: {cause}")[:300]


def extension():
    """The compiled module, built on the first call of the process; RuntimeError with the reason if it cannot be."""
    if _state["ext"] is None and _state["error"] is None:
        with _lock:
            if _state["ext"] is None and _state["error"] is None:
                t0 = time.perf_counter()
                try:
                    _state["ext"] = _load()
                except Exception as e:  # noqa: BLE001  (no compiler, no ninja, a failed build: all mean "torch")
                    _state["error"] = _reason(e)
                else:
                    _state["build_s"] = time.perf_counter() - t0
                    log.info("toolkit_kernels: C++ scan extension ready in %.1f s (%s)", _state["build_s"], SOURCE)
    if _state["error"] is not None:
        raise RuntimeError(f"the C++ scan extension could not be built: {_state['error']}")
    return _state["ext"]


def cpp_available() -> bool:
    """Whether the "cpp" backend runs here (builds the extension on the first call). The first time it does not,
    one warning says why and that CPU scans run on "torch"."""
    try:
        extension()
    except RuntimeError as e:
        if not _state["warned"]:
            _state["warned"] = True
            # stacklevel: the line that called the op's ``_fn``
            # (cpp_available < _cpp_runs < resolve_backend < prepare < _fn)
            warnings.warn(f"toolkit_kernels: {e}; CPU scans run on the 'torch' backend", RuntimeWarning,
                          stacklevel=6)
        return False
    return True


def build_seconds() -> float | None:
    """Seconds the first ``extension()`` call of this process took (compiling, or loading a cached build)."""
    return _state["build_s"]


class _CppScan(torch.autograd.Function):
    """u (B, Cu, H, W); delta (B, KG, Dg, H, W); A (KG*Dg, N); B, C (B, KG, N, H, W); D, delta_bias (KG*Dg,) or
    None. ss2d: KG = 4 directions, Cu = Dg, y (B, Dg, H, W) sums them; else KG = B/C groups, Cu = KG*Dg, H = 1.
    y is in the accumulation dtype, laid out like u."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus: bool, ss2d: bool):
        ext = extension()
        acc = acc_dtype(u)
        dtypes = [t.dtype if t is not None else None for t in (u, delta, A, B, C, D, delta_bias)]
        if not (delta.dtype == B.dtype == C.dtype == u.dtype):
            u, delta, B, C = (t.to(acc) for t in (u, delta, B, C))
        A32 = A.to(acc).contiguous()
        D32 = None if D is None else D.to(acc).contiguous()
        b32 = None if delta_bias is None else delta_bias.to(acc).contiguous()
        y = torch.empty_like(u, dtype=acc)
        ext.scan_fwd(u, delta, A32, B, C, D32, b32, softplus, ss2d, y)
        ctx.save_for_backward(u, delta, A32, B, C, D32, b32)
        ctx.cfg = (softplus, ss2d, dtypes)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        u, delta, A32, B, C, D32, b32 = ctx.saved_tensors
        softplus, ss2d, dtypes = ctx.cfg
        acc = A32.dtype
        du = torch.empty_like(u, dtype=acc)
        ddelta = torch.empty_like(delta, dtype=acc)
        grads = extension().scan_bwd(u, delta, A32, B, C, D32, b32, softplus, ss2d, dy.to(acc), du, ddelta)
        grads = [du, ddelta, *grads[:3], grads[3] if D32 is not None else None, grads[4] if b32 is not None else None]
        return (*[g if g is None else g.to(dt) for g, dt in zip(grads, dtypes)], None, None)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, not {t.device.type}")


def selective_scan_cpp(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                       delta_softplus: bool = False) -> torch.Tensor:
    """Same contract as ``selective_scan_ref``: u, delta (B, D, L); A (D, N); B, C (B, N, L) or grouped
    (B, G, N, L); D, delta_bias (D,) -> y (B, D, L) in fp32 (fp64 for fp64 inputs); CPU tensors."""
    _check_device(u)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    Bb, Dd, L = u.shape
    G = B.shape[1]
    if Dd % G:
        raise ValueError(f"{Dd} channels do not split into {G} groups of B/C")
    y = _CppScan.apply(u.unsqueeze(2), delta.reshape(Bb, G, Dd // G, 1, L), A, B.unsqueeze(3), C.unsqueeze(3), D,
                       delta_bias, delta_softplus, False)
    return y.squeeze(2)
