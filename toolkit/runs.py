"""Run directories: where an experiment's pretrained backbones, VLMs and reports live, named in one place
(``RunDir``).

    runs/<name>/
      config.json                  the resolved ExperimentConfig
      backbones/<backbone>.safetensors   pretrained (embedded world) or dense-tuned backbone weights
      backbones/<backbone>.json          its training record (top-1 or mIoU, steps, time, loss curve)
      lm_base/                     the text-warmed LM every VLM of the run starts from
      vlms/<backbone>/             one VLM per spec (VLM.save layout), its train_record.json, its evaluation caches
                                   (eval_val_<key>.json), and train_state.pt while it trains
      results.csv  results.md  figures/  analysis/<split>/
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loading a model needs torch; naming a run's paths does not
    from toolkit.vlm import VLM


class RunDir:
    """Every path of a run directory. Paths stored inside a run are relative to it (see ``VLM.save``), so a copied
    or moved run works from any current directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def backbones(self) -> Path:
        return self.root / "backbones"

    def backbone(self, spec: str) -> Path:
        """Weights of a pretrained (``name``) or dense-tuned (``name+dense``) backbone; its record is the same path
        with ``.json``, its resumable train state with ``.state.pt``."""
        return self.backbones / f"{spec}.safetensors"

    def backbone_records(self) -> list[Path]:
        return sorted(self.backbones.glob("*.json"))

    @property
    def lm_base(self) -> Path:
        return self.root / "lm_base"

    @property
    def lm_base_state(self) -> Path:
        return self.root / "lm_base.state.pt"

    @property
    def vlms(self) -> Path:
        return self.root / "vlms"

    def vlm(self, name: str) -> Path:
        return self.vlms / name

    def train_records(self) -> list[Path]:
        return sorted(self.vlms.glob("*/train_record.json"))

    def eval_caches(self) -> list[Path]:
        return sorted(self.vlms.glob("*/eval_val_*.json"))

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def analyses(self) -> Path:
        return self.root / "analysis"

    def analysis(self, split: str) -> Path:
        return self.analyses / split


def vlm_dirs(run_dir: str | Path, skipped: dict[str, str] | None = None) -> dict[str, Path]:
    """Finished VLMs of a run by backbone name (a VLM is finished once its config.json is written); folders that are
    not go into ``skipped`` (name -> why) when given."""
    root = RunDir(run_dir).vlms
    if not root.is_dir():
        return {}
    out = {}
    for p in sorted(q for q in root.iterdir() if q.is_dir()):
        if (p / "config.json").is_file():
            out[p.name] = p
        elif skipped is not None:
            skipped[p.name] = "not finished: no config.json (still training, or the run was interrupted)"
    return out


def user_message(e: Exception, run_dir: str | Path) -> str:
    """An exception's first line, the server's paths to the run (as given, and resolved) shown as ``<run NAME>``."""
    run_dir = Path(run_dir)
    text = (str(e).splitlines() or [""])[0]
    for p in sorted({str(run_dir.resolve()), str(run_dir)}, key=len, reverse=True):
        text = text.replace(p, f"<run {run_dir.name}>")
    return text


def load_vlms(run_dir: str | Path, names: list[str] | None = None,
              skipped: dict[str, str] | None = None) -> dict[str, VLM]:
    """Load a run's trained VLMs (all, or ``names``), each in eval mode on the CPU. A VLM that does not load (a
    truncated or damaged file, a missing part) is left out and named in ``skipped`` (name -> why) when given, so
    the others still serve; with ``skipped`` None it raises. Raises FileNotFoundError when none loads."""
    from toolkit.vlm import VLM

    dirs = vlm_dirs(run_dir, skipped)
    if not dirs:
        raise FileNotFoundError(f"no trained VLMs under {RunDir(run_dir).vlms}: run `make demo` first")
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
            skipped[n] = f"its files do not load ({user_message(e, run_dir)[:200]})"
    if not out:
        raise FileNotFoundError(f"no VLM under {RunDir(run_dir).vlms} loads: " +
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
    for f in RunDir(run_dir).eval_caches():
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
    for f in RunDir(run_dir).eval_caches():
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
