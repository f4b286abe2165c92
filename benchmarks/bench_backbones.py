"""Backbone throughput side by side, in one run: inference images/s and training-step images/s per backbone.

    python benchmarks/bench_backbones.py                      # CPU: the paper's four 224 px backbones, batch 8
    python benchmarks/bench_backbones.py --embedded           # the embedded-world variants at 128 px, batch 32
    python benchmarks/bench_backbones.py --device cuda        # CUDA: batch 64, fp32 and bf16 autocast
    python benchmarks/bench_backbones.py --official-vmamba VMamba/classification/models   # + the official code

Inference = ``forward_tokens`` (to the tap) in eval mode under ``inference_mode``. Training step = train mode,
``forward_tokens`` + backward of the mean-square of the tokens + one AdamW step (``zero_grad(set_to_none=True)``
first). Models and inputs are channels-last, as the toolkit runs every backbone (``CHANNELS_LAST``: pretraining,
dense tuning, the VLM's encoder). Every backbone is built once; the repetitions are interleaved (rep 1: A infer,
A train, B infer, B train, ...; rep 2: ...), so slow drifts of a shared machine hit every backbone alike. The first
``--warmup`` repetitions are dropped (at the full batch: oneDNN and cuDNN pick and cache kernels per shape, so a
smaller warm-up batch leaves the first timed repetition slow); the table gives the median of the next ``--steps`` (N). CUDA timings
synchronise before and after each timed call. Ratios are relative to the first backbone listed (above 1: faster
than it). Weights are random: nothing is downloaded; throughput does not depend on weight values.

``--official-vmamba DIR`` adds a row for the official VMamba code (a checkout's ``classification/models``, with
``fvcore`` installed, which its module imports): VMamba-S as configured in ``vmambav2_small_224.yaml``, run to the same
tap (stage 3's blocks) on the code's own CPU fallback (``selective_scan_torch``, ``CrossScanF`` / ``CrossMergeF``).
Its ``cross_scan_fn`` / ``cross_merge_fn`` enter ``torch.cuda.device(x.device)`` even on that path, which refuses a
CPU tensor, so the row calls the same fallback classes without that context: no other change to the official code.
A step of it takes tens of seconds (a Python loop over positions), so it runs ``--official-steps`` timed repetitions
(default 1) and no warm-up; the other rows are interleaved as above.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toolkit.backbones.base import CHANNELS_LAST  # noqa: E402

DEFAULT_NAMES = ("vit-s-in1k-224", "maxvit-t-in1k-224-s3", "mambavision-b-in1k-224-s3", "vmamba-s-in1k-224-s3")
# On the CPU the state-space backbones also run with the plain PyTorch scan, so the compiled scan's gain shows side by
# side: a name may end in "[backend]" (toolkit_kernels' scan backends).
CPU_SCAN_ROWS = ("mambavision-b-in1k-224-s3[torch]", "vmamba-s-in1k-224-s3[torch]")
FAMILY_ORDER = ("vit", "maxvit", "mambavision", "vmamba")  # the order of DEFAULT_NAMES: ratios are against ViT
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OFFICIAL_VMAMBA = "official-vmamba-s-224-s3"
# vmambav2_small_224.yaml (the study's VMamba-S) as the official VSSM's arguments
OFFICIAL_VMAMBA_S = dict(depths=[2, 2, 15, 2], dims=96, drop_path_rate=0.3, ssm_d_state=1, ssm_ratio=2.0,
                         ssm_dt_rank="auto", ssm_act_layer="silu", ssm_conv=3, ssm_conv_bias=False, ssm_init="v0",
                         forward_type="v05_noz", mlp_ratio=4.0, mlp_act_layer="gelu", gmlp=False, patch_norm=True,
                         norm_layer="ln2d", downsample_version="v3", patchembed_version="v2", imgsize=224)
_official_dir: Path | None = None  # set by --official-vmamba


class OfficialVMamba(nn.Module):
    """The official VMamba-S to stage 3's blocks (our ``-s3`` tap, without its tap norm), ``forward_tokens``
    ``(B, 3, 224, 224) -> (B, 768, 14, 14)``, on the official CPU fallback."""

    def __init__(self, models_dir: Path):
        super().__init__()
        sys.path.insert(0, str(models_dir))
        import csm_triton
        import vmamba

        def cross_scan(x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False):
            return csm_triton.CrossScanF.apply(x, in_channel_first, out_channel_first, one_by_one, scans)

        def cross_merge(y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0,
                        force_torch=False):
            return csm_triton.CrossMergeF.apply(y, in_channel_first, out_channel_first, one_by_one, scans)

        vmamba.cross_scan_fn, vmamba.cross_merge_fn = cross_scan, cross_merge
        net = vmamba.VSSM(**OFFICIAL_VMAMBA_S)
        net.classifier = nn.Identity()  # params_M then counts what ours counts: every stage, no head
        self.net = net

        self.data_config = type("DataConfig", (), {"img_size": (224, 224)})()

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.patch_embed(x)
        for layer in self.net.layers[:2]:
            x = layer(x)
        return self.net.layers[2].blocks(x)


def embedded_names() -> list[str]:
    """The embedded-world backbones (tag "embedded"), ViT first, then in DEFAULT_NAMES' family order."""
    from toolkit.registry import backbone_entry, list_backbones

    def key(n):
        fam = backbone_entry(n).family
        return (FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER), n)

    return sorted(list_backbones(tag="embedded"), key=key)


