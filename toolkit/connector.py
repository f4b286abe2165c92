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


class MLPConnector(nn.Module):
    """``(B, N, vis_dim)`` visual tokens -> ``(B, N, llm_dim)`` LM input embeddings."""

    def __init__(self, name: str, vis_dim: int, llm_dim: int):
        super().__init__()
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
        return self.projector(tokens)
