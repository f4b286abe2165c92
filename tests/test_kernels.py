"""Scan kernels against their definitions: the torch backends against the ``_ref`` definitions, the fused Triton
kernels against the torch backends (on the CPU under TRITON_INTERPRET=1, on a GPU at VMamba's stage shapes), the
backend rule and call hooks of the dispatchers, and the scan-path maps against a brute-force Jacobian."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import types

import pytest
import torch

import kernel_cases as kc
from toolkit_kernels import (call_hook, cross_merge, cross_scan, scan_backend, selective_scan_fn, selective_scan_ref,
                             selective_scan_torch, ss2d_scan_attention_fn, ss2d_scan_fn, ss2d_scan_ref,
                             ss2d_scan_torch, to_grid_order, to_scan_order)
from toolkit_kernels.dispatch import resolve_backend
from toolkit_kernels.selective_scan_torch import _recurrence
from toolkit_kernels.ss2d_scan_torch import to_scan_order_lfirst

HAS_TRITON = importlib.util.find_spec("triton") is not None


def auto_cpu() -> str:
    """What "auto" runs on CPU tensors here: "cpp" where its extension builds, else "torch" (tests/test_scan_cpp.py)."""
    from toolkit_kernels.selective_scan_cpp import cpp_available
    return "cpp" if cpp_available() else "torch"


@pytest.mark.parametrize("shape", [(2, 5, 1, 1), (1, 3, 17, 4), (2, 4, 64, 16)])
def test_selective_scan_torch_matches_definition(shape):
    Bb, Dd, L, N = shape
    ins = kc.scan1d_inputs((Bb, Dd, L, N, 1), torch.float64, "cpu")
    y_seq = selective_scan_ref(*ins, delta_softplus=True)
    dy = torch.randn_like(y_seq)
    g_seq = torch.autograd.grad(y_seq, ins, dy)
    y = selective_scan_torch(*ins, delta_softplus=True)
    g = torch.autograd.grad(y, ins, dy)
    torch.testing.assert_close(y, y_seq, rtol=1e-10, atol=1e-10)
    for n, a, b in zip(kc.NAMES, g, g_seq):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{n}")


def test_selective_scan_torch_gradcheck():
    ins = kc.scan1d_inputs((1, 2, 9, 3, 1), torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda *t: selective_scan_torch(*t, delta_softplus=True), ins)


@pytest.mark.parametrize("adjoint", [False, True])
def test_recurrence_chunked_and_stepwise_agree(adjoint):
    a, b = torch.rand(37, 6, dtype=torch.float64), torch.randn(37, 6, dtype=torch.float64)
    want, h = torch.empty_like(b), torch.zeros(6, dtype=torch.float64)  # the recurrence written out
    if adjoint:  # h_t = a_{t+1} h_{t+1} + b_t, h_37 = 0
        for t in range(36, -1, -1):
            h = (a[t + 1] * h if t < 36 else 0) + b[t]
            want[t] = h
    else:  # h_t = a_t h_{t-1} + b_t, h_-1 = 0
        for t in range(37):
            h = a[t] * h + b[t]
            want[t] = h
    for chunked in (False, True):
        torch.testing.assert_close(_recurrence(a, b, adjoint, chunked), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 1), (1, 2, 3, 1, 4), (1, 4, 1, 6, 2)])
def test_ss2d_scan_torch_matches_definition(shape):
    """The position-major SS2D path against its definition: cross-scan, sequential scan, cross-merge (fp64)."""
    Bb, Dd, H, W, N = shape
    ins = kc.ss2d_inputs((Bb, Dd, H, W, N), torch.float64, "cpu")
    want, got = ss2d_scan_ref(*ins), ss2d_scan_torch(*ins)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(want)
    for n, g, w in zip(kc.NAMES, torch.autograd.grad(got, ins, dy), torch.autograd.grad(want, ins, dy)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f"d{n}")
    t = torch.randn(2, 4, 3, H, W)
    torch.testing.assert_close(to_scan_order_lfirst(t), to_scan_order(t).permute(3, 0, 1, 2))


def test_cross_scan_and_merge_are_adjoint_permutations():
    x = torch.randn(2, 3, 4, 5)
    xs = cross_scan(x)  # (B, 4, D, L)
    torch.testing.assert_close(xs[:, 0], x.flatten(-2))
    torch.testing.assert_close(xs[:, 1], x.transpose(-1, -2).flatten(-2))
    torch.testing.assert_close(xs[:, 2], x.flatten(-2).flip(-1))
    torch.testing.assert_close(to_grid_order(xs, 4, 5), x.unsqueeze(1).expand(-1, 4, -1, -1, -1))
    torch.testing.assert_close(cross_merge(xs, 4, 5).view_as(x), 4 * x)
    t = torch.randn(2, 4, 3, 4, 5)
    torch.testing.assert_close(to_grid_order(to_scan_order(t), 4, 5), t)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_long_sequence_is_finite_in_half_precision(backend):
    ins = kc.ss2d_inputs((1, 4, 64, 64, 1), torch.float16, "cpu")
    y = ss2d_scan_fn(*ins, backend=backend)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_dispatch(monkeypatch):
    monkeypatch.delenv("TOOLKIT_SCAN_BACKEND", raising=False)
    ins = kc.ss2d_inputs((1, 2, 3, 3, 2), torch.float32, "cpu")
    assert torch.equal(ss2d_scan_fn(*ins), ss2d_scan_fn(*ins, backend=auto_cpu()))  # auto on CPU tensors
    assert torch.equal(ss2d_scan_fn(*ins, backend="torch"), ss2d_scan_torch(*ins))
    assert torch.equal(ss2d_scan_fn(*ins, backend="ref"), ss2d_scan_ref(*ins))
    with pytest.raises(ValueError, match="backend"):
        ss2d_scan_fn(*ins, backend="cuda-magic")
    u = kc.scan1d_inputs((1, 2, 5, 2, 1), torch.bfloat16, "cpu")
    for backend in ("ref", "torch"):
        assert selective_scan_fn(*u, backend=backend).dtype == torch.bfloat16  # mamba-ssm returns y in u's dtype


def test_backend_rule_precedence(monkeypatch):
    """argument > innermost ``scan_backend`` block > TOOLKIT_SCAN_BACKEND > auto, per op."""
    ins = kc.ss2d_inputs((1, 2, 3, 3, 2), torch.float32, "cpu")
    maps_args = [t.detach() for t in ins[1:5]]

    def picked(fn, *args, **kw) -> str:  # the backend a call resolves to; the hook answers, so none runs
        seen = []
        with call_hook(lambda op, a: seen.append(a["backend"]) or torch.zeros(())):
            fn(*args, **kw)
        return seen[0]

    monkeypatch.delenv("TOOLKIT_SCAN_BACKEND", raising=False)
    assert picked(ss2d_scan_fn, *ins) == auto_cpu()  # auto on CPU tensors
    assert picked(ss2d_scan_attention_fn, *maps_args, query=(0, 0)) == "ref"  # auto, for an op without torch
    assert resolve_backend("ss2d_scan", None, types.SimpleNamespace(is_cuda=True)) == "triton"  # auto on CUDA
    monkeypatch.setenv("TOOLKIT_SCAN_BACKEND", "ref")
    assert picked(ss2d_scan_fn, *ins) == "ref"  # the variable over auto
    with scan_backend("triton"):
        assert picked(ss2d_scan_fn, *ins) == "triton"  # a block over the variable
        with scan_backend("mamba"):
            assert picked(ss2d_scan_fn, *ins) == "mamba"  # the innermost block
            assert picked(ss2d_scan_attention_fn, *maps_args, query=(0, 0)) == "ref"  # not its backend: auto
            assert picked(ss2d_scan_fn, *ins, backend="torch") == "torch"  # the argument over every block
            assert picked(ss2d_scan_fn, *ins, backend="auto") == auto_cpu()
    with scan_backend("auto"):
        assert picked(selective_scan_fn, *kc.scan1d_inputs((1, 2, 5, 2, 1), torch.float32, "cpu")) == auto_cpu()
    with pytest.raises(ValueError, match="has no backend"):
        ss2d_scan_attention_fn(*maps_args, query=(0, 0), backend="torch")
    with pytest.raises(ValueError, match="scan_backend"):
        with scan_backend("cuda-magic"):
            pass
    monkeypatch.setenv("TOOLKIT_SCAN_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="TOOLKIT_SCAN_BACKEND"):
        ss2d_scan_fn(*ins)


def test_call_hook_sees_every_call_and_may_answer_it(monkeypatch):
    monkeypatch.delenv("TOOLKIT_SCAN_BACKEND", raising=False)
    u = kc.scan1d_inputs((1, 2, 5, 2, 1), torch.float32, "cpu")
    x = kc.ss2d_inputs((1, 2, 3, 3, 2), torch.float32, "cpu")
    seen = []

    def log(op, a):
        seen.append((op, a["backend"], {k: tuple(v.shape) for k, v in a.items() if k in ("u", "x")}))

    y_plain = selective_scan_fn(*u)
    with call_hook(log):
        torch.testing.assert_close(selective_scan_fn(*u), y_plain)  # a hook returning None lets the call run
        with call_hook(lambda op, a: torch.full(a["u"].shape, 7.0)):
            y = selective_scan_fn(*u, backend="ref")
        ss2d_scan_fn(*x)
        ss2d_scan_attention_fn(*[t.detach() for t in x[1:5]], query=(1, 1))
    assert torch.equal(y, torch.full((1, 2, 5), 7.0))  # the innermost hook's answer, in the op's place
    auto = auto_cpu()
    assert seen == [("selective_scan", auto, {"u": (1, 2, 5)}), ("selective_scan", "ref", {"u": (1, 2, 5)}),
                    ("ss2d_scan", auto, {"x": (1, 2, 3, 3)}), ("ss2d_scan_attention", "ref", {})]
    selective_scan_fn(*u)
    assert len(seen) == 4  # the hook is gone after its block


def test_mamba_backend_without_extension_says_how_to_build(monkeypatch):
    try:
        import selective_scan_cuda  # noqa: F401
        pytest.skip("mamba-ssm's CUDA extension is installed")
    except ImportError:
        pass
    ins = kc.ss2d_inputs((1, 2, 3, 3, 2), torch.float32, "cpu")
    with pytest.raises(ImportError, match="mamba-ssm"):
        ss2d_scan_fn(*ins, backend="mamba")


# --- the fused Triton kernels -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _interpreted_grid(dtype_name: str) -> dict:
    """All CPU cases of one dtype, run once in a subprocess under TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, str(here / "kernel_cases.py"), dtype_name, "cpu"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=here)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {(r["kind"], tuple(r["shape"])): r for r in recs}


