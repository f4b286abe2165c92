"""Attributions of a grounding answer (captum): to the input pixels, and to the visual tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.llm import answer_logits
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


@dataclass(frozen=True)
class TokenAttribution:
    """Integrated Gradients of the answer's log-probability over the visual tokens."""

    per_token: torch.Tensor  # (N,), signed: the sum over channels of each token's attribution
    f_input: float  # sum of the answer tokens' log-probabilities with the image's own tokens
    f_baseline: float  # the same with the baseline tokens
    delta: float  # completeness gap: per_token.sum() - (f_input - f_baseline), from captum


def answer_log_prob(vlm: VLM, visual_tokens: torch.Tensor, prompt: str, answer: str) -> torch.Tensor:
    """Sum of the log-probabilities of ``answer``'s tokens (EOS left out, unless the answer is empty) after
    ``prompt``, teacher-forced, for each row of ``visual_tokens (B, N, C_vis)`` -> ``(B,)``. Differentiable."""
    b = len(visual_tokens)
    batch = vlm.assemble(visual_tokens, [prompt] * b, [answer] * b)
    logits, labels = answer_logits(vlm.lm, batch.inputs_embeds, batch.attention_mask, batch.labels)  # (B * K, V)
    lp = logits.log_softmax(-1).gather(-1, labels[:, None]).reshape(b, -1)  # (B, K): answer tokens then EOS
    return lp[:, :-1].sum(-1) if lp.shape[1] > 1 else lp[:, 0]


def token_integrated_gradients(vlm: VLM, visual_tokens: torch.Tensor, prompt: str, answer: str, *,
                               baseline: str = "zeros", n_steps: int = 16) -> TokenAttribution:
    """captum IntegratedGradients of ``answer_log_prob`` w.r.t. one image's ``visual_tokens (1, N, C_vis)``.

    The tokens are the connector's input, so gradients stop there: no backward through the frozen backbone. The
    baseline is all-zero tokens (``"zeros"``) or every token replaced by the image's mean token (``"mean"``: only
    where the tokens differ is anything attributed). The ``n_steps`` interpolation points run as one LM batch.
    """
    from captum.attr import IntegratedGradients

    if baseline not in ("zeros", "mean"):
        raise ValueError(f"baseline must be 'zeros' or 'mean', got {baseline!r}")
    x = visual_tokens.to(vlm.device).detach()
    base = torch.zeros_like(x) if baseline == "zeros" else x.mean(1, keepdim=True).expand_as(x)
    f = lambda t: answer_log_prob(vlm, t, prompt, answer)  # noqa: E731
    with torch.enable_grad():
        attr, delta = IntegratedGradients(f).attribute(x, baselines=base, n_steps=n_steps,
                                                       return_convergence_delta=True)
    with torch.no_grad():
        fx, fb = f(torch.cat([x, base])).tolist()
    return TokenAttribution(attr[0].sum(-1).detach().float().cpu(), fx, fb, float(delta[0]))
