"""Text-image similarity: how close each word of a referring expression lies to each visual token in the LM's space.

The connector's job is to put visual tokens where the LM's word embeddings live; a map of cosine similarity
between the expression's tokens and the projected visual tokens shows whether that happened where the object is.
The contextual variant compares the LM's last-layer hidden states instead (after the LM has read the image).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toolkit.boxes import GROUNDING_PROMPT
from toolkit.llm import token_embeddings


@dataclass(frozen=True)
class Similarity:
    """Cosine similarity of each expression token with each visual token, on the backbone's grid."""

    tokens: list[str]
    maps: torch.Tensor  # (T, h, w), in [-1, 1]
    mean: torch.Tensor  # (h, w), mean over the tokens
    contextual: bool


@torch.no_grad()
def text_image_similarity(vlm, visual_tokens: torch.Tensor, expression: str, grid: tuple[int, int], *,
                          contextual: bool = False) -> Similarity:
    """``visual_tokens (1, N, C_vis)`` from ``vlm.encode_images`` -> per-token and mean maps on ``grid = (h, w)``.

    ``contextual=False``: LM input embeddings of the expression vs the connector output (what the LM is fed).
    ``contextual=True``: LM last-layer hidden states of the expression's tokens vs those of the image positions,
    with the expression inside the grounding prompt (what the LM made of both).
    """
    if contextual:
        prompt = GROUNDING_PROMPT.format(expression=expression)
        batch = vlm.assemble(visual_tokens, [prompt])
        hidden = vlm.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                        output_hidden_states=True).hidden_states[-1][0]  # (L, d)
        pos = expression_positions(vlm, batch, prompt, expression)
        tokens = vlm.tokenizer.convert_ids_to_tokens(batch.input_ids[0, pos].tolist())
        text, image = hidden[pos], hidden[batch.image_mask[0]]  # (T, d), (N, d)
    else:
        tokens, text = token_embeddings(vlm.lm, vlm.tokenizer, expression)  # (T, d)
        image = vlm.connector(visual_tokens.to(vlm.device, text.dtype))[0]  # (N, d)
    sim = F.cosine_similarity(text.float()[:, None], image.float()[None], dim=-1)  # (T, N)
    maps = sim.reshape(len(tokens), *grid).cpu()
    return Similarity(tokens, maps, maps.mean(0), contextual)


def expression_positions(vlm, batch, prompt: str, expression: str) -> torch.Tensor:
    """Sequence positions of ``expression``'s tokens inside an assembled single-prompt ``batch``.

    The prompt is re-tokenized exactly as ``VLM.assemble`` does, with character offsets, so the positions hold
    whatever merges the tokenizer makes at the expression's borders.
    """
    text = vlm.template.prompt(prompt)
    enc = vlm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = int(batch.image_mask[0].nonzero().max()) + 1  # the prompt follows the image tokens
    assert batch.input_ids[0, start:start + len(enc.input_ids)].tolist() == enc.input_ids, "prompt layout changed"
    lo = text.rindex(expression)
    hi = lo + len(expression)
    inside = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a < hi and b > lo]
    return torch.tensor(inside, device=batch.input_ids.device) + start
