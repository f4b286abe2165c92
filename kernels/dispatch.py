"""What every ``<op>_fn`` dispatcher shares: the backend rule and the call hooks, both stated in the package
docstring (``toolkit_kernels.__doc__``), which is their only description."""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Callable, Iterator

import torch

# Per op, the backends it has; "auto" is valid for every op and resolves to one of them.
BACKENDS: dict[str, tuple[str, ...]] = {
    "selective_scan": ("ref", "torch", "cpp", "triton", "mamba"),
    "ss2d_scan": ("ref", "torch", "cpp", "triton", "mamba"),
    "ss2d_scan_attention": ("ref", "triton"),
}
NAMES = ("auto",) + tuple(dict.fromkeys(b for bs in BACKENDS.values() for b in bs))
ENV_VAR = "TOOLKIT_SCAN_BACKEND"

CallHook = Callable[[str, dict[str, Any]], Any]
_scoped: list[str] = []  # the ``scan_backend`` blocks entered, innermost last
_hooks: list[CallHook] = []  # the ``call_hook`` blocks entered, innermost last


def _check_name(name: str, source: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{source}={name!r}; expected one of {NAMES}")
    return name


@contextlib.contextmanager
def scan_backend(name: str) -> Iterator[None]:
    """Within the block, ops called without ``backend=`` use ``name`` (rule 2 of the package docstring)."""
    _scoped.append(_check_name(name, "scan_backend"))
    try:
        yield
    finally:
        _scoped.pop()


def resolve_backend(op: str, backend: str | None, t: torch.Tensor) -> str:
    """The backend op ``op`` runs for a call with argument ``backend`` on tensor ``t`` (the package docstring's
    rule); never "auto"."""
    own = BACKENDS[op]
    if backend is not None:
        name = _check_name(backend, "backend")
        if name != "auto" and name not in own:
            raise ValueError(f"{op} has no backend {name!r}; it has {('auto',) + own}")
    else:
        name = _scoped[-1] if _scoped else _check_name(os.environ.get(ENV_VAR) or "auto", ENV_VAR)
        # One process-wide setting has to serve every op a model or tool calls, so an op it does not fit runs auto.
        if name not in own or (name == "cpp" and not _cpp_runs(t)):
            name = "auto"
    if name == "auto":
        if t.is_cuda:
            return "triton"
        if "cpp" in own and _cpp_runs(t):
            return "cpp"
        return "torch" if "torch" in own else "ref"
    return name


def _cpp_runs(t) -> bool:
    """Whether "cpp" can run a call on ``t``: a CPU tensor, and the extension builds (the first call of the
    process builds it; where it cannot, one warning says why)."""
    if getattr(getattr(t, "device", None), "type", None) != "cpu":
        return False
    from .selective_scan_cpp import cpp_available
    return cpp_available()


@contextlib.contextmanager
def call_hook(hook: CallHook) -> Iterator[None]:
    """Within the block, every ``<op>_fn`` call runs ``hook(op, args)`` before its backend (see the package
    docstring, "Call hooks")."""
    _hooks.append(hook)
    try:
        yield
    finally:
        _hooks.pop()


def run_hooks(op: str, args: dict[str, Any]) -> Any:
    """Called by the dispatchers: every active hook, innermost first; the innermost non-None result, or None."""
    result = None
    for hook in reversed(_hooks):
        out = hook(op, args)
        if result is None:
            result = out
    return result


def prepare(op: str, backend: str | None, t: torch.Tensor, args: dict[str, Any]) -> tuple[str, Any]:
    """What every ``<op>_fn`` does first: pick the backend for a call on ``t`` and run the call hooks with ``args``
    (the call's arguments by name). Returns (backend, the hooks' answer or None)."""
    backend = resolve_backend(op, backend, t)
    return backend, run_hooks(op, {**args, "backend": backend})


def implementation(op: str, backend: str) -> Callable[..., Any]:
    """``<op>_<backend>`` from the file of that name: the naming rule is the lookup, and a backend's module (Triton,
    the C++ build) is imported only when a call runs it."""
    return getattr(importlib.import_module(f".{op}_{backend}", __package__), f"{op}_{backend}")
