"""Vision -> language connectors, named ``mlp{N}x_gelu`` as in LLaVA.

Layouts follow Prismatic so its projector weights load key for key (``projector.{0,2,4}.*``):
- N = 1: Linear(vis, llm)
- N = 2 (``gelu-mlp``): Linear(vis, llm) - GELU - Linear(llm, llm)
- N = 3 (``fused-gelu-mlp``, the stabilised variant): Linear(vis, 4 vis) - GELU - Linear(4 vis, llm) - GELU - Linear(llm, llm)
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

_NAME = re.compile(r"^mlp(\d+)x_gelu$")
PRISMATIC_ARCH = {"no-align+gelu-mlp": "mlp2x_gelu", "no-align+fused-gelu-mlp": "mlp3x_gelu",
                  "gelu-mlp": "mlp2x_gelu", "fused-gelu-mlp": "mlp3x_gelu", "linear": "mlp1x_gelu"}


def connector_depth(name: str) -> int:
    """``mlp{N}x_gelu`` (or a Prismatic ``arch_specifier``) -> N."""
    name = PRISMATIC_ARCH.get(name, name)
    m = _NAME.match(name)
    if m is None or not 1 <= int(m.group(1)) <= 3:
        raise ValueError(f"unknown connector `{name}`: use mlp1x_gelu, mlp2x_gelu or mlp3x_gelu "
                         f"(or a Prismatic arch_specifier: {', '.join(PRISMATIC_ARCH)})")
    return int(m.group(1))


IMAGE_POS = ("none", "sincos2d")


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine code ``(h*w, dim)``, row-major: a quarter of the channels each for sin/cos of the row
    and of the column at geometric frequencies (as in MAE); channels past a multiple of 4 are zero."""
    q = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(q, dtype=torch.float32) / max(q, 1)))  # (q,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ay, ax = ys.flatten()[:, None] * freqs, xs.flatten()[:, None] * freqs  # (N, q)
    code = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return torch.nn.functional.pad(code, (0, dim - 4 * q))


def _scalar_pos_scale(module, state_dict, prefix, *args) -> None:
    key = prefix + "pos_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


class MLPConnector(nn.Module):
    """``(B, N, vis_dim)`` visual tokens -> ``(B, N, llm_dim)`` LM input embeddings.

    ``image_pos="sincos2d"`` adds a fixed 2-D position code of the token grid ``(h, w)``, times a learned scalar
    (key ``pos_scale``), to the projected tokens. The study's connectors have none (``"none"``, the default): a large
    LM learns where an image token sits; a 2-layer LM trained for minutes does not, because its rotary positions only
    tell it how far back a token is, which changes with the prompt's length.
    """

    def __init__(self, name: str, vis_dim: int, llm_dim: int, image_pos: str = "none",
                 grid: tuple[int, int] | None = None):
        super().__init__()
        if image_pos not in IMAGE_POS:
            raise ValueError(f"image_pos={image_pos!r}; expected one of {IMAGE_POS}")
        self.grid = grid
        if image_pos == "sincos2d":
            if grid is None:
                raise ValueError("image_pos='sincos2d' needs the token grid (h, w)")
            self.register_buffer("pos_code", sincos_2d(*grid, llm_dim), persistent=False)
            # shape (1,), not (): FSDP shards no 0-d parameter; files written with a 0-d one still load
            self.pos_scale = nn.Parameter(torch.ones(1))
            self.register_load_state_dict_pre_hook(_scalar_pos_scale)
        else:
            self.pos_code = None
        self.name = PRISMATIC_ARCH.get(name, name)
        depth = connector_depth(name)
        if depth == 1:
            layers: list[nn.Module] = [nn.Linear(vis_dim, llm_dim)]
        elif depth == 2:
            layers = [nn.Linear(vis_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        else:
            hid = 4 * vis_dim
            layers = [nn.Linear(vis_dim, hid), nn.GELU(), nn.Linear(hid, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        self.projector = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.projector(tokens)
        if self.pos_code is None:
            return out
        if tokens.shape[1] != self.pos_code.shape[0]:
            raise ValueError(f"{tokens.shape[1]} visual tokens do not fill the {self.grid} grid the position code "
                             f"was built for")
        return out + self.pos_scale * self.pos_code.to(out.dtype)
