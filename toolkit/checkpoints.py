"""Safe checkpoint I/O: safetensors preferred, torch files only with ``weights_only=True``."""
from __future__ import annotations

from pathlib import Path

import torch

# Official files nest the weights under one of these keys (VMamba: "model"; detectron2: "model";
# mmdet/mmseg: "state_dict"; Prismatic: {"model": {"projector": ..., "llm_backbone": ...}}).
_NESTING_KEYS = ("model", "state_dict", "model_ema", "module")


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a weights file safely onto ``map_location``. Raises FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as e:  # pickle with code, truncated file, not a torch file at all
        raise ValueError(f"cannot read checkpoint {path} safely (weights_only=True): {_gist(e)}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _gist(e: Exception) -> str:
    """One line of a load error: torch's refusal of a pickled object is a page whose point is one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hit = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(e).__name__)
    return hit.removeprefix("WeightsUnpickler error: ").split(". ")[0].rstrip(".") + "."


def unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Descend through the nesting keys official files use until a flat ``{name: tensor}`` dict remains."""
    while not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _NESTING_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if key is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            raise ValueError(f"no state dict found; top-level keys: {sorted(obj)[:10]}")
        obj = obj[key]
    return obj


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically (tmp file + rename) so an interrupted save never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
