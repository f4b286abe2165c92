"""CPU scan backends side by side, in one run: the C++ kernel ("cpp") against the plain-PyTorch backend ("torch").

    OMP_NUM_THREADS=2 python benchmarks/bench_cpu_scan.py [--threads 2] [--json out.json] [--no-cold-build]

1. Build: seconds of the first use of the extension in this process (a load when torch's extension cache already
   holds the build), and of a cold build from an empty cache directory in a subprocess (the first use on a machine).
2. SS2D scan per stage shape: forward ms (under no_grad) and forward+backward ms (dy random) per backend, and the
   ratio torch/cpp. Shapes: the embedded VMamba (``vmamba-scene-128-s3``, batch 32 at 128 px; its scan inputs
   captured from the model, so with the strides it passes: channels-last maps) and VMamba-S at 224 px (stages 1-4,
   d_state 1, ``--s224-batch``, inputs laid out as the model lays them out). Beside each: the bandwidth bound (the
   forward's least bytes at the copy bandwidth measured in the same run) and the arithmetic floor (the forward's
   math alone, ``arithmetic_floor_ms`` of the extension: what the CPU's vector units need whatever the layout).
3. Training step (train mode, channels-last batch 32 at 128 px, ``forward_tokens`` + backward of mean(tokens**2) +
   AdamW step, as benchmarks/bench_backbones.py): the embedded VMamba under each scan backend, and
   ``vit-scene-128`` (no scan) as the reference, interleaved.
Every figure is the median of ``--reps`` (scans) or ``--steps`` (training) timed repetitions after warm-up, the
backends interleaved so that a shared machine's drift hits them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from toolkit_kernels import call_hook, scan_backend, ss2d_scan_fn  # noqa: E402

BACKENDS = ("torch", "cpp")
VMAMBA, VIT = "vmamba-scene-128-s3", "vit-scene-128"


def cold_build_seconds() -> float:
    """A build from an empty extension directory, in a fresh process (what the first use on a machine costs)."""
    code = ("import time; from toolkit_kernels.selective_scan_cpp import extension; t = time.perf_counter(); "
            "extension(); print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=d)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                             check=True)
    return float(out.stdout.strip().splitlines()[-1])


def embedded_scan_inputs(batch: int) -> list[tuple[str, list[torch.Tensor]]]:
    """The SS2D calls of one ``forward_tokens`` of the embedded VMamba at ``batch``, inputs as the model passes them."""
    from toolkit.registry import create_backbone
    model = create_backbone(VMAMBA).eval()
    calls = []

    def keep(op, a):
        calls.append([a[k] for k in ("x", "delta", "A", "B", "C", "D", "delta_bias")])
        return torch.zeros(a["x"].shape)

    x = torch.randn(batch, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), call_hook(keep):
        model.forward_tokens(x)
    out, seen = [], set()
    for ins in calls:
        Bb, Dd, H, W = ins[0].shape
        label = f"emb s{len(seen) + 1} {Dd}x{H}x{W}"
        if (Dd, H, W) not in seen:  # a stage's blocks share the shape: one row per stage
            seen.add((Dd, H, W))
            out.append((label, [t.detach() for t in ins]))  # views kept: the strides the model passes
    return out


def model_layout_inputs(Bb: int, Dd: int, H: int, W: int, N: int = 1) -> list[torch.Tensor]:
    """SS2D inputs with VMamba's memory layout: x channels-last, delta (K, B, H, W, D) in memory (the einsum's
    output), B and C strided slices of x_dbl (B, H, W, K, R + 2N)."""
    g = torch.Generator().manual_seed(0)
    R = -(-Dd // 2 // 16)  # dt_rank ceil(d_model / 16), d_model = Dd / ssm_ratio 2
    x = torch.randn(Bb, H, W, Dd, generator=g).permute(0, 3, 1, 2)
    delta = (0.5 * torch.randn(4, Bb, H, W, Dd, generator=g) - 1.0).permute(1, 0, 4, 2, 3)
    x_dbl = torch.randn(Bb, H, W, 4, R + 2 * N, generator=g)
    B = x_dbl[..., R:R + N].permute(0, 3, 4, 1, 2)
    C = x_dbl[..., R + N:].permute(0, 3, 4, 1, 2)
    A = -(torch.rand(4 * Dd, N, generator=g) + 0.5)
    return [x, delta, A, B, C, torch.ones(4 * Dd), 0.1 * torch.randn(4 * Dd, generator=g)]


def copy_bandwidth_gbs(mib: int = 256, reps: int = 5) -> float:
    """This machine's memory bandwidth as a large fp32 copy moves it (read + write bytes / time), best of ``reps``."""
    src = torch.randn(mib * 2 ** 18)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def scan_bytes(ins: list[torch.Tensor]) -> int:
    """The least a forward SS2D scan must move: read x, delta, B, C (and A, D, bias), write y (fp32, once each)."""
    x = ins[0]
    return 4 * (sum(t.numel() for t in ins) + x.numel())


