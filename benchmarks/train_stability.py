"""bf16 training-stability run: VMamba-T (fused Triton scan) trained for N steps on the scene world's
classification set under bf16 autocast; reports the loss curve, non-finite losses/gradients, val top-1, and how far
the trained model's tokens move when the scan runs on the plain-PyTorch backend ("torch") instead.

    python benchmarks/train_stability.py [--steps 1000] [--batch 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from toolkit import create_backbone
from toolkit.data.world import CLASS_NAMES, SceneWorldConfig, render_classification
from toolkit.geometry import normalize
from toolkit_kernels import scan_backend


def class_set(split: str, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = SceneWorldConfig(image_size=size)
    imgs, labels = zip(*(render_classification(cfg, split, i) for i in range(n)))
    index = {c: i for i, c in enumerate(CLASS_NAMES)}
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2), torch.tensor([index[lb] for lb in labels])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="vmamba-t-in1k-224-s3")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.time()
    xtr, ytr = class_set("train", 4800, args.size)
    xva, yva = class_set("val", 480, args.size)
    gen_s = time.time() - t0
    model = create_backbone(args.backbone, img_size=args.size).to(device)
    dc = model.data_config
    with torch.no_grad():
        width = model.forward_pooled(torch.zeros(1, 3, args.size, args.size, device=device)).shape[-1]
    head = torch.nn.Linear(width, len(CLASS_NAMES)).to(device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(0)
    curve, bad_loss, bad_grad = [], 0, 0
    t1 = time.time()
    with scan_backend("auto"):
        for step in tqdm(range(args.steps), desc="bf16 training", mininterval=5):
            idx = torch.randint(0, len(xtr), (args.batch,), generator=g)
            x = normalize(xtr[idx].to(device), dc.mean, dc.std)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = F.cross_entropy(head(model.forward_pooled(x)).float(), ytr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
            bad_loss += int(not torch.isfinite(loss))
            bad_grad += int(not torch.isfinite(gn))
            opt.step()
            sched.step()
            if step % 50 == 0 or step == args.steps - 1:
                curve.append((step, float(loss)))
    train_s = time.time() - t1
    model.eval()
    correct, drift = 0, []
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        for i in range(0, len(xva), 120):
            x = normalize(xva[i:i + 120].to(device), dc.mean, dc.std)
            correct += int((head(model.forward_pooled(x)).argmax(-1).cpu() == yva[i:i + 120]).sum())
            tok = model.forward_tokens(x).float()
            with scan_backend("torch"):
                tok_torch = model.forward_tokens(x).float()
            drift.append(float((tok - tok_torch).norm() / tok_torch.norm()))
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "backbone": args.backbone,
           "steps": args.steps, "batch": args.batch, "size": args.size, "data_gen_s": gen_s, "train_s": train_s,
           "step_ms": 1e3 * train_s / args.steps, "nonfinite_losses": bad_loss, "nonfinite_grad_norms": bad_grad,
           "loss_first": curve[0][1], "loss_last": curve[-1][1], "val_top1": correct / len(xva),
           "tokens_rel_diff_triton_vs_torch_bf16": max(drift), "curve": curve}
    print(json.dumps({k: v for k, v in out.items() if k != "curve"}, indent=1))
    print("loss every 50 steps:", " ".join(f"{lv:.3f}" for _, lv in curve))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
