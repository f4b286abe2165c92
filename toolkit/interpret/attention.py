"""Attention maps: inside the backbone (its ``attention_modules()``) and from the LM's answer onto the image tokens.

Backbone attention is captured, not recomputed: each module runs its own non-fused path (``fused_attn=False``)
and a forward hook on its ``attn_drop`` reads the probabilities it is about to use. That path already holds every
variant's details (relative-position bias in MaxViT, q/k norms, masks, scale), which recomputing q·k from the
``qkv`` weights would have to re-implement per family. Partitioned attention (MaxViT's block and grid attention,
MambaVision's and ViTDet's padded windows) is placed with the backbone's ``attention_layouts()``: each window's
probabilities go back to their tokens' places in an ``(N, N)`` matrix over that stage's grid (zero between windows),
which is then pooled onto the tap grid. Modules without the hook point, and windowed attention without a layout, are
skipped with a reason. Families without attention modules give an empty result.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from toolkit.backbones.base import TokenLayout
from toolkit.vlm import IGNORE_INDEX


@dataclass(frozen=True)
class BackboneAttention:
    """Per-module attention over the tap grid's patches, mean over heads, prefix (CLS) tokens removed."""

    layers: dict[str, torch.Tensor]  # module name -> (N, N), rows renormalised over the patches
    grid: tuple[int, int]
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it has no map

    def rollout(self) -> torch.Tensor | None:
        """``rollout`` of the captured layers: (N, N) or None. Row i says how much each input patch flows into
        patch i's token through the captured layers (those placed on the grid only: where a family has windowed
        attention without a layout, the global ones)."""
        return rollout(list(self.layers.values())) if self.layers else None

    def query_maps(self, query: tuple[int, int], rollout: bool = True) -> dict[str, torch.Tensor]:
        """Attention of the ``(row, col)`` patch over the grid, per module (and rolled out): name -> (h, w)."""
        h, w = self.grid
        i = query[0] * w + query[1]
        maps = {name: a[i].reshape(h, w) for name, a in self.layers.items()}
        r = self.rollout() if rollout else None
        if r is not None:
            maps["rollout"] = r[i].reshape(h, w)
        return maps


