"""Scan-path maps: the Triton kernel (``ss2d_scan_attention_triton``) against the float64 definition
(``ss2d_scan_attention_ref``), on the CPU under TRITON_INTERPRET=1 (in a subprocess, so that the variable is set
before Triton is first imported) and on a GPU at VMamba's stage shapes; and the dispatcher ``ss2d_scan_attention_fn``.

``TRITON_INTERPRET=1 python tests/test_scan_paths_kernel.py`` runs the CPU grid and prints one JSON line per case.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import kernel_cases as kc
from toolkit_kernels import ss2d_scan_attention_fn, ss2d_scan_attention_ref
from toolkit_kernels.dispatch import resolve_backend

HAS_TRITON = importlib.util.find_spec("triton") is not None

# (rtol, atol as a fraction of max |reference|). The kernel reads the same rounded bf16/fp16 inputs as the reference,
# so it differs only by fp32 against float64 arithmetic and the tolerance does not depend on the input dtype.
TOL = {"fp32": (1e-4, 5e-6), "bf16": (1e-4, 5e-6), "fp16": (1e-4, 5e-6)}
# Long grids: the kernel's backward product of decays stays near fp32 rounding (about 7e-7 relative seen at 64x64),
# where the reference's formula (differences of cumulative sums of dt*A) run in fp32 instead of float64 errs by 4e-5.
TOL_LONG = (1e-5, 2e-7)

# A case: (mode, (batch, channels, H, W, d_state), dtype, channel_reduce, (BLOCK_D, BLOCK_L) or None, split).
# mode "rows": a batch of 3 query cells through ``ss2d_scan_rows_triton`` against rows of the reference's full
# matrices; "query": one cell, "full": all L x L, both through ``ss2d_scan_attention_triton`` (what the dispatcher
# calls; called directly so that no backend setting can turn a GPU run into reference against reference);
# "long": "rows" on a grid too large for full reference matrices, with a tighter tolerance.
# Blocks (2, 8) give several tiles and channel blocks on the tiny grids (the interpreter's time grows with both, so
# fp32 alone takes them: the dtype only changes the loads); d_state 16 has 32-position tiles and 4-channel blocks
# by default. split=False runs every channel block of a row in one program (TARGET_PROGRAMS=1), not one per block.
GRIDS = [(3, 5), (7, 4), (8, 8)]
CPU_CASES = (
    [("rows", (1, 5, H, W, N), "fp32", "mean", (2, 8), True) for H, W in GRIDS for N in (1, 4)]
    + [("rows", (2, 5, H, W, N), dt, "mean", None, True) for H, W in GRIDS for N in (1, 4, 16) for dt in TOL
       if (dt, N) != ("fp32", 1) and (dt, N) != ("fp32", 4)]
    + [("query", (1, 6, H, W, 4), dt, "none", None, True) for H, W in GRIDS for dt in TOL]
    + [("full", (1, 3, 3, 5, 4), dt, "mean", None, True) for dt in TOL]
    + [("full", (1, 2, 7, 4, 1), "fp32", "none", (2, 16), True),
       ("full", (1, 3, 3, 5, 16), "bf16", "mean", (2, 8), False),
       ("query", (1, 5, 12, 11, 16), "fp16", "mean", (2, 16), False),
       ("long", (1, 2, 64, 64, 1), "fp32", "mean", None, True)]
)
GPU_CASES = (
    [("rows", (2, 96, 56, 56, 1), dt, "mean", None, True) for dt in TOL]
    + [("full", (1, 192, 28, 28, 1), "bf16", "mean", None, True),
       ("full", (2, 48, 32, 32, 4), "fp32", "mean", None, True),
       ("full", (1, 16, 20, 20, 4), "fp16", "none", None, True),
       ("query", (2, 64, 17, 23, 16), "bf16", "none", None, True),
       ("query", (1, 768, 7, 7, 1), "fp16", "mean", None, True),
       ("rows", (1, 48, 96, 64, 4), "fp32", "mean", None, True),
       ("long", (1, 8, 128, 128, 1), "fp32", "mean", None, True)]
)


def case_id(case) -> str:
    mode, shape, dt, reduce, blocks, split = case
    return (f"{mode}-{'x'.join(map(str, shape))}-{dt}-{reduce}" + (f"-b{blocks[0]}x{blocks[1]}" if blocks else "")
            + ("" if split else "-nosplit"))


def _queries(H: int, W: int) -> list[int]:
    """First cell, an interior cell, last cell (spatial indices): each is first or last in some direction."""
    return [0, (H // 2) * W + W // 3, H * W - 1]


def compare(case, device: str) -> dict:
    """Max error of the kernel against the reference, absolute and relative to max |reference|, and the excess over
    the tolerance (<= 0 passes)."""
    from toolkit_kernels import ss2d_scan_attention_triton as spt
    mode, (Bb, Dd, H, W, N), dt_name, reduce, blocks, split = case
    ins = [t.detach() for t in kc.ss2d_inputs((Bb, Dd, H, W, N), kc.DTYPES[dt_name], device)]
    delta, A, B, C, bias = ins[1], ins[2], ins[3], ins[4], ins[6]
    spt.BLOCK_OVERRIDE = blocks
    spt.TARGET_PROGRAMS = 1024 if split else 1
    try:
        if mode in ("rows", "long"):
            qs = _queries(H, W)
            got = spt.ss2d_scan_rows_triton(delta, A, B, C, torch.tensor(qs), bias, True, reduce)  # (B, K, Q, L)
            if mode == "long":  # L x L matrices would not fit: the reference one query at a time
                want = torch.stack([ss2d_scan_attention_ref(delta, A, B, C, bias, query=divmod(q, W),
                                                                       channel_reduce=reduce)[0].flatten(-2)
                                    for q in qs], dim=2)
            else:
                full = ss2d_scan_attention_ref(delta, A, B, C, bias, channel_reduce=reduce)[0]
                want = full[:, :, qs]
            got_m, want_m = got.sum(1), want.sum(1)
        else:
            q = None if mode == "full" else (H // 2, W - 2)
            got, got_m = spt.ss2d_scan_attention_triton(delta, A, B, C, bias, query=q, channel_reduce=reduce)
            want, want_m = ss2d_scan_attention_ref(delta, A, B, C, bias, query=q, channel_reduce=reduce)
    finally:
        spt.BLOCK_OVERRIDE, spt.TARGET_PROGRAMS = None, 1024
    rtol, atol = TOL_LONG if mode == "long" else TOL[dt_name]
    rec = {"id": case_id(case), "shape_ok": got.shape == want.shape and got_m.shape == want_m.shape,
           "dtype_ok": got.dtype == torch.float32, "finite": bool(torch.isfinite(got).all())}
    if rec["shape_ok"]:
        for name, a, b in (("per", got, want), ("merged", got_m, want_m)):
            a, b = a.double(), b.double()
            scale = b.abs().max().item()
            err = (a - b).abs()
            rec[name] = {"max_abs": err.max().item(), "max_rel_scale": err.max().item() / scale,
                         "excess": (err - atol * scale - rtol * b.abs()).max().item()}
    return rec


def _check(rec: dict):
    assert rec["shape_ok"] and rec["dtype_ok"] and rec["finite"], rec
    for name in ("per", "merged"):
        assert rec[name]["excess"] <= 0, f"{name} outside tolerance: {rec}"


@functools.lru_cache(maxsize=None)
def _interpreted() -> dict:
    """Every CPU case, run once in one subprocess under TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("TOOLKIT_SCAN_BACKEND", None)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["id"]: r for r in recs}


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_scan_paths_triton_matches_reference_interpreted(case):
    _check(_interpreted()[case_id(case)])


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_scan_paths_triton_matches_reference_on_gpu(case):
    _check(compare(case, "cuda"))


