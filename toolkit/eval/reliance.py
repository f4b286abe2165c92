"""Does a VLM look at its image? Teacher-forced answer loss and token accuracy with each example's own image
tokens, against the same examples given the tokens of another image (a derangement of the batch's images).

A VLM that answers from the text alone (the prior over answers, the expression's words) scores the same both
ways; one that reads the image loses accuracy when its tokens belong to another scene.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from toolkit.llm import answer_logits
from toolkit.vlm import VLM

# A VLM whose answer loss (nats per answer token) rises by less than this when its image tokens are shuffled is
# flagged. Loss, not token accuracy: most answer tokens (brackets, commas, EOS, the prior's likely coordinates) are
# predictable from the text, so accuracy moves little even for a VLM that reads its image.
RELIANCE_MIN_LOSS_GAIN = 0.1


def derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation of ``range(n)`` with no fixed point (n >= 2): a cyclic shift of a random order."""
    if n < 2:
        raise ValueError("shuffling image tokens needs at least two images")
    order = torch.randperm(n, generator=gen)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(1)
    return out


@torch.no_grad()
def answer_scores(vlm: VLM, visual_tokens: torch.Tensor, prompts: Sequence[str],
                  answers: Sequence[str]) -> tuple[float, int, int]:
    """Summed next-token loss, answer tokens and correctly predicted (argmax) answer tokens of one batch."""
    b = vlm.assemble(visual_tokens, prompts, answers)
    logits, labels = answer_logits(vlm.lm, b.inputs_embeds, b.attention_mask, b.labels)  # (K, V), (K,)
    loss = F.cross_entropy(logits, labels, reduction="sum").item()
    return loss, len(labels), int((logits.argmax(-1) == labels).sum())


@torch.no_grad()
def image_reliance(vlm: VLM, features: torch.Tensor, turns: Sequence, batch_size: int = 64,
                   seed: int = 0) -> dict[str, float]:
    """``features (N_images, N_tokens, C)``; ``turns`` with ``.image`` (index into features), ``.prompt``,
    ``.answer``. Returns loss and answer-token accuracy with the true tokens and with shuffled ones, the loss gain
    and accuracy drop, and ``relies_on_image`` (loss gain >= ``RELIANCE_MIN_LOSS_GAIN``)."""
    vlm.eval()
    perm = derangement(features.shape[0], torch.Generator().manual_seed(seed))
    out = {}
    for kind, image_of in (("true", lambda i: i), ("shuffled", lambda i: int(perm[i]))):
        loss = n = correct = 0
        for s in range(0, len(turns), batch_size):
            chunk = turns[s:s + batch_size]
            feats = features[[image_of(t.image) for t in chunk]]
            l, k, c = answer_scores(vlm, feats, [t.prompt for t in chunk], [t.answer for t in chunk])
            loss, n, correct = loss + l, n + k, correct + c
        out[f"loss_{kind}"] = loss / max(1, n)
        out[f"token_acc_{kind}"] = correct / max(1, n)
    out["loss_gain"] = out["loss_shuffled"] - out["loss_true"]
    out["token_acc_drop"] = out["token_acc_true"] - out["token_acc_shuffled"]
    out["relies_on_image"] = bool(out["loss_gain"] >= RELIANCE_MIN_LOSS_GAIN)
    return out