def _check(rec: dict):
    assert rec["finite"], rec
    bad = {k: v for k, v in rec["excess"].items() if v > 0}
    assert not bad, f"outside tolerance by {bad}; relative errors {rec['rel']}"


CPU_CASES = [("ss2d", s) for s in kc.SS2D_CPU] + [("1d", s) for s in kc.SCAN1D_CPU]


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype_name", list(kc.DTYPES))
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_triton_matches_reference_interpreted(case, dtype_name):
    _check(_interpreted_grid(dtype_name)[case])


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype_name", list(kc.DTYPES))
@pytest.mark.parametrize("case", [("ss2d", s) for s in kc.SS2D_GPU] + [("1d", s) for s in kc.SCAN1D_GPU],
                         ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_triton_matches_reference_on_gpu(case, dtype_name):
    _check(kc.compare(case[0], case[1], kc.DTYPES[dtype_name], "cuda"))


# --- scan-path maps -----------------------------------------------------------------------------------------------

def _brute_force_maps(ins, H, W):
    """Per-channel L x L maps from the scan itself: y_d = M_d x_d (D skip off), direction by direction."""
    x, delta, A, B, C, _, bias = [t.detach().double() for t in ins]
    Bb, Dd = x.shape[:2]
    L = H * W
    per = []
    for k in range(4):
        keep = torch.zeros(4, 1, 1, 1)
        keep[k] = 1.0  # a direction whose B is zero contributes nothing: isolates direction k
        f = lambda xx: ss2d_scan_ref(xx, delta, A, B * keep, C, None, bias)  # noqa: E731
        J = torch.autograd.functional.jacobian(f, x)  # (B, D, H, W, B, D, H, W)
        J = J.reshape(Bb, Dd, L, Bb, Dd, L)
        per.append(torch.stack([torch.stack([J[b, d, :, b, d, :] for d in range(Dd)]) for b in range(Bb)]))
    return torch.stack(per, dim=1)  # (B, K, D, L, L)


def test_scan_attention_matches_brute_force():
    H, W = 3, 4
    ins = kc.ss2d_inputs((1, 3, H, W, 2), torch.float64, "cpu")
    per, merged = ss2d_scan_attention_fn(*[t.detach() for t in ins[1:5]], delta_bias=ins[6].detach(),
                                      channel_reduce="none")
    brute = _brute_force_maps(ins, H, W).float()
    torch.testing.assert_close(per, brute, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(merged, brute.sum(1), rtol=1e-4, atol=1e-6)
    row, row_merged = ss2d_scan_attention_fn(*[t.detach() for t in ins[1:5]], delta_bias=ins[6].detach(),
                                          query=(1, 2))
    torch.testing.assert_close(row, brute.mean(2)[:, :, 1 * W + 2].view(1, 4, H, W), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(row_merged, row.sum(1))


def test_scan_attention_rejects_bad_queries():
    ins = kc.ss2d_inputs((1, 2, 3, 3, 1), torch.float32, "cpu")
    with pytest.raises(ValueError, match="outside"):
        ss2d_scan_attention_fn(*[t.detach() for t in ins[1:5]], query=(5, 0))
    with pytest.raises(ValueError, match="channel_reduce"):
        ss2d_scan_attention_fn(*[t.detach() for t in ins[1:5]], channel_reduce="max")
