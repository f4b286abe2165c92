"""Run directories: where an experiment's pretrained backbones, VLMs and reports live.

    runs/<name>/
      config.json                  the resolved ExperimentConfig
      backbones/<backbone>.safetensors   pretrained (embedded world) backbone weights
      backbones/<backbone>.json          its pretraining record (top-1, steps, time)
      vlms/<backbone>/             one VLM per backbone (VLM.save layout), plus train_state for resuming
      results.csv  results.md  figures/
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Example:
    """An image with an expression to try, and its ground-truth box in original pixels when known."""

    image: str
    expression: str
    gt_box: tuple[float, float, float, float] | None = None


def example_images(run_dir: str | Path, limit: int = 8) -> list[Example]:
    """Scene-world val examples of a run (the referring expressions its evaluation scored), [] when it has none.

    They are read from the per-example evaluation records under ``vlms/*/eval_val_*.json`` (image paths relative to
    the world, the world relative to the VLM's directory); images that are no longer on disk are left out.
    """
    out: dict[str, Example] = {}
    for f in sorted(Path(run_dir).glob("vlms/*/eval_val_*.json")):
        record = json.loads(f.read_text())
        root = f.parent / record["world_root"] if "world_root" in record else Path()
        for r in record.get("grounding", []):
            if len(out) == limit:
                return list(out.values())
            path = str(root / r["image_path"])
            if path not in out and Path(path).is_file():
                out[path] = Example(path, r["expression"], tuple(r["gt_box"]))
        if out:  # every VLM of a run is scored on the same examples
            break
    return list(out.values())


def run_world(run_dir: str | Path) -> Path | None:
    """The scene world a run was scored on, as its evaluation caches name it (relative to the VLM's directory);
    None before any evaluation."""
    for f in sorted(Path(run_dir).glob("vlms/*/eval_val_*.json")):
        record = json.loads(f.read_text())
        if "world_root" in record:
            return (f.parent / record["world_root"]).resolve()
    return None


def photo_examples() -> list[Example]:
    """A real photo (scikit-image's astronaut) written once to the temp dir; [] without scikit-image."""
    from PIL import Image

    try:
        from skimage import data
    except ImportError:
        return []
    path = Path(tempfile.gettempdir()) / "toolkit-examples" / "astronaut.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.astronaut()).save(path)
    return [Example(str(path), "the face of the astronaut")]
