"""Scan-path map benchmark (GPU only): the float64 PyTorch reference against the Triton kernel, per VMamba stage shape,
for one query row (what ``toolkit.interpret.scan_paths`` asks for) and for the full L x L matrices (grids up to
``MAX_FULL_LEN`` cells), channels averaged. Batch 1: the maps are read for one image at a time.

    python benchmarks/bench_scan_paths.py [--dtype fp32] [--stages T-224] [--json out.json]

Without a CUDA device it says so and exits with status 0: the reference's CPU time is not what this compares.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_cases as kc  # noqa: E402
from toolkit_kernels import MAX_FULL_LEN, ss2d_scan_attention_fn  # noqa: E402

# (label, channels, H, W, d_state): SS2D inner widths of VMamba-T (ssm_ratio 1) and -S (ssm_ratio 2) at 224 px,
# as in bench_ss2d.py; the 1024 px detection input's stage 2 for a long row; d_state 16 for the state loop.
STAGES = ([(f"T-224 s{i + 1}", 96 * 2 ** i, 56 // 2 ** i, 56 // 2 ** i, 1) for i in range(4)]
          + [(f"S-224 s{i + 1}", 192 * 2 ** i, 56 // 2 ** i, 56 // 2 ** i, 1) for i in range(4)]
          + [("S-1024 s2", 384, 128, 128, 1), ("N16 28x28", 192, 28, 28, 16)])


def bench_stage(shape, dtype) -> list[dict]:
    import triton.testing
    label, Dd, H, W, N = shape
    ins = [t.detach() for t in kc.ss2d_inputs((1, Dd, H, W, N), dtype, "cuda")]
    args, kw = (ins[1], ins[2], ins[3], ins[4]), {"delta_bias": ins[6]}
    rows = []
    for mode, query in (("row", (H // 2, W // 2)), ("full", None)):
        if query is None and H * W > MAX_FULL_LEN:
            continue
        row = {"stage": label, "shape": f"{Dd}x{H}x{W} N={N}", "mode": mode}
        maps = {}
        for be in ("ref", "triton"):
            fn = lambda be=be: ss2d_scan_attention_fn(*args, **kw, query=query, backend=be)[0]  # noqa: E731
            try:
                row[f"{be}_ms"] = triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
                maps[be] = fn().double()
            except torch.cuda.OutOfMemoryError:
                row[f"{be}_ms"] = float("nan")
            torch.cuda.empty_cache()
        row["speedup"] = row["ref_ms"] / row["triton_ms"]
        if len(maps) == 2:
            row["max_err/max"] = ((maps["triton"] - maps["ref"]).abs().max() / maps["ref"].abs().max()).item()
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp32", choices=list(kc.DTYPES), help="dtype of delta, B and C")
    ap.add_argument("--stages", default="", help="only stages whose label contains this")
    ap.add_argument("--json", default=None, help="also write every figure here")
    args = ap.parse_args(argv)
    out: dict = {"torch": torch.__version__}
    if not torch.cuda.is_available():
        print("bench_scan_paths: no CUDA device; the Triton scan-path kernel is timed on a GPU only (nothing to do).")
        return out
    from tabulate import tabulate
    out["device"] = torch.cuda.get_device_name()
    out["rows"] = []
    print(f"{out['device']}: scan-path maps, batch 1, dtype {args.dtype}, channels averaged; medians of do_bench",
          flush=True)
    for shape in STAGES:
        if args.stages in shape[0]:
            out["rows"] += bench_stage(shape, kc.DTYPES[args.dtype])
            print(f"{shape[0]} done", file=sys.stderr, flush=True)
    print(tabulate(out["rows"], headers="keys", floatfmt=".3g", tablefmt="github"))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
