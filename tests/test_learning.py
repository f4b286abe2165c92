"""Does a tiny VLM learn from its image? Seconds-long trainings on drawn one-object images, frozen random backbone.

- information flow: asked the object's colour, it beats the majority answer, and loses that accuracy when its image
  tokens are swapped for another image's (toolkit.eval.reliance);
- localisation: asked for the object's box, it beats the best constant box on Acc@0.5 by a margin.
Thread count pinned so that a busy machine slows these down instead of stalling them (oversubscription).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from toolkit.boxes import GROUNDING_PROMPT, box_iou, format_box, parse_box
from toolkit.config import StageConfig, TrainConfig
from toolkit.eval.reliance import image_reliance
from toolkit.llm import LMConfig, train_tokenizer
from toolkit.train.vlm_trainer import Turn, train_vlm
from toolkit.vlm import VLM, VLMConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 165, 60), "blue": (35, 75, 225), "yellow": (245, 215, 25)}
COLOUR_Q = "What color is the object?"
BOX_Q = GROUNDING_PROMPT.format(expression="the object")
LM = LMConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_object_images(n: int, seed: int, size: int = 32):
    """``n`` grey images with one coloured square each -> (images, colour names, boxes normalised xyxy)."""
    rng = np.random.default_rng(seed)
    images, colours, boxes = [], [], []
    for _ in range(n):
        side = int(rng.integers(10, 17))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        colour = str(rng.choice(list(COLOURS)))
        img = Image.new("RGB", (size, size), (128, 128, 128))
        ImageDraw.Draw(img).rectangle((x, y, x + side - 1, y + side - 1), fill=COLOURS[colour])
        images.append(img)
        colours.append(colour)
        boxes.append((x / size, y / size, (x + side) / size, (y + side) / size))
    return images, colours, boxes


def tiny_vlm() -> VLM:
    tok = train_tokenizer([COLOUR_Q, BOX_Q, *COLOURS], 300)
    torch.manual_seed(0)
    return VLM.build(VLMConfig(backbone="vit-test", lm=LM, image_pos="sincos2d"), tok)


def encode(vlm: VLM, images) -> torch.Tensor:
    return vlm.encode_images(torch.stack([vlm.preprocess(im)[0] for im in images]))


def train(vlm: VLM, feats: torch.Tensor, turns: list[Turn], steps: int, tmp_path) -> None:
    cfg = TrainConfig(stages=(StageConfig("finetune", steps, 3e-3, 32, True),), checkpoint_every=10 ** 6)
    train_vlm(vlm, feats, turns, cfg, tmp_path, torch.device("cpu"))


def test_a_vlm_reads_colour_from_its_image_and_loses_it_with_shuffled_tokens(tmp_path):
    vlm = tiny_vlm()
    images, colours, _ = one_object_images(256, seed=0)
    val_images, val_colours, _ = one_object_images(64, seed=1)
    train(vlm, encode(vlm, images), [Turn(i, COLOUR_Q, c, "vqa") for i, c in enumerate(colours)], 150, tmp_path)

    val_feats = encode(vlm, val_images)
    answers = vlm.generate(val_feats, [COLOUR_Q] * len(val_images), max_new_tokens=8)
    accuracy = np.mean([a == c for a, c in zip(answers, val_colours)])
    majority = max(val_colours.count(c) for c in COLOURS) / len(val_colours)
    rel = image_reliance(vlm, val_feats, [Turn(i, COLOUR_Q, c, "vqa") for i, c in enumerate(val_colours)])
    print(f"colour accuracy {accuracy:.2f} (majority {majority:.2f}); reliance {rel}")
    assert accuracy > majority + 0.3
    assert rel["relies_on_image"]
    assert rel["loss_shuffled"] > rel["loss_true"] + 0.5


def test_a_vlm_localises_a_single_object_better_than_the_best_constant_box(tmp_path):
    vlm = tiny_vlm()
    images, _, boxes = one_object_images(512, seed=2)
    val_images, _, val_boxes = one_object_images(96, seed=3)
    train(vlm, encode(vlm, images), [Turn(i, BOX_Q, format_box(b), "grounding") for i, b in enumerate(boxes)], 400,
          tmp_path)

    answers = vlm.generate(encode(vlm, val_images), [BOX_Q] * len(val_images), max_new_tokens=12)
    truth = torch.tensor(val_boxes)
    pred = [parse_box(a) for a in answers]
    ious = torch.tensor([float(box_iou(torch.tensor(p), t)) if p else 0.0 for p, t in zip(pred, truth)])
    mean_box = torch.tensor(boxes).mean(0)
    chance = box_iou(mean_box[None], truth)  # (N,)
    acc, acc_chance = (ious >= 0.5).float().mean().item(), (chance >= 0.5).float().mean().item()
    print(f"Acc@0.5 {acc:.2f} vs mean box {acc_chance:.2f}; mean IoU {ious.mean():.2f} vs {chance.mean():.2f}")
    assert sum(p is None for p in pred) < 0.1 * len(pred)
    assert acc > acc_chance + 0.2