def split_backend(name: str) -> tuple[str, str | None]:
    """``"vmamba-s-in1k-224-s3[torch]"`` -> (``"vmamba-s-in1k-224-s3"``, ``"torch"``); no suffix: (name, None)."""
    base, _, rest = name.partition("[")
    return base, (rest.rstrip("]") or None)


def build(name: str, img_size: int | None, device: str):
    """``name`` on ``device``, at ``img_size`` (square) if given and not its configured size, else its own."""
    from toolkit.registry import create_backbone

    name = split_backend(name)[0]
    if name == OFFICIAL_VMAMBA:
        if img_size not in (None, 224):
            raise ValueError(f"{OFFICIAL_VMAMBA} runs at 224 px only, not {img_size}")
        return OfficialVMamba(_official_dir).to(device)
    model = create_backbone(name)
    if img_size is not None and tuple(model.data_config.img_size) != (img_size, img_size):
        model = create_backbone(name, img_size=img_size)
    return model.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Bench:
    """One backbone's timed calls: ``infer()`` and ``train_step()`` each return seconds."""

    def __init__(self, name: str, batch: int, device: str, dtype: str, img_size: int | None, lr: float = 1e-5):
        self.name, self.device, self.dtype, self.batch = name, device, dtype, batch
        self.backend = split_backend(name)[1]
        self.model = build(name, img_size, device).to(memory_format=CHANNELS_LAST)
        self.hw = tuple(self.model.data_config.img_size)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, *self.hw, generator=g).to(device).contiguous(memory_format=CHANNELS_LAST)

    def _scan(self):
        from toolkit_kernels import scan_backend

        return scan_backend(self.backend) if self.backend else contextlib.nullcontext()

    def _autocast(self):
        dt = DTYPES[self.dtype]
        dev = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(dev, dtype=dt) if dt is not None else torch.autocast(dev, enabled=False)

    def infer(self, x: torch.Tensor | None = None) -> float:
        self.model.eval()
        _sync(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode(), self._autocast(), self._scan():
            self.model.forward_tokens(self.x if x is None else x)
        _sync(self.device)
        return time.perf_counter() - t0

    def train_step(self, x: torch.Tensor | None = None) -> float:
        self.model.train()
        _sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with self._autocast(), self._scan():
            tokens = self.model.forward_tokens(self.x if x is None else x)
        tokens.float().square().mean().backward()
        self.opt.step()
        _sync(self.device)
        return time.perf_counter() - t0


def measure(names, *, batch: int, steps: int, warmup: int, device: str = "cpu", dtype: str = "fp32",
            img_size: int | None = None, warmup_batch: int | None = None, official_steps: int = 1,
            log=None) -> list[dict]:
    """Interleaved timing of ``names``: one row per backbone with median seconds and images/s (N = ``steps``).

    The ``warmup`` untimed repetitions run on the first ``warmup_batch`` images (default: the whole batch).
    """
    benches = [Bench(n, batch, device, dtype, img_size) for n in names]
    times = {b.name: {"infer": [], "train": []} for b in benches}
    for rep in range(warmup + steps):
        for b in benches:
            if b.name == OFFICIAL_VMAMBA and not warmup <= rep < warmup + official_steps:
                continue
            x = b.x[:warmup_batch] if rep < warmup and warmup_batch else None
            ti, tt = b.infer(x), b.train_step(x)
            if rep >= warmup:
                times[b.name]["infer"].append(ti)
                times[b.name]["train"].append(tt)
            if log:
                log(f"  rep {rep + 1}/{warmup + steps}{' (warm-up)' if rep < warmup else ''} {b.name}: "
                    f"infer {ti:.3f} s, train {tt:.3f} s")
    rows = []
    for b in benches:
        ti, tt = statistics.median(times[b.name]["infer"]), statistics.median(times[b.name]["train"])
        rows.append({"backbone": b.name, "input": f"{b.hw[0]}x{b.hw[1]}", "params_M": b.params / 1e6,
                     "batch": batch, "dtype": dtype, "N": len(times[b.name]["infer"]), "infer_s": ti,
                     "infer_img_s": batch / ti,
                     "train_s": tt, "train_img_s": batch / tt,
                     "_infer_all_s": times[b.name]["infer"], "_train_all_s": times[b.name]["train"]})
    first = rows[0]
    for r in rows:
        r["infer_x"] = r["infer_img_s"] / first["infer_img_s"]
        r["train_x"] = r["train_img_s"] / first["train_img_s"]
    del benches
    return rows


def table(rows: list[dict], floatfmt=".3g") -> str:
    from tabulate import tabulate
    shown = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]  # ``_*``: every timing, JSON only
    return tabulate(shown, headers="keys", floatfmt=floatfmt, tablefmt="github")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", default=None, help=f"comma-separated registry names (default: {','.join(DEFAULT_NAMES)};"
                                                   " with --embedded: every backbone tagged embedded)")
    ap.add_argument("--embedded", action="store_true",
                    help="the embedded-world variants at their own 128 px input, batch 32")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default=None,
                    help="comma-separated among fp32, bf16, fp16 (autocast); default: fp32 on CPU, fp32,bf16 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA; 32 with --embedded")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed repetitions N (default: 3 on CPU, 5 with --embedded, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default: 1 CPU, 5 CUDA)")
    ap.add_argument("--warmup-batch", type=int, default=None,
                    help="images per warm-up repetition (default: the batch; smaller leaves per-shape kernel "
                         "selection to the first timed repetition)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="square input side; 0 = each backbone's own (default: 224; with --embedded: 0, i.e. 128)")
    ap.add_argument("--official-vmamba", type=Path, default=None, metavar="DIR",
                    help="a VMamba checkout's classification/models: add the official VMamba-S on its CPU fallback")
    ap.add_argument("--official-steps", type=int, default=1, help="timed repetitions of the official row")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="also write every figure here")
    ap.add_argument("--quiet", action="store_true", help="no per-repetition log")
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ([n.strip() for n in args.names.split(",") if n.strip()] if args.names
             else embedded_names() if args.embedded else list(DEFAULT_NAMES) + ([] if cuda else list(CPU_SCAN_ROWS)))
    if args.official_vmamba is not None:
        if cuda:
            ap.error("--official-vmamba measures the official CPU fallback: use it without --device cuda")
        if not (args.official_vmamba / "vmamba.py").is_file():
            ap.error(f"--official-vmamba {args.official_vmamba}: no vmamba.py there "
                     "(give <checkout>/classification/models)")
        global _official_dir
        _official_dir = args.official_vmamba.resolve()
        names.append(OFFICIAL_VMAMBA)
    batch = args.batch or (32 if args.embedded else 64 if cuda else 8)
    steps = args.steps or (20 if cuda else 5 if args.embedded else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    warmup_batch = min(batch, args.warmup_batch or batch)
    img_size = (args.img_size if args.img_size is not None else 0 if args.embedded else 224) or None  # 0: native
    dtypes = (args.dtype or ("fp32,bf16" if cuda else "fp32")).split(",")
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    started = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"{started}  {device_name}  torch {torch.__version__}  load average {load}\n"
          f"batch {batch}, input {img_size or 'native'} px, N = {steps} timed repetitions after {warmup} warm-up "
          f"(batch {warmup_batch}), interleaved; medians. infer = forward_tokens under inference_mode; "
          f"train = forward_tokens + backward of mean(tokens**2) + AdamW step. *_x = images/s relative to "
          f"{names[0]}.", flush=True)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    out: dict = {"torch": torch.__version__, "device": device_name, "started": started, "load_average": load,
                 "batch": batch, "steps": steps, "warmup": warmup, "warmup_batch": warmup_batch, "rows": []}
    t0 = time.perf_counter()
    for dt in dtypes:
        rows = measure(names, batch=batch, steps=steps, warmup=warmup, device=args.device, dtype=dt,
                       img_size=img_size, warmup_batch=warmup_batch, official_steps=min(args.official_steps, steps),
                       log=log)
        out["rows"] += rows
        print(f"\n{dt}:\n" + table(rows), flush=True)
    out["wall_s"] = time.perf_counter() - t0
    print(f"\nwall {out['wall_s']:.0f} s; finished {datetime.now().strftime('%H:%M:%S')}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
