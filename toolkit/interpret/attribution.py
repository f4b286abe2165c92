"""Attributions of a grounding answer to the input pixels (captum)."""
from __future__ import annotations

import torch

from toolkit.vlm import VLM


def pixel_saliency(vlm: VLM, pixels: torch.Tensor, prompt: str, answer: str) -> torch.Tensor:
    """captum Saliency of the answer's first token w.r.t. the input pixels ``(3, H, W)`` -> ``(H, W)``."""
    from captum.attr import Saliency

    tok = vlm.tokenizer
    ids = tok(answer, add_special_tokens=False).input_ids
    target = ids[0] if ids else tok.eos_token_id

    def first_token_logits(px: torch.Tensor) -> torch.Tensor:
        b = vlm.assemble(vlm.backbone(px), [prompt] * len(px))
        return vlm.lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask).logits[:, -1]  # (B, V)

    with torch.enable_grad():
        px = pixels[None].to(vlm.device).requires_grad_()
        grad = Saliency(first_token_logits).attribute(px, target=target, abs=True)
    return grad[0].amax(0).detach().cpu()  # (H, W), max over colour channels
