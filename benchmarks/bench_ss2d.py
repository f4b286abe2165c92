"""SS2D scan benchmark: fused Triton kernel vs the unfused PyTorch path vs mamba-ssm's kernel (+ separate cross-scan
and cross-merge), per VMamba stage shape, with achieved bandwidth against a measured roofline; then end-to-end
VMamba-S encoder throughput per backend. On a machine without CUDA it measures the CPU figures instead: the embedded
VMamba's training step against a ViT of the same width and depth.

    python benchmarks/bench_ss2d.py [--dtype bf16] [--json out.json]

The roofline counts the fewest bytes each direction must move through device memory: every input read once and
every output written once (y and the gradients in fp32 for the forward's y, in the input dtype for gradients), at
the bandwidth of a large device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kernel_cases as kc  # noqa: E402
from toolkit_kernels import scan_backend, ss2d_scan_fn  # noqa: E402

# (label, batch, channels, H, W, d_state): VMamba-T/-S (v05_noz, d_state 1) at 224 px, batch 64, every stage; the
# first two stages of VMamba-S on a 1024 x 1024 detection input (ViTDet-style), batch 2.
STAGES = ([(f"T-224 s{i + 1}", 64, 96 * 2 ** i, 56 // 2 ** i, 56 // 2 ** i, 1) for i in range(4)]
          + [(f"S-224 s{i + 1}", 64, 192 * 2 ** i, 56 // 2 ** i, 56 // 2 ** i, 1) for i in range(4)]
          + [("S-1024 s1", 2, 192, 256, 256, 1), ("S-1024 s2", 2, 384, 128, 128, 1)])


def mamba_available() -> bool:
    try:
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # noqa: BLE001 (any import failure means: not usable here)
        return False
    return True


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20)."""
    import triton.testing
    a = torch.empty(2 ** 30, dtype=torch.int16, device="cuda").random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


def stage_bytes(Bb, Dd, H, W, N, es: int) -> tuple[int, int]:
    """Fewest bytes (forward, backward). Forward reads x, delta (4 directions), B, C; writes y fp32. Backward also
    reads dy (fp32) and writes dx, ddelta, dB, dC in the input dtype (A, D and the bias are negligible)."""
    L = Bb * H * W
    ins = es * (Dd * L + 4 * Dd * L + 2 * 4 * N * L)
    return ins + 4 * Dd * L, ins + 4 * Dd * L + es * (Dd * L + 4 * Dd * L + 2 * 4 * N * L)


