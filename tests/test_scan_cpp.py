"""The C++ CPU scan ("cpp" backend): against the ``_ref`` definitions in fp64 and the ``_torch`` backends in fp32 and
bf16, forward and every gradient, over odd grids, d_state 1 to 17, batch 1 to 4, grouped B/C, with and without D,
delta_bias and softplus, in the layouts the models pass (channels-last, transposed); gradcheck in fp64; and the
backend rule's "auto" on CPU tensors, including a machine where the extension cannot be built. The cpp tests skip
(not fail) where the extension cannot be built."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import kernel_cases as kc
from toolkit_kernels import (call_hook, scan_backend, selective_scan_cpp, selective_scan_fn, selective_scan_ref,
                             selective_scan_torch, ss2d_scan_cpp, ss2d_scan_fn, ss2d_scan_ref, ss2d_scan_torch)
from toolkit_kernels.dispatch import BACKENDS, resolve_backend

cppmod = importlib.import_module("toolkit_kernels.selective_scan_cpp")  # the module (the package's name is the op)


@pytest.fixture(scope="module")
def cpp():
    """Builds (or loads the cached build of) the extension once; skips the test where it cannot be built."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = cppmod.cpp_available()
    if not ok:
        pytest.skip(f"C++ scan extension unavailable: {cppmod._state['error']}")


# (batch, channels, H, W, d_state): odd grids, H != W, one row/column, channels across several blocks of 16 lanes
# (17, 33), d_state 1 to 17 (3, 5 padded to the next fixed size, 17 the general kernel)
SS2D = [(1, 3, 3, 5, 1), (2, 4, 7, 7, 4), (3, 17, 5, 3, 16), (4, 2, 1, 6, 2), (2, 5, 4, 4, 3), (1, 33, 3, 4, 5),
        (1, 2, 2, 3, 17)]
# (batch, channels, L, d_state, groups)
SCAN1D = [(2, 6, 37, 3, 1), (1, 8, 70, 16, 2), (3, 40, 9, 1, 4), (2, 33, 5, 2, 1), (4, 3, 1, 8, 1)]
# (D, delta_bias, softplus)
FLAGS = [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]
fid = lambda f: "D{}-bias{}-sp{}".format(*map(int, f))  # noqa: E731


def _ids(s):
    return "x".join(map(str, s))


def _select(ins, flags):
    """Inputs with D and/or delta_bias dropped per ``flags``; returns (inputs, kwargs, the differentiable ones)."""
    x, delta, A, B, C, D, bias = ins
    use_D, use_bias, softplus = flags
    if not softplus:  # dt = delta + bias as it is: keep it positive, as softplus would, so that the state decays
        delta = delta.detach().abs().requires_grad_()
    args = [x, delta, A, B, C, D if use_D else None, bias if use_bias else None]
    return args, {"delta_softplus": softplus}, [t for t in args if t is not None]


def _run(fn, args, kw, wrt, dy=None):
    y = fn(*args, **kw)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    return y, torch.autograd.grad(y, wrt, dy), dy


def _close(got, want, rtol, atol, what):
    got, want = got.double(), want.double()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("flags", FLAGS, ids=fid)
@pytest.mark.parametrize("shape", SS2D, ids=_ids)
def test_ss2d_cpp_matches_definition_fp64(cpp, shape, flags):
    args, kw, wrt = _select(kc.ss2d_inputs(shape, torch.float64, "cpu"), flags)
    y_ref, g_ref, dy = _run(ss2d_scan_ref, args, kw, wrt)
    y, g, _ = _run(ss2d_scan_cpp, args, kw, wrt, dy)
    assert y.dtype == torch.float64 and y.shape == y_ref.shape
    _close(y, y_ref, 1e-10, 1e-10, "y")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        _close(a, b, 1e-9, 1e-9, f"grad {i}")


@pytest.mark.parametrize("flags", FLAGS, ids=fid)
@pytest.mark.parametrize("shape", SCAN1D, ids=_ids)
def test_selective_scan_cpp_matches_definition_fp64(cpp, shape, flags):
    args, kw, wrt = _select(kc.scan1d_inputs(shape, torch.float64, "cpu"), flags)
    y_ref, g_ref, dy = _run(selective_scan_ref, args, kw, wrt)
    y, g, _ = _run(selective_scan_cpp, args, kw, wrt, dy)
    _close(y, y_ref, 1e-10, 1e-10, "y")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        _close(a, b, 1e-9, 1e-9, f"grad {i}")


def test_selective_scan_cpp_ungrouped_bc(cpp):
    """B, C as (B, N, L) (no group dim) are the one-group case."""
    u, delta, A, B, C, D, bias = kc.scan1d_inputs((2, 5, 11, 4, 1), torch.float64, "cpu")
    want = selective_scan_ref(u, delta, A, B[:, 0], C[:, 0], D, bias, True)
    torch.testing.assert_close(selective_scan_cpp(u, delta, A, B[:, 0], C[:, 0], D, bias, True), want,
                               rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="groups"):
        selective_scan_cpp(*kc.scan1d_inputs((1, 5, 4, 2, 2), torch.float64, "cpu"))