# --- dispatch ---------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_triton(monkeypatch):
    """Stands in for ``ss2d_scan_attention_triton`` (no Triton needed) and records the calls that reach it."""
    calls = []
    mod = types.ModuleType("toolkit_kernels.ss2d_scan_attention_triton")

    def attention(delta, *args):
        calls.append(args)
        return ss2d_scan_attention_ref(delta, *args)

    mod.ss2d_scan_attention_triton = attention
    monkeypatch.setitem(sys.modules, "toolkit_kernels.ss2d_scan_attention_triton", mod)
    monkeypatch.delenv("TOOLKIT_SCAN_BACKEND", raising=False)
    return calls


def _inputs():
    ins = [t.detach() for t in kc.ss2d_inputs((1, 2, 3, 4, 2), torch.float32, "cpu")]
    return (ins[1], ins[2], ins[3], ins[4]), {"delta_bias": ins[6]}


def test_auto_runs_reference_on_cpu(fake_triton):
    args, kw = _inputs()
    for backend in (None, "auto"):
        per, merged = ss2d_scan_attention_fn(*args, **kw, query=(1, 1), backend=backend)
        ref = ss2d_scan_attention_ref(*args, **kw, query=(1, 1))
        assert torch.equal(per, ref[0]) and torch.equal(merged, ref[1])
    assert not fake_triton
    cuda = types.SimpleNamespace(is_cuda=True)
    assert resolve_backend("ss2d_scan_attention", None, cuda) == "triton"  # auto on CUDA tensors
    assert resolve_backend("ss2d_scan_attention", "ref", cuda) == "ref"


def test_triton_backend_is_called_with_the_same_arguments(fake_triton):
    args, kw = _inputs()
    ss2d_scan_attention_fn(*args, **kw, channel_reduce="none", backend="triton")
    assert len(fake_triton) == 1 and fake_triton[0][-2:] == (None, "none")  # query, channel_reduce


def test_argument_overrides_environment(fake_triton, monkeypatch):
    monkeypatch.setenv("TOOLKIT_SCAN_BACKEND", "ref")
    args, kw = _inputs()
    per, _ = ss2d_scan_attention_fn(*args, **kw, backend="triton")
    assert len(fake_triton) == 1 and torch.equal(per, ss2d_scan_attention_ref(*args, **kw)[0])
    assert resolve_backend("ss2d_scan_attention", None, types.SimpleNamespace(is_cuda=True)) == "ref"


def test_bad_arguments_fail_before_any_backend(fake_triton):
    args, kw = _inputs()
    with pytest.raises(ValueError, match="backend"):
        ss2d_scan_attention_fn(*args, **kw, backend="cuda-magic")
    for bad in ({"query": (3, 0)}, {"channel_reduce": "max"}):
        with pytest.raises(ValueError, match="outside|channel_reduce"):
            ss2d_scan_attention_fn(*args, **kw, **bad, backend="triton")
    ins = [t.detach() for t in kc.ss2d_inputs((1, 1, 33, 32, 1), torch.float32, "cpu")]
    with pytest.raises(ValueError, match="MAX_FULL_LEN|limited"):
        ss2d_scan_attention_fn(*ins[1:5], backend="triton")
    assert not fake_triton


if __name__ == "__main__":
    for c in CPU_CASES:
        print(json.dumps(compare(c, "cpu")), flush=True)
