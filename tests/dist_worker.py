"""Worker for tests/test_distributed.py: trains the tiny VLM of ``setup.pt`` under torchrun (or alone) and writes
its loss curve. Not a test file itself."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch


def main(work: str, out: str, overrides: str) -> None:
    torch.set_num_threads(1)
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
