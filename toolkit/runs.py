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


def vlm_dirs(run_dir: str | Path, skipped: dict[str, str] | None = None) -> dict[str, Path]:
    """Finished VLMs of a run by backbone name (a VLM is finished once its config.json is written); folders that are
    not go into ``skipped`` (name -> why) when given."""
    root = Path(run_dir) / "vlms"
    if not root.is_dir():
        return {}
    out = {}
    for p in sorted(q for q in root.iterdir() if q.is_dir()):
        if (p / "config.json").is_file():
            out[p.name] = p
        elif skipped is not None:
            skipped[p.name] = "not finished: no config.json (still training, or the run was interrupted)"
    return out


def load_vlms(run_dir: str | Path, names: list[str] | None = None,
              skipped: dict[str, str] | None = None) -> dict[str, VLM]:
    """Load a run's trained VLMs (all, or ``names``), each in eval mode on the CPU. A VLM that does not load (a
    truncated or damaged file, a missing part) is left out and named in ``skipped`` (name -> why) when given, so
    the others still serve; with ``skipped`` None it raises. Raises FileNotFoundError when none loads."""
    dirs = vlm_dirs(run_dir, skipped)
    if not dirs:
        raise FileNotFoundError(f"no trained VLMs under {Path(run_dir) / 'vlms'}: run `make demo` first")
    if names:
        unknown = [n for n in names if n not in dirs]
        if unknown:
            raise KeyError(f"{unknown} not trained in {run_dir}; available: {sorted(dirs)}")
        dirs = {n: dirs[n] for n in names}
    out = {}
    for n, p in dirs.items():
        try:
            out[n] = VLM.load(p).eval()
        except Exception as e:  # any damage to one model's files must not take the others down
            if skipped is None:
                raise
            first = (str(e).splitlines() or [""])[0].replace(str(Path(run_dir)), "<run>")
            skipped[n] = f"its files do not load ({first[:200]})"
    if not out:
        raise FileNotFoundError(f"no VLM under {Path(run_dir) / 'vlms'} loads: " +
                                "; ".join(f"{k}: {v}" for k, v in (skipped or {}).items()))
    return out
