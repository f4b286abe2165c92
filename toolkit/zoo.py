"""The backbone zoo table: per registered configuration, its input, tap grid, visual tokens, width, parameters and
the FLOPs of one forward to the tap.

FLOPs follow the fvcore / VMamba convention: one multiply-add (MAC) counts as one "FLOP". Counted:
- every op ``torch.utils.flop_counter.FlopCounterMode`` knows (matmul / linear / einsum, convolution, and
  scaled-dot-product attention), converted from its 2-per-MAC count to MACs (divided by 2);
- the selective scans, which FlopCounterMode cannot see inside (the CUDA/Triton kernels are opaque, and the
  PyTorch paths' internals are not what fvcore counts either): during the counted forward a ``toolkit_kernels``
  call hook answers every ``ss2d_scan_fn`` and ``selective_scan_fn`` call in the scan's place, adding VMamba's own
  analytic count and returning zeros of the right shape. For a selective scan of batch B,
  length L, channels D and state N that count is ``9*B*L*D*N`` plus ``B*D*L`` for the D skip term (no z gate
  passes through either scan here), as in the official VMamba repository, MzeroMiko/VMamba,
  ``classification/models/vmamba.py``: ``flops_selective_scan_fn`` (and ``selective_scan_flop_jit``, which takes
  B, D, L from the scan input ``u`` of shape (B, K*D, L)); its ``flops_selective_scan_ref`` states the unit:
  "multiply-add counted as one flop". For SS2D the K = 4 directions count as D = 4 * d_inner.
Not counted (as in fvcore's default tables for most of them): normalisation, activations, softmax, element-wise
adds/multiplies, pooling, interpolation, cross-scan/merge copies.

Models are built on the ``meta`` device when their constructor allows it (no memory, no time), otherwise built
normally and moved to ``meta``; the forward is counted on ``meta`` tensors, so 1024-px inputs cost nothing. Only a
model whose forward fails on ``meta`` is counted with real tensors on the CPU.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

import toolkit_kernels

ZOO_TAGS = ("paper", "embedded")

ZOO_HEADER = (
    "GFLOPs = one forward to the tap at the listed input, batch {batch}, in the fvcore/VMamba convention "
    "(1 multiply-add = 1 FLOP, i.e. GMACs): matmul/linear/einsum, conv and attention from "
    "torch.utils.flop_counter.FlopCounterMode (its 2-per-MAC count halved) + selective scans counted analytically "
    "(9*B*L*D*N + B*D*L, VMamba's flops_selective_scan_fn; SS2D: D = 4*d_inner), shown alone in scan_GFLOPs. "
    "Norms, activations, softmax and element-wise ops are not counted. params_M: whole module; params_tap_M: "
    "parameters the tap tokens depend on (gradient reach). Weights are random: nothing is downloaded."
)


def scan_flops(batch: int, length: int, channels: int, d_state: int, with_d: bool = True) -> int:
    """VMamba's ``flops_selective_scan_fn`` (MzeroMiko/VMamba, classification/models/vmamba.py): MACs of one
    selective scan, u (B, D, L), A (D, N); ``with_d`` adds the ``D * u`` skip term. No z gate, real-valued."""
    return 9 * batch * length * channels * d_state + (batch * channels * length if with_d else 0)


class _ScanCounter:
    """A ``toolkit_kernels`` call hook standing in for the scans: counts the analytic FLOPs, returns zeros of the
    output's shape and dtype. Other ops (the scan-path maps) run as usual.

    The output stays connected to every input in the autograd graph (times zero), so a backward through it reaches
    the parameters that feed the scan; under ``no_grad`` no extra op runs.
    """

    def __init__(self) -> None:
        self.flops = 0
        self.calls = 0

    @staticmethod
    def _out(shape, dtype, like: torch.Tensor, inputs) -> torch.Tensor:
        y = like.new_zeros(shape, dtype=dtype)
        if torch.is_grad_enabled():
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    y = y + t.sum().to(dtype) * 0
        return y

    def __call__(self, op: str, args: dict[str, Any]) -> torch.Tensor | None:
        stub = {"ss2d_scan": self.ss2d, "selective_scan": self.selective}.get(op)
        return None if stub is None else stub(**args)

    def ss2d(self, x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend=None):
        """x (B, D, H, W), delta (B, K, D, H, W), A (K*D, N) -> y (B, D, H, W) fp32 (``ss2d_scan_fn``'s contract)."""
        b, d, h, w = x.shape
        k, n = delta.shape[1], A.shape[1]
        self.flops += scan_flops(b, h * w, k * d, n, with_d=D is not None)
        self.calls += 1
        return self._out((b, d, h, w), torch.float32, x, (x, delta, A, B, C, D, delta_bias))

    def selective(self, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend=None):
        """u (B, D, L), A (D, N) -> y (B, D, L) in u's dtype (``selective_scan_fn``'s contract)."""
        b, d, length = u.shape
        self.flops += scan_flops(b, length, d, A.shape[1], with_d=D is not None)
        self.calls += 1
        return self._out((b, d, length), u.dtype, u, (u, delta, A, B, C, D, delta_bias))


@contextlib.contextmanager
def count_scans() -> Iterator[_ScanCounter]:
    """Within the block, every scan the models call is counted (and not run): yields the counter."""
    counter = _ScanCounter()
    with toolkit_kernels.call_hook(counter):
        yield counter


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_flop_mapping() -> dict:
    """FlopCounterMode does not know the CPU flash-attention op that SDPA takes on real CPU tensors (on ``meta`` SDPA
    decomposes into bmm, which it counts); give it the same formula as the CUDA attention kernels."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu_flop} if op is not None else {}


def count_flops(model: nn.Module, images: torch.Tensor, *, scans: bool = True) -> dict[str, int]:
    """MACs of ``model.forward_tokens(images)`` (no grad): ``{"counter": FlopCounterMode ops / 2, "scan": analytic
    scan MACs (0 when ``scans`` is False), "total": their sum, "scan_calls": scans seen}``.

    The scans are stubbed in both cases, so ``counter`` never includes a scan implementation's internals and the
    difference between ``scans=True`` and ``scans=False`` is exactly the analytic scan term.
    """
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False, custom_mapping=_custom_flop_mapping())
    with count_scans() as sc, torch.no_grad(), fc:
        model.forward_tokens(images)
    counter = fc.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per multiply-add
    scan = sc.flops if scans else 0
    return {"counter": counter, "scan": scan, "total": counter + scan, "scan_calls": sc.calls}


def tap_parameters(model: nn.Module, images: torch.Tensor) -> int | None:
    """Number of parameters the tap tokens depend on (those a backward from ``forward_tokens`` reaches);
    None if the backward cannot run here."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        with count_scans(), torch.enable_grad():
            out = model.forward_tokens(images)
            grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    except Exception:  # noqa: BLE001 (an op without a meta backward: report "unknown", not a failure)
        return None
    return sum(p.numel() for p, g in zip(params, grads) if g is not None)


def build_for_counting(name: str) -> tuple[nn.Module, str]:
    """Build ``name`` on the ``meta`` device if its constructor allows it, else on the CPU; returns (model, where)."""
    from toolkit.registry import create_backbone

    try:
        with torch.device("meta"):
            return create_backbone(name), "meta"
    except Exception:  # noqa: BLE001 (constructors that read tensor values, e.g. ``linspace().tolist()``)
        return create_backbone(name), "cpu"


def default_names() -> list[str]:
    """Every registered backbone tagged "paper" or "embedded", sorted by name."""
    from toolkit.registry import list_backbones

    return sorted({n for tag in ZOO_TAGS for n in list_backbones(tag=tag)})


def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


def zoo_row(name: str, batch: int = 1) -> dict[str, object]:
    """One row of the zoo table for the registered backbone ``name`` at its configured input size."""
    from toolkit.registry import backbone_entry

    model, built_on = build_for_counting(name)
    model.eval()
    hw = tuple(model.data_config.img_size)
    grid = model.grid(hw)
    n_params = sum(p.numel() for p in model.parameters())
    counted_on, flops, n_tap = "meta", None, None
    try:
        model = model.to("meta")
        x = torch.zeros(batch, 3, *hw, device="meta")
        flops = count_flops(model, x)
        n_tap = tap_parameters(model, x)
    except Exception:  # noqa: BLE001 (a forward that cannot run on meta: count with real tensors on the CPU)
        from toolkit.registry import create_backbone

        model, counted_on = create_backbone(name).eval(), "cpu"
        x = torch.zeros(batch, 3, *hw)
        flops = count_flops(model, x)
        n_tap = tap_parameters(model, x)
    return dict(
        id=name, family=backbone_entry(name).family, input=f"{hw[0]}x{hw[1]}", grid=f"{grid[0]}x{grid[1]}",
        tokens=model.num_tokens(hw), dim=model.embed_dim, params_M=_sig(n_params / 1e6),
        params_tap_M=_sig(n_tap / 1e6) if n_tap is not None else None,
        GFLOPs=_sig(flops["total"] / 1e9), scan_GFLOPs=_sig(flops["scan"] / 1e9),
        built_on=built_on, counted_on=counted_on,
        # exact integers for tests and scripts; the printed table drops them
        _params=n_params, _params_tap=n_tap, _macs=flops["total"], _macs_counter=flops["counter"],
        _macs_scan=flops["scan"], _scan_calls=flops["scan_calls"],
    )


def zoo_table(names: Iterable[str] | None = None, batch: int = 1) -> list[dict[str, object]]:
    """One row per backbone (default: every registered backbone tagged "paper" or "embedded"): id, family,
    input HxW, tap grid hxw, visual tokens, embed dim, parameters (whole and up to the tap, millions), GFLOPs of one
    forward to the tap at batch ``batch`` (fvcore convention: MACs; see the module docstring) and the scans' share.

    Keys starting with ``_`` hold the exact integer counts.
    """
    return [zoo_row(n, batch) for n in (list(names) if names is not None else default_names())]


def with_paper(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Rows with the paper's token and parameter columns beside ours (``toolkit.paper.paper_table``); the paper's
    configurations without a row here (e.g. not registered yet) are appended with the paper's numbers only."""
    from toolkit.paper import PAPER_CONFIGS, paper_table

    paper = {r["id"]: r for r in paper_table()}
    out = []
    for r in rows:
        p = paper.get(r["id"])
        out.append({**r, "tokens_paper": p["tokens_paper"] if p else "", "params_paper_M": p["params_paper_m"] if p
                    else ""})
    seen = {r["id"] for r in rows}
    for pid, p in paper.items():
        if pid not in seen:
            h, w = PAPER_CONFIGS[pid].input_hw  # paper_table writes WxH; this table writes HxW
            out.append(dict(id=pid, family=p["family"], input=f"{h}x{w}", grid="", tokens="not built", dim="",
                            params_M="", params_tap_M="", GFLOPs="", scan_GFLOPs="", built_on="", counted_on="",
                            tokens_paper=p["tokens_paper"], params_paper_M=p["params_paper_m"]))
    return out


def format_zoo(rows: list[dict[str, object]], batch: int = 1) -> str:
    """The header line and a GitHub-markdown table of ``rows`` (private ``_`` keys dropped)."""
    from tabulate import tabulate

    shown = [{k: ("" if v is None else v) for k, v in r.items() if not k.startswith("_")} for r in rows]
    return ZOO_HEADER.format(batch=batch) + "\n\n" + tabulate(shown, headers="keys", tablefmt="github")