def rollout(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of per-layer ``(n, n)`` attention, first layer first:
    ``prod_l (A_l + I) / 2``, rows renormalised -> ``(n, n)``."""
    eye = torch.eye(layers[0].shape[0], device=layers[0].device)
    out = eye
    for a in layers:
        a = (a + eye) / 2
        out = (a / a.sum(-1, keepdim=True)) @ out
    return out


def skip_summary(skipped: dict[str, str]) -> str:
    """The distinct reasons modules were skipped, each with its module count, in one line."""
    counts: dict[str, int] = {}
    for why in skipped.values():
        head = why.split(":")[0]  # the kind of reason, without the per-module numbers
        counts[head] = counts.get(head, 0) + 1
    return "; ".join(f"{why} ({n} module{'s' if n > 1 else ''})" for why, n in counts.items())


@contextmanager
def capture_attention(backbone) -> Iterator[dict[str, object]]:
    """While active, every forward of ``backbone`` stores its modules' attention probabilities.

    Yields name -> ``(B', heads, n, n)`` tensor (the last forward's), or name -> reason (str) for modules that
    offer no hook point.
    """
    store: dict[str, object] = {}
    restore, handles = [], []
    for name, mod in backbone.attention_modules():
        drop = getattr(mod, "attn_drop", None)
        if not hasattr(mod, "fused_attn") or not isinstance(drop, torch.nn.Module):
            store[name] = "no non-fused path with an attn_drop hook point"
            continue
        restore.append((mod, mod.fused_attn))
        mod.fused_attn = False
        hook = lambda m, inp, out, name=name: store.__setitem__(name, inp[0].detach())  # noqa: E731
        handles.append(drop.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
        for mod, fused in restore:
            mod.fused_attn = fused


def stage_attention(probs: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Partitioned attention ``(windows, heads, n, n)`` of one image -> ``(H*W, H*W)`` over the stage grid
    ``layout.grid``, heads averaged: each window's block at its tokens' places, zeros between tokens of different
    windows. Padding tokens (index -1) are dropped as queries and as keys; rows are renormalised over the real
    tokens (a padded window's real tokens gave some of their attention to the padding)."""
    h, w = layout.grid
    n = h * w
    idx = layout.index.to(probs.device).clone()
    idx[idx < 0] = n  # one spare row/column collects the padding, then goes
    full = torch.zeros(n + 1, n + 1, device=probs.device)
    full[idx[:, :, None], idx[:, None, :]] = probs.float().mean(1)
    full = full[:n, :n]
    return full / full.sum(-1, keepdim=True).clamp_min(1e-12)


def pool_to_grid(a: torch.Tensor, stage_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``(H*W, H*W)`` attention over a stage grid -> ``(h*w, h*w)`` over the coarser tap grid, ``H = f h`` and
    ``W = g w`` for integers ``f, g``: each tap cell covers an ``f x g`` block of stage tokens; its row is the
    average of their rows (queries) and its column the sum of their columns (keys), so rows stay distributions.
    (Average-pooling rows and columns by the integer factor, then renormalising the rows, is the same.)"""
    (hs, ws), (h, w) = stage_grid, grid
    f, g = hs // h, ws // w
    a = a.reshape(h, f, w, g, hs * ws).mean((1, 3))  # (h, w, H*W): queries pooled
    return a.reshape(h * w, h, f, w, g).sum((2, 4)).reshape(h * w, h * w)  # keys pooled


def place_on_grid(captured: dict[str, object], grid: tuple[int, int],
                  layouts: dict[str, TokenLayout] | None = None) -> BackboneAttention:
    """Keep the maps of one image that can be placed on the tap grid.

    A module with a ``TokenLayout`` (``layouts``, from the backbone's ``attention_layouts``) must have one row per
    window of it; ``stage_attention`` places them on the stage grid, and ``pool_to_grid`` pools that onto the tap
    grid when the stage is finer by an integer factor. Any other module must be global: one row and
    ``n = h*w + p`` tokens, the ``p`` prefix tokens first (timm's layout, ``p < min(h, w)``). The rest (windowed
    attention without a layout, a stage grid coarser than the tap's or not a multiple of it) is skipped."""
    h, w = grid
    layouts = layouts or {}
    layers, skipped = {}, {}
    for name, probs in captured.items():
        if isinstance(probs, str):
            skipped[name] = probs
            continue
        b, _, n, _ = probs.shape
        if name in layouts:
            lay = layouts[name]
            (hs, ws), nw = lay.grid, lay.index.shape[0]
            if (b, n) != (nw, lay.index.shape[1]):
                skipped[name] = f"partitioned attention off its layout: {b} window(s) of {n} tokens, not {nw} of " \
                                f"{lay.index.shape[1]}"
                continue
            if hs % h or ws % w:
                skipped[name] = f"stage grid off the tap grid: {hs}x{ws} is not a multiple of {h}x{w}"
                continue
            # rows are distributions already: stage_attention renormalises them, and pooling keeps them so
            a = pool_to_grid(stage_attention(probs, lay), lay.grid, grid)
        else:
            p = n - h * w
            if b != 1 or not 0 <= p < min(h, w):
                skipped[name] = f"windowed or off-grid attention: {b} row(s) of {n} tokens, not 1 of {h}x{w} " \
                                "(+ prefix)"
                continue
            a = probs[0].float().mean(0)[p:, p:]  # (N, N), heads averaged, prefix dropped
            a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)  # the prefix's share goes back to the patches
        layers[name] = a.cpu()
    return BackboneAttention(layers, grid, skipped)


@torch.no_grad()
def backbone_attention(backbone, pixels: torch.Tensor) -> BackboneAttention:
    """Attention of every attention module for one normalised image ``pixels (3, H, W)``."""
    size = tuple(pixels.shape[-2:])
    with capture_attention(backbone) as captured:
        backbone(pixels[None])
    return place_on_grid(captured, backbone.grid(size), backbone.attention_layouts(size))


@dataclass(frozen=True)
class LMAttention:
    """Attention mass the LM puts on each image position, from the positions that produced the answer."""

    maps: torch.Tensor  # (layers, heads, h, w); each (layer, head) sums to <= 1 over the grid
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    source: str
    token: int | str = "all"  # the answer token whose row was read, or "all" of them

    def mean(self) -> torch.Tensor:
        """(h, w): averaged over the chosen layers and heads."""
        return self.maps.mean((0, 1))


@contextmanager
def eager_attention(lm) -> Iterator[None]:
    """Fused kernels (SDPA, flash) return no probabilities: switch the LM to eager attention for the duration."""
    old = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(old)


def answer_rows(vlm, visual_tokens: torch.Tensor, prompt: str, answer: str):
    """The assembled prompt + ``answer`` + EOS (a ``Batch`` of one row) and the positions ``(A + 1,)`` whose next
    token is one of the answer's A tokens or the EOS, in order: position t predicts token t + 1."""
    batch = vlm.assemble(visual_tokens, [prompt], [answer])
    return batch, (batch.labels[0, 1:] != IGNORE_INDEX).nonzero()[:, 0]


def answer_tokens(vlm, visual_tokens: torch.Tensor, prompt: str, answer: str) -> list[str]:
    """The answer's tokens as the LM is taught them, the EOS last: what ``token=i`` of ``lm_image_attention``
    picks."""
    batch, rows = answer_rows(vlm, visual_tokens, prompt, answer)
    return vlm.tokenizer.convert_ids_to_tokens(batch.labels[0, rows + 1].tolist())


def _pick_rows(rows: torch.Tensor, source: str, token: int | str) -> torch.Tensor:
    """The rows ``source`` and ``token`` read out of the answer's ``rows (A + 1,)``."""
    if source not in ("answer", "prompt"):
        raise ValueError(f"source must be 'answer' or 'prompt', got {source!r}")
    if token == "all":
        return rows[:1] if source == "prompt" else rows
    if source == "prompt":
        raise ValueError("source='prompt' is one row already (the one that wrote token 0): use token='all'")
    if not -len(rows) <= token < len(rows):
        raise ValueError(f"token {token} is outside the answer's {len(rows)} tokens (EOS included)")
    return rows[[token]]


def _lm_attention(vlm, visual_tokens: torch.Tensor, prompt: str, answer: str, source: str, token: int | str):
    """One eager LM pass over prompt + ``answer`` + EOS: per-layer attention ``(1, H, T, T)``, the rows that
    ``source`` and ``token`` read, and the image positions ``(T,)`` bool."""
    batch, rows = answer_rows(vlm, visual_tokens, prompt, answer)
    rows = _pick_rows(rows, source, token)
    with eager_attention(vlm.lm):
        att = vlm.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                     output_attentions=True).attentions  # per layer (1, H, T, T)
    return att, rows, batch.image_mask[0]


@torch.no_grad()
def lm_image_attention(vlm, visual_tokens: torch.Tensor, prompt: str, answer: str, grid: tuple[int, int], *,
                       layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                       source: str = "answer", token: int | str = "all") -> LMAttention:
    """Attention from the answer onto the image tokens, for one image ``visual_tokens (1, N, C_vis)``.

    The sequence is the assembled prompt + ``answer`` + EOS. ``source="answer"`` averages the rows that predict
    the answer's tokens (the last prompt token through the last answer token), ``"prompt"`` takes the last prompt
    token alone (the one that chose the first answer token). ``token=i`` takes the one row that predicts the
    answer's token i (``answer_tokens``; the EOS last): where the LM looked when it wrote that token.
    """
    att, rows, img = _lm_attention(vlm, visual_tokens, prompt, answer, source, token)
    layers = tuple(range(len(att))) if layers is None else tuple(i % len(att) for i in layers)
    heads = tuple(range(att[0].shape[1])) if heads is None else tuple(heads)
    maps = torch.stack([att[i][0][list(heads)][:, rows][:, :, img].float().mean(1) for i in layers])  # (L, H, N)
    return LMAttention(maps.reshape(len(layers), len(heads), *grid).cpu(), layers, heads, source, token)


@torch.no_grad()
def lm_attention_rollout(vlm, visual_tokens: torch.Tensor, prompt: str, answer: str, grid: tuple[int, int], *,
                         source: str = "answer", token: int | str = "all") -> torch.Tensor:
    """``rollout`` over every LM layer (heads averaged) of the same pass as ``lm_image_attention``, read from the
    same rows onto the image positions: ``(h, w)``, summing to at most 1. Unlike one layer's map it counts what
    reaches the answer through earlier positions (the prompt's tokens read the image too)."""
    att, rows, img = _lm_attention(vlm, visual_tokens, prompt, answer, source, token)
    flow = rollout([a[0].float().mean(0) for a in att])  # (T, T)
    return flow[rows][:, img].mean(0).reshape(grid).cpu()