def bench_stage(shape, dtype, backends, bw) -> list[dict]:
    import triton.testing
    label, Bb, Dd, H, W, N = shape
    es = torch.finfo(dtype).bits // 8
    fwd_bytes, bwd_bytes = stage_bytes(Bb, Dd, H, W, N, es)
    n_sets = max(1, min(4, int(2 * 50e6 // fwd_bytes) + 1))  # rotate inputs so that L2 (50 MB) cannot hold them
    sets = [kc.ss2d_inputs((Bb, Dd, H, W, N), dtype, "cuda", seed=s) for s in range(n_sets)]
    rows = []
    for be in backends:
        it = iter(range(10 ** 9))

        def fwd():
            with torch.no_grad():
                return ss2d_scan_fn(*sets[next(it) % n_sets], backend=be)

        graphs = []
        for ins in sets:
            y = ss2d_scan_fn(*ins, backend=be)
            graphs.append((y, ins, torch.randn_like(y)))

        def bwd():
            y, ins, dy = graphs[next(it) % n_sets]
            return torch.autograd.grad(y, ins, dy, retain_graph=True)

        try:
            t_f = triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median") * 1e-3
            t_b = triton.testing.do_bench(bwd, warmup=25, rep=200, return_mode="median") * 1e-3
        except Exception as e:  # noqa: BLE001 (report and go on with the other backends)
            print(f"{label} {be}: failed: {e}", file=sys.stderr)
            continue
        rows.append({"stage": label, "shape": f"{Bb}x{Dd}x{H}x{W} N={N}", "backend": be,
                     "fwd_ms": 1e3 * t_f, "fwd_GBs": fwd_bytes / t_f / 1e9, "fwd_roofline": fwd_bytes / bw / t_f,
                     "bwd_ms": 1e3 * t_b, "bwd_GBs": bwd_bytes / t_b / 1e9, "bwd_roofline": bwd_bytes / bw / t_b,
                     "bwd_over_fwd": t_b / t_f})
        del graphs
    return rows


SWEEP = [(32, 128, 4), (16, 128, 4), (8, 128, 2), (16, 64, 2), (64, 64, 8), (8, 256, 4)]


def sweep(stages, dtype, bw) -> list[dict]:
    """The fused kernel at every (BLOCK_D, BLOCK_L, num_warps) of SWEEP, per stage shape."""
    import toolkit_kernels.selective_scan_triton as st
    rows = []
    for shape in stages:
        for cfg in SWEEP:
            st.BLOCK_OVERRIDE = cfg
            rows += [dict(r, cfg=cfg) for r in bench_stage(shape, dtype, ["triton"], bw)]
        st.BLOCK_OVERRIDE = None
    return [{k: r[k] for k in ("stage", "cfg", "fwd_ms", "fwd_roofline", "bwd_ms", "bwd_roofline")} for r in rows]


def bench_encoder(dtype, backends, batch=64) -> list[dict]:
    """VMamba-S encoder (stage-3 tap, 224 px) images/s under autocast: inference and a full training step."""
    import triton.testing
    from toolkit import create_backbone
    model = create_backbone("vmamba-s-in1k-224-s3").cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    rows = []
    for be in backends:
        with scan_backend(be), torch.autocast("cuda", dtype=dtype):
            def infer():
                with torch.no_grad():
                    return model.forward_tokens(x)

            def train():
                model.zero_grad(set_to_none=True)
                model.forward_tokens(x).float().square().mean().backward()

            try:
                t_i = triton.testing.do_bench(infer, warmup=100, rep=1000, return_mode="median") * 1e-3
                t_t = triton.testing.do_bench(train, warmup=100, rep=1000, return_mode="median") * 1e-3
            except Exception as e:  # noqa: BLE001
                print(f"encoder {be}: failed: {e}", file=sys.stderr)
                continue
        rows.append({"backend": be, "batch": batch, "infer_img_s": batch / t_i, "train_img_s": batch / t_t})
    return rows


def bench_cpu(steps: int = 10) -> list[dict]:
    """Training step time (fwd + bwd + AdamW) of the embedded VMamba and of a ViT with the same width and depth."""
    from toolkit import create_backbone
    rows = []
    x = torch.randn(32, 3, 128, 128)
    for name, kw in [("vmamba-scene-128-s3", {}), ("vit-scene-128", {})]:
        model = create_backbone(name, **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model.forward_pooled(x).float().square().mean().backward()
            opt.step()
            if i:  # the first step pays one-off allocation costs
                times.append(time.perf_counter() - t0)
        n = sum(p.numel() for p in model.parameters())
        rows.append({"backbone": name, "params_M": n / 1e6, "step_s": statistics.median(times),
                     "img_s": 32 / statistics.median(times)})
    rows.append({"backbone": "ratio vmamba/vit", "step_s": rows[0]["step_s"] / rows[1]["step_s"]})
    return rows


def table(rows: list[dict], floatfmt=".3g") -> str:
    from tabulate import tabulate
    return tabulate(rows, headers="keys", floatfmt=floatfmt, tablefmt="github")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=list(kc.DTYPES))
    ap.add_argument("--backends", default="triton,torch,mamba", help="comma-separated; mamba is skipped if not built")
    ap.add_argument("--stages", default="", help="only stages whose label contains this")
    ap.add_argument("--no-encoder", action="store_true")
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time the fused kernel over block configs instead")
    ap.add_argument("--json", default=None, help="also write every figure here")
    args = ap.parse_args(argv)
    out: dict = {"torch": torch.__version__}
    if not torch.cuda.is_available():
        out["device"] = "cpu"
        out["cpu_train"] = bench_cpu()
        print("CPU (no CUDA device): embedded VMamba vs ViT, training step at batch 32, 128 px")
        print(table(out["cpu_train"]))
    else:
        dtype = kc.DTYPES[args.dtype]
        backends = [b for b in args.backends.split(",") if b != "mamba" or mamba_available()]
        out["device"] = torch.cuda.get_device_name()
        out["copy_GBs"] = copy_bandwidth() / 1e9
        print(f"{out['device']}: device-to-device copy {out['copy_GBs']:.0f} GB/s (read + write); dtype {args.dtype}; "
              f"backends {backends}", flush=True)
        out["stages"] = []
        if args.sweep:
            out["sweep"] = sweep([s for s in STAGES if args.stages in s[0]], dtype, out["copy_GBs"] * 1e9)
            print(table(out["sweep"]))
            args.no_stages = args.no_encoder = True
        for shape in STAGES if not args.no_stages else []:
            if args.stages in shape[0]:
                out["stages"] += bench_stage(shape, dtype, backends, out["copy_GBs"] * 1e9)
                print(table([r for r in out["stages"] if r["stage"] == shape[0]]), flush=True)
        fused = {r["stage"]: r for r in out["stages"] if r["backend"] == "triton"}
        out["speedup"] = [{"stage": s, "vs": r["backend"], "fwd_x": r["fwd_ms"] / fused[s]["fwd_ms"],
                           "bwd_x": r["bwd_ms"] / fused[s]["bwd_ms"]}
                          for r in out["stages"] if r["backend"] != "triton" and (s := r["stage"]) in fused]
        if not args.no_encoder:
            out["encoder"] = bench_encoder(dtype, backends)
        print("\nper stage:\n" + table(out["stages"]))
        print("\nfused Triton speed-up over the other backends:\n" + table(out["speedup"]))
        if out.get("encoder"):
            print("\nVMamba-S encoder (stage-3 tap, 224 px, batch 64, autocast):\n" + table(out["encoder"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
