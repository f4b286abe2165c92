"""Batched answering, shared by the scene world's evaluation (``evaluate``) and the benchmark harness (``harness``):
each distinct image of a batch is read and run through the frozen backbone once, every prompt is answered greedily
in one generate call, and every answer is read as a box (an answer that is not a box is invalid, never an error).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from toolkit.geometry import Geometry
from toolkit.vlm import VLM, Grounding

# image -> (its visual tokens (N, C_vis), its geometry), as ``answer_batch`` reads and fills it
Encoded = dict[object, tuple[torch.Tensor, Geometry]]


@dataclass(frozen=True)
class Answer:
    """One prompt's answer. ``box``: the answer read as a box and mapped onto the original image (``valid=False``
    when it is not a box); ``text`` and ``box`` are None when the image could not be read, and ``error`` says why."""

    text: str | None
    box: Grounding | None
    error: str | None = None


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def open_image(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


@torch.no_grad()
def answer_batch(vlm: VLM, images: Sequence, prompts: Sequence[str], max_new_tokens: int,
                 encoded: Encoded | None = None, log: Callable[[str], None] | None = None) -> list[Answer]:
    """Answers to ``prompts[i]`` about ``images[i]`` (image paths), in one generate call.

    ``encoded``, when given, is looked up before any image is read and receives what this batch encodes: a caller
    that asks a frozen backbone about the same images again (the training monitor) runs it once per image. An image
    that cannot be read is logged and answers none of its prompts (``Answer.error``); the others are answered."""
    encoded = {} if encoded is None else encoded
    errors = _encode(vlm, [im for im in dict.fromkeys(images) if im not in encoded], encoded, log)
    ok = [i for i, im in enumerate(images) if im not in errors]
    texts = iter(vlm.generate(torch.stack([encoded[images[i]][0] for i in ok]), [prompts[i] for i in ok],
                              max_new_tokens) if ok else [])
    out = []
    for im in images:
        if im in errors:
            out.append(Answer(None, None, errors[im]))
        else:
            text = next(texts)
            out.append(Answer(text, vlm.read_box(text, encoded[im][1])))
    return out


def _encode(vlm: VLM, images: Sequence, into: Encoded, log: Callable[[str], None] | None) -> dict[object, str]:
    """Encode the readable ``images`` in one backbone call, into ``into``; returns why each other one is unreadable."""
    prepared, errors = {}, {}
    for im in images:
        try:
            prepared[im] = vlm.preprocess(open_image(im))
        except Exception as e:  # any reason an image cannot be read is its samples' error, not the run's
            why = (str(e).splitlines() or [""])[0]
            errors[im] = f"cannot open image {im}: {type(e).__name__}: {why}"
            if log is not None:
                log(errors[im])
    if prepared:
        tokens = vlm.encode_images(torch.stack([pixels for pixels, _ in prepared.values()]))  # (U, N, C_vis)
        into.update((im, (t, geom)) for (im, (_, geom)), t in zip(prepared.items(), tokens))
    return errors