# fp32 (the fixed-size kernels and the polynomial exp/log) against the torch backend at mamba-ssm's fp32 tolerance,
# gradients at twice it, as the Triton kernel is held (tests/kernel_cases.py)
@pytest.mark.parametrize("flags", FLAGS[:2], ids=fid)
@pytest.mark.parametrize("case", [("ss2d", s) for s in SS2D] + [("1d", s) for s in SCAN1D],
                         ids=lambda c: f"{c[0]}-{_ids(c[1])}")
def test_cpp_matches_torch_fp32(cpp, case, flags):
    kind, shape = case
    inputs = kc.ss2d_inputs if kind == "ss2d" else kc.scan1d_inputs
    ref, fn = (ss2d_scan_torch, ss2d_scan_cpp) if kind == "ss2d" else (selective_scan_torch, selective_scan_cpp)
    args, kw, wrt = _select(inputs(shape, torch.float32, "cpu"), flags)
    y_ref, g_ref, dy = _run(ref, args, kw, wrt)
    y, g, _ = _run(fn, args, kw, wrt, dy)
    assert y.dtype == torch.float32
    rtol, atol = kc.TOL[torch.float32]
    _close(y, y_ref, rtol, atol, "y")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert a.dtype == wrt[i].dtype
        _close(a, b, 2 * rtol, 2 * atol, f"grad {i}")


@pytest.mark.parametrize("kind", ["ss2d", "1d"])
def test_cpp_matches_torch_bf16(cpp, kind):
    """bf16 activations, fp32 A/D/bias (as under autocast): fp32 state and output, gradients in each input's dtype."""
    if kind == "ss2d":
        ins, ref, fn = kc.ss2d_inputs((2, 20, 5, 7, 2), torch.bfloat16, "cpu"), ss2d_scan_torch, ss2d_scan_cpp
    else:
        ins = kc.scan1d_inputs((2, 20, 29, 4, 2), torch.bfloat16, "cpu")
        ref, fn = selective_scan_torch, selective_scan_cpp
    y_ref, g_ref, dy = _run(ref, ins, {"delta_softplus": True}, ins)
    y, g, _ = _run(fn, ins, {"delta_softplus": True}, ins, dy)
    assert y.dtype == torch.float32
    _close(y, y_ref, *kc.TOL[torch.float32], "y")  # same bf16 inputs, both computed in fp32
    rtol, atol = kc.TOL[torch.bfloat16]
    for i, (a, b, t) in enumerate(zip(g, g_ref, ins)):
        assert a.dtype == t.dtype
        _close(a, b, 2 * rtol, 2 * atol, f"grad {i}")
    with scan_backend("cpp"):
        assert selective_scan_fn(*kc.scan1d_inputs((1, 2, 5, 2, 1), torch.bfloat16, "cpu")).dtype == torch.bfloat16


def test_cpp_reads_any_strides(cpp):
    """The layouts VMamba and MambaVision pass (channels-last maps, delta as a transposed view, B/C as strided
    slices) give what contiguous inputs give, and y and the input gradients keep their input's layout."""
    x, delta, A, B, C, D, bias = kc.ss2d_inputs((2, 19, 5, 6, 2), torch.float32, "cpu")
    cl = lambda t: t.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_()  # noqa: E731
    d5 = delta.detach().permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2).requires_grad_()
    wide = lambda t: torch.stack([t.detach()] * 2, 3).flatten(2, 3)[:, :, ::2].requires_grad_()  # noqa: E731 N stride 2
    strided = [cl(x), d5, A, wide(B), wide(C), D, bias]
    plain = [t.detach().contiguous().requires_grad_() for t in (x, delta, A, B, C, D, bias)]
    y0, g0, dy = _run(ss2d_scan_cpp, plain, {}, plain)
    y1, g1, _ = _run(ss2d_scan_cpp, strided, {}, strided, dy)
    assert y1.is_contiguous(memory_format=torch.channels_last) and g1[0].stride() == strided[0].stride()
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    u, dl, A1, B1, C1, D1, b1 = kc.scan1d_inputs((2, 7, 13, 3, 1), torch.float32, "cpu")
    dT = dl.detach().transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(selective_scan_cpp(u, dT, A1, B1, C1, D1, b1, True),
                               selective_scan_cpp(u, dl, A1, B1, C1, D1, b1, True), rtol=1e-6, atol=1e-6)


def test_cpp_gradcheck(cpp):
    ins = kc.ss2d_inputs((1, 2, 3, 2, 2), torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda *t: ss2d_scan_cpp(*t, delta_softplus=True), ins)
    ins = kc.scan1d_inputs((1, 3, 5, 2, 1), torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda *t: selective_scan_cpp(*t, delta_softplus=True), ins)
    ins = kc.scan1d_inputs((2, 4, 4, 3, 2), torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda *t: selective_scan_cpp(*t[:5], delta_softplus=False), ins[:5])


def test_cpp_is_finite_on_long_sequences_in_half_precision(cpp):
    ins = kc.ss2d_inputs((1, 4, 64, 64, 1), torch.float16, "cpu")
    y = ss2d_scan_fn(*ins, backend="cpp")
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    torch.testing.assert_close(y, ss2d_scan_fn(*ins, backend="torch"), rtol=1e-3, atol=1e-3)


