"""Shared fixtures: a tiny run directory of VLMs from different backbone families; marker handling."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/timm are imported: nothing may be downloaded
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

# One thread per test process: on a busy 2-core machine (CI beside other work) extra threads oversubscribe the
# cores and training loops stall instead of slowing down.
torch.set_num_threads(int(os.environ.get("TOOLKIT_TEST_THREADS", "1")))
from PIL import Image, ImageDraw

from toolkit.llm import LMConfig, train_tokenizer
from toolkit.vlm import VLM, VLMConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TINY_LM = LMConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
TINY_TEXTS = ["the red square", "the small blue star to the left of the yellow circle", "the green triangle",
              "Please provide the bounding box coordinate of the region this sentence describes:"]


def scan_kernels_available() -> bool:
    try:
        from toolkit_kernels import ss2d_scan_attention_fn, ss2d_scan_fn  # noqa: F401
    except ImportError:
        return False
    return True


# One family with global attention, one with windowed (block + grid) attention only, and the 2-D scan family once its
# kernels exist.
RUN_BACKBONES = ("vit-test", "maxvit-test") + (("vmamba-test",) if scan_kernels_available() else ())


def pytest_collection_modifyitems(config, items):
    skips = {"browser": (CHROMIUM is None, "needs Chromium (apt-get install chromium)"),
             "cuda": (not torch.cuda.is_available(), "needs an NVIDIA GPU")}
    for item in items:
        for marker, (skip, why) in skips.items():
            if skip and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TINY_TEXTS, 400)


def tiny_vlm(tokenizer, backbone: str) -> VLM:
    torch.manual_seed(0)
    return VLM.build(VLMConfig(backbone=backbone, lm=TINY_LM), tokenizer).eval()


def scene_image(size=(48, 32)) -> Image.Image:
    """A small non-square scene: a red square and a blue circle on grey."""
    img = Image.new("RGB", size, (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle((4, 4, 18, 18), fill=(220, 30, 30))
    d.ellipse((28, 10, 44, 26), fill=(30, 30, 220))
    return img


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_tokenizer) -> Path:
    """``run/vlms/<backbone>`` for RUN_BACKBONES, plus one val image and the evaluation record that names it."""
    run = tmp_path_factory.mktemp("run")
    for name in RUN_BACKBONES:
        tiny_vlm(tiny_tokenizer, name).save(run / "vlms" / name)
    img = run / "val" / "scene.png"
    img.parent.mkdir()
    scene_image().save(img)
    record = dict(dataset="refcoco", expression="the red square", answer="", valid=False, iou=0.0, correct=False,
                  image_path=str(img), pred_box=None, gt_box=[4, 4, 18, 18])
    (run / "vlms" / RUN_BACKBONES[0] / "eval_val_test.json").write_text(json.dumps(dict(grounding=[record], vqa=[])))
    return run