def time_scan(ins: list[torch.Tensor], backends, warmup: int, reps: int) -> dict:
    """Median ms of forward (no_grad) and forward+backward per backend, interleaved."""
    leaves = [t.detach().requires_grad_() for t in ins]
    dy = torch.randn_like(ins[0], dtype=torch.float32)  # laid out like y (as x): what the next layer passes back
    times = {b: {"fwd": [], "fwdbwd": []} for b in backends}
    for rep in range(warmup + reps):
        for b in backends:
            t0 = time.perf_counter()
            with torch.no_grad():
                ss2d_scan_fn(*leaves, delta_softplus=True, backend=b)
            t1 = time.perf_counter()
            y = ss2d_scan_fn(*leaves, delta_softplus=True, backend=b)
            torch.autograd.grad(y, leaves, dy)
            t2 = time.perf_counter()
            if rep >= warmup:
                times[b]["fwd"].append(1e3 * (t1 - t0))
                times[b]["fwdbwd"].append(1e3 * (t2 - t1))
    return {b: {k: statistics.median(v) for k, v in d.items()} for b, d in times.items()}


class TrainStep:
    """One backbone's training step (as benchmarks/bench_backbones.py's ``Bench.train_step``), channels-last input."""

    def __init__(self, name: str, batch: int):
        from toolkit.registry import create_backbone
        torch.manual_seed(0)
        self.model = create_backbone(name).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        hw = tuple(self.model.data_config.img_size)
        self.x = torch.randn(batch, 3, *hw).contiguous(memory_format=torch.channels_last)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.model.forward_tokens(self.x).float().square().mean().backward()
        self.opt.step()
        return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--batch", type=int, default=32, help="embedded VMamba/ViT batch (scan shapes and training)")
    ap.add_argument("--s224-batch", type=int, default=8, help="batch of the VMamba-S 224 px scan shapes")
    ap.add_argument("--reps", type=int, default=7, help="timed scan repetitions")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-cold-build", action="store_true", help="skip the cold build in a subprocess")
    ap.add_argument("--no-train", action="store_true", help="skip the training steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from toolkit_kernels.selective_scan_cpp import build_seconds, extension
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, load average {load}", flush=True)
    out: dict = {"threads": torch.get_num_threads(), "load_average": load}

    extension()
    out["first_use_s"] = build_seconds()
    print(f"\nextension first use in this process: {out['first_use_s']:.1f} s", flush=True)
    if not args.no_cold_build:
        out["cold_build_s"] = cold_build_seconds()
        print(f"cold build (empty extension cache, fresh process): {out['cold_build_s']:.1f} s", flush=True)

    shapes = embedded_scan_inputs(args.batch)
    shapes = [(f"{label} (B={args.batch})", ins) for label, ins in shapes]
    for i in range(4):
        Dd, hw = 192 * 2 ** i, 56 // 2 ** i
        shapes.append((f"S-224 s{i + 1} {Dd}x{hw}x{hw} (B={args.s224_batch})",
                       model_layout_inputs(args.s224_batch, Dd, hw, hw)))
    bw = out["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    print(f"\nmemory bandwidth (256 MiB fp32 copy, best of 5): {bw:.1f} GB/s; bound = the forward's least bytes "
          "(inputs read once, y written once) at that bandwidth")
    print("SS2D scan, ms (median of %d); ratio = torch / cpp; x bound = fwd cpp / bound; math = the forward's "
          "arithmetic alone on L1-resident data (the kernel's own softplus, exp and FMAs, best of 5): the floor "
          "under any memory layout" % args.reps)
    head = f"| {'shape':<34} | {'fwd torch':>9} | {'fwd cpp':>8} | {'ratio':>6} | {'f+b torch':>9} | " \
           f"{'f+b cpp':>8} | {'ratio':>6} | {'bound':>6} | {'x bound':>7} | {'math':>6} | {'math x bound':>12} |"
    print(head + "\n|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|", flush=True)
    out["scan"] = []
    for label, ins in shapes:
        t = time_scan(ins, BACKENDS, args.warmup, args.reps)
        bound = 1e3 * scan_bytes(ins) / (bw * 1e9)
        delta, A = ins[1], ins[2]
        math = extension().arithmetic_floor_ms(delta.numel(), A.shape[1], 5)
        row = {"shape": label, **{f"{k}_{b}_ms": t[b][k] for b in BACKENDS for k in ("fwd", "fwdbwd")},
               "fwd_bound_ms": bound, "fwd_math_ms": math}
        out["scan"].append(row)
        print(f"| {label:<34} | {t['torch']['fwd']:9.2f} | {t['cpp']['fwd']:8.2f} | "
              f"{t['torch']['fwd'] / t['cpp']['fwd']:6.1f} | {t['torch']['fwdbwd']:9.2f} | {t['cpp']['fwdbwd']:8.2f} | "
              f"{t['torch']['fwdbwd'] / t['cpp']['fwdbwd']:6.1f} | {bound:6.2f} | {t['cpp']['fwd'] / bound:7.1f} | "
              f"{math:6.2f} | {math / bound:12.1f} |",
              flush=True)
    del shapes

    if not args.no_train:
        steps = {f"{VMAMBA} [{b}]": (TrainStep(VMAMBA, args.batch), b) for b in BACKENDS}
        steps[VIT] = (TrainStep(VIT, args.batch), None)
        times = {k: [] for k in steps}
        for rep in range(args.warmup + args.steps):
            for k, (step, b) in steps.items():
                if b is None:
                    dt = step()
                else:
                    with scan_backend(b):
                        dt = step()
                if rep >= args.warmup:
                    times[k].append(dt)
        print(f"\ntraining step, batch {args.batch}, 128 px channels-last, s (median of {args.steps})")
        out["train"] = {}
        for k, v in times.items():
            med = statistics.median(v)
            out["train"][k] = med
            print(f"  {k:<32} {med:7.3f} s   {args.batch / med:6.1f} img/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