# --- the backend rule ---------------------------------------------------------------------------------------------

def _picked(fn, *args, **kw) -> str:
    seen = []
    with call_hook(lambda op, a: seen.append(a["backend"]) or torch.zeros(())):
        fn(*args, **kw)
    return seen[0]


def test_auto_picks_cpp_on_cpu_tensors(cpp, monkeypatch):
    monkeypatch.delenv("TOOLKIT_SCAN_BACKEND", raising=False)
    assert "cpp" in BACKENDS["ss2d_scan"] and "cpp" in BACKENDS["selective_scan"]
    ins = kc.ss2d_inputs((1, 2, 3, 3, 2), torch.float32, "cpu")
    u = kc.scan1d_inputs((1, 2, 5, 2, 1), torch.float32, "cpu")
    assert _picked(ss2d_scan_fn, *ins) == "cpp" and _picked(selective_scan_fn, *u) == "cpp"
    assert torch.equal(ss2d_scan_fn(*ins), ss2d_scan_cpp(*ins))
    assert _picked(ss2d_scan_fn, *ins, backend="torch") == "torch"
    monkeypatch.setenv("TOOLKIT_SCAN_BACKEND", "cpp")
    assert _picked(ss2d_scan_fn, *ins) == "cpp"
    cuda = types.SimpleNamespace(is_cuda=True)
    assert resolve_backend("ss2d_scan", None, cuda) == "triton"  # "cpp" from the variable: auto off the CPU
    meta = [t.detach().to("meta") for t in ins]
    with scan_backend("cpp"):
        assert _picked(ss2d_scan_fn, *meta) == "torch"  # and on meta tensors (zoo FLOP counts) auto is "torch"
    with pytest.raises(ValueError, match="CPU tensors"):
        ss2d_scan_cpp(*meta)


def test_missing_compiler_falls_back_to_torch_once_with_a_warning(monkeypatch):
    """A machine where the extension cannot be built: auto (and a block or the variable naming "cpp") runs "torch"
    and one warning says why; an explicit ``backend="cpp"`` raises with the reason."""
    monkeypatch.delenv("TOOLKIT_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(cppmod, "_state", {"ext": None, "error": None, "warned": False, "build_s": None})

    def no_compiler():
        raise RuntimeError("Error building extension: [Errno 2] No such file or directory: 'c++'")

    monkeypatch.setattr(cppmod, "_load", no_compiler)
    ins = kc.ss2d_inputs((1, 2, 3, 3, 2), torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match=r"could not be built: RuntimeError: Error building.*'torch' backend"):
        y = ss2d_scan_fn(*ins)
    torch.testing.assert_close(y, ss2d_scan_torch(*ins))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning came once: later calls are silent
        assert _picked(ss2d_scan_fn, *ins) == "torch"
        with scan_backend("cpp"):
            assert _picked(ss2d_scan_fn, *ins) == "torch"
            assert _picked(selective_scan_fn, *kc.scan1d_inputs((1, 2, 5, 2, 1), torch.float32, "cpu")) == "torch"
    with pytest.raises(RuntimeError, match="No such file or directory: 'c\\+\\+'"):
        ss2d_scan_fn(*ins, backend="cpp")


def test_no_compiler_in_a_fresh_process_runs_torch_and_says_so_once(tmp_path):
    """The real failure path: a process whose compiler (CXX) does not exist and whose extension cache is empty."""
    code = ("import json, torch, kernel_cases as kc\n"
            "from toolkit_kernels import call_hook, ss2d_scan_fn, ss2d_scan_torch\n"
            "ins = kc.ss2d_inputs((1, 2, 3, 3, 2), torch.float32, 'cpu')\n"
            "seen = []\n"
            "with call_hook(lambda op, a: seen.append(a['backend'])):\n"
            "    y = [ss2d_scan_fn(*ins) for _ in range(3)]\n"
            "print(json.dumps({'seen': seen, 'same': all(torch.equal(t, ss2d_scan_torch(*ins)) for t in y)}))\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("TOOLKIT_SCAN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"seen": ["torch"] * 3, "same": True}
    said = [ln for ln in proc.stderr.splitlines() if "could not be built" in ln]
    assert len(said) == 1 and "no-such-c++" in said[0] and "'torch' backend" in said[0], proc.stderr[-3000:]


def test_arithmetic_floor_runs_the_scan_math_and_refuses_bad_sizes(cpp):
    """The benchmark's arithmetic floor: finite positive milliseconds for any state count (the fixed sizes and the
    general one alike), and a clear error for a size that cannot be timed."""
    ext = cppmod.extension()
    for n_states in (1, 3, 16):
        ms = ext.arithmetic_floor_ms(4 * 16 * 128, n_states, 1)
        assert 0.0 < ms < 1e4
    for bad in ((0, 1, 1), (16, 0, 1), (16, 1, 0)):
        with pytest.raises(RuntimeError, match="must be positive"):
            ext.arithmetic_floor_ms(*bad)
