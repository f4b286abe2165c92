"""Pretraining-recipe sweep: val top-1 of each backbone on the scene world's classification set for every
(lr, epochs) pair, with the matched recipe otherwise unchanged. One table, one row per run.

    python benchmarks/pretrain_sweep.py --backbones vit-scene-128,vmamba-scene-128-s3 --lrs 2e-3,5e-4 --epochs 2,6
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from toolkit.config import preset
from toolkit.pipeline import world_data
from toolkit.train.pretrain import load_image_folder, pretrain_backbone


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbones", default="vit-scene-128,vmamba-scene-128-s3")
    ap.add_argument("--lrs", default="2e-3,5e-4")
    ap.add_argument("--epochs", default="2")
    ap.add_argument("--set", action="append", default=[], help="PretrainConfig field=value (e.g. label_smoothing=0)")
    ap.add_argument("--cache", default="data_cache")
    args = ap.parse_args(argv)
    cfg = preset("embedded")
    world = world_data(cfg, Path(args.cache))
    train, val = load_image_folder(world.classification / "train"), load_image_folder(world.classification / "val")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extra = {k: type(getattr(cfg.pretrain, k))(v) for k, v in (a.split("=", 1) for a in args.set)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones.split(","):
            for lr in map(float, args.lrs.split(",")):
                for ep in map(int, args.epochs.split(",")):
                    pc = replace(cfg.pretrain, lr=lr, epochs=ep, **extra)
                    rec = pretrain_backbone(name, train, val, pc, Path(tmp) / f"{name}.safetensors", device)
                    rows.append({"backbone": name, "lr": lr, "epochs": ep, **extra, "top1": rec["top1"],
                                 "seconds": rec["train_seconds"]})
                    print(rows[-1], flush=True)
    from tabulate import tabulate
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return rows


if __name__ == "__main__":
    main()
