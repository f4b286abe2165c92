"""Safe checkpoint I/O: safetensors preferred, torch files only with ``weights_only=True``."""
from __future__ import annotations

from pathlib import Path

import torch

# Official files nest the weights under one of these keys (VMamba: "model"; detectron2: "model";
# mmdet/mmseg: "state_dict"; Prismatic: {"model": {"projector": ..., "llm_backbone": ...}}).
_NESTING_KEYS = ("model", "state_dict", "model_ema", "module")


def load_state_dict_file(path: str | Path) -> dict:
    """Read a weights file safely. Raises FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code, truncated file, not a torch file at all
        raise ValueError(f"cannot read checkpoint {path} safely (weights_only=True): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


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
