"""Run directories: where an experiment's pretrained backbones, VLMs and reports live.

    runs/<name>/
      config.json                  the resolved ExperimentConfig
      backbones/<backbone>.safetensors   pretrained (embedded world) backbone weights
      backbones/<backbone>.json          its pretraining record (top-1, steps, time)
      vlms/<backbone>/             one VLM per backbone (VLM.save layout), plus train_state for resuming
      results.csv  results.md  figures/
"""
from __future__ import annotations

from pathlib import Path

from toolkit.vlm import VLM


def vlm_dirs(run_dir: str | Path) -> dict[str, Path]:
    """Finished VLMs of a run by backbone name (a VLM is finished once its config.json is written)."""
    root = Path(run_dir) / "vlms"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def load_vlms(run_dir: str | Path, names: list[str] | None = None) -> dict[str, VLM]:
    """Load a run's trained VLMs (all, or ``names``), each in eval mode on the CPU."""
    dirs = vlm_dirs(run_dir)
    if not dirs:
        raise FileNotFoundError(f"no trained VLMs under {Path(run_dir) / 'vlms'}: run `make demo` first")
    if names:
        unknown = [n for n in names if n not in dirs]
        if unknown:
            raise KeyError(f"{unknown} not trained in {run_dir}; available: {sorted(dirs)}")
        dirs = {n: dirs[n] for n in names}
    return {n: VLM.load(p).eval() for n, p in dirs.items()}
