"""Worker for tests/test_distributed.py: trains the tiny VLM of ``setup.pt`` under torchrun (or alone) and writes
its loss curve. Not a test file itself."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch


def pretrain(out: str) -> None:
    """Classification pretraining of vit-test on 64 random 32 px images, 2 epochs of batch 16."""
    from toolkit.config import PretrainConfig
    from toolkit.train import distributed
    from toolkit.train.pretrain import pretrain_backbone

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (64,), generator=g)
    data = (images, labels, ["a", "b", "c", "d"])
    rec = pretrain_backbone("vit-test", data, data, PretrainConfig(epochs=2, batch_size=16, warmup_steps=1),
                            Path(out) / "vit-test.safetensors", torch.device("cpu"))
    if distributed.current().main:
        (Path(out) / "record.json").write_text(json.dumps(dict(losses=rec["loss_curve"])))


def main(work: str, out: str, overrides: str) -> None:
    torch.set_num_threads(1)
    if json.loads(overrides).get("pretrain"):
        Path(out).mkdir(parents=True, exist_ok=True)
        return pretrain(out)
    from transformers import AutoTokenizer

    from toolkit.config import StageConfig, TrainConfig
    from toolkit.llm import LMConfig
    from toolkit.train import distributed
    from toolkit.train.vlm_trainer import Turn, train_vlm
    from toolkit.vlm import VLM, VLMConfig

    work_dir = Path(work)
    setup = json.loads((work_dir / "setup.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(work_dir / "tokenizer"))
    torch.manual_seed(0)
    vlm = VLM.build(VLMConfig(backbone="vit-test", lm=LMConfig(**setup["lm"])), tok)
    features = torch.load(work_dir / "features.pt", weights_only=True)
    turns = [Turn(**t) for t in setup["turns"]]
    cfg = TrainConfig(stages=tuple(StageConfig(**s) for s in setup["stages"]), checkpoint_every=setup["every"],
                      grounding_fraction=1.0, objects_fraction=0.0)
    cfg = replace(cfg, **json.loads(overrides))
    rec = train_vlm(vlm, features, turns, cfg, Path(out), torch.device("cpu"))
    if distributed.current().main:
        (Path(out) / "record.json").write_text(json.dumps(dict(losses=rec["loss_curve"], processes=rec["processes"])))


if __name__ == "__main__":
    main(*sys.argv[1:4])
