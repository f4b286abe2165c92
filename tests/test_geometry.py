"""Resize strategies: the geometry matches the pixels, boxes round-trip, and the RefCOCO frame mismatch."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from toolkit.boxes import box_iou
from toolkit.geometry import STRATEGIES, apply_geometry

SIZES = [(64, 96), (224, 224), (80, 40)]  # (H, W) the backbone is configured at


def _random_box(rng: random.Random, w: int, h: int) -> tuple[float, float, float, float]:
    x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
    y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
    return (x1, y1, x2, y2)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_random_images_and_boxes(strategy, size):
    rng = random.Random(hash((strategy, size)) % 2**32)
    for _ in range(20):
        w0, h0 = rng.randint(8, 700), rng.randint(8, 700)
        out, g = apply_geometry(Image.new("RGB", (w0, h0)), size, strategy)
        n = int(strategy.rsplit("-", 1)[1]) if strategy.startswith("letterbox-square-") else None
        assert out.size == (g.in_w, g.in_h) == ((n, n) if n else (size[1], size[0]))
        assert (g.orig_w, g.orig_h) == (w0, h0)
        for _ in range(10):
            box = _random_box(rng, w0, h0)
            if strategy == "resize-crop":  # keep the box inside the visible crop; clipping is tested apart
                vis = g.box_to_original((0, 0, g.in_w, g.in_h))
                box = _random_box(rng, vis[2] - vis[0], vis[3] - vis[1])
                box = (box[0] + vis[0], box[1] + vis[1], box[2] + vis[0], box[3] + vis[1])
            assert g.box_to_original(g.box_to_input(box)) == pytest.approx(box, abs=1e-6)
            assert g.norm_input_to_original(g.original_to_norm_input(box)) == pytest.approx(box, abs=1e-6)
            assert all(0.0 <= v <= 1.0 for v in g.original_to_norm_input(box))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_geometry_matches_the_pixels(strategy):
    """A white rectangle drawn on the original lands where ``box_to_input`` says (within resampling blur)."""
    for (w0, h0), box in [((300, 120), (40, 20, 200, 90)), ((90, 250), (10, 100, 70, 230))]:
        img = Image.new("RGB", (w0, h0), (0, 0, 0))
        ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 255, 255))
        out, g = apply_geometry(img, (128, 160), strategy)
        ys, xs = np.nonzero(np.asarray(out.convert("L")) > 127)
        found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert found == pytest.approx(g.box_to_input(box), abs=1.5)


def test_crop_clips_boxes_that_leave_it():
    _, g = apply_geometry(Image.new("RGB", (400, 100)), (100, 100), "resize-crop")
    assert (g.sx, g.ox) == (1.0, -150.0)  # the shorter side already fits; 150 px cropped on each side
    assert g.box_to_input((0, 10, 400, 90)) == (0.0, 10.0, 100.0, 90.0)
    assert g.box_to_original(g.box_to_input((0, 10, 400, 90))) == (150.0, 10.0, 250.0, 90.0)  # the visible part


def test_shrink_never_enlarges_but_resize_and_pad_does():
    small = Image.new("RGB", (640, 480))
    out, g = apply_geometry(small, (800, 1333), "shrink-and-pad")
    assert (g.sx, g.sy, out.size) == (1.0, 1.0, (1333, 800))  # the release pads a COCO-sized image, unscaled
    _, g = apply_geometry(small, (800, 1333), "resize-and-pad")
    assert g.sy == pytest.approx(800 / 480)  # mmdet's keep-ratio rescale fills the short side
    _, g = apply_geometry(Image.new("RGB", (2000, 1000)), (512, 512), "letterbox-square-512")
    assert (g.in_w, g.in_h, g.sx, g.sy, g.ox, g.oy) == (512, 512, 0.256, 0.256, 0.0, 0.0)


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="letterbox-square-512"):
        apply_geometry(Image.new("RGB", (4, 4)), (4, 4), "squash")


def test_refcoco_letterbox_frame_mismatch():
    """RefCOCO normalises ground truth by the ORIGINAL size; a letterboxed model sees a padded square frame.

    For a non-square image the two normalisations of one box differ; ``Geometry`` maps each to the same pixels,
    and reading an original-frame box as if it were an input-frame box (the known error) misses the object.
    """
    w0, h0 = 640, 320
    _, g = apply_geometry(Image.new("RGB", (w0, h0)), (224, 224), "letterbox")
    box = (320.0, 40.0, 480.0, 120.0)  # pixels of the original image
    gt_original = (box[0] / w0, box[1] / h0, box[2] / w0, box[3] / h0)  # what the RefCOCO harness stores
    gt_input = g.original_to_norm_input(box)  # what a model trained on its own frame answers
    assert gt_input != pytest.approx(gt_original, abs=1e-3)
    assert g.norm_original_to_norm_input(gt_original) == pytest.approx(gt_input)
    assert g.norm_input_to_original(gt_input) == pytest.approx(box)
    assert tuple(v * s for v, s in zip(gt_original, (w0, h0, w0, h0))) == pytest.approx(box)
    wrong = g.norm_input_to_original(gt_original)  # original-frame box misread as input-frame
    assert box_iou(torch.tensor(wrong), torch.tensor(box)) < 0.5  # scored as a miss at Acc@IoU>=0.5
    _, sq = apply_geometry(Image.new("RGB", (300, 300)), (224, 224), "letterbox")
    assert sq.norm_original_to_norm_input((0.1, 0.2, 0.3, 0.4)) == pytest.approx((0.1, 0.2, 0.3, 0.4))


@pytest.mark.parametrize("strategy", ["letterbox", "resize-and-pad", "letterbox-square-224", "resize-naive"])
@pytest.mark.parametrize("image", [(300, 120), (90, 250)])
@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (3, 5)])
def test_cell_at_finds_the_cell_that_holds_a_pixel_and_none_off_the_image(strategy, image, grid):
    """A click's pixel -> the cell of the tap grid the model saw it in, over padded non-square frames: every pixel of
    the image lands in a cell whose box (``cell_edges``, original pixels) holds it; a point where only padding is
    (off the image) has no cell."""
    (w0, h0), (h, w) = image, grid
    _, g = apply_geometry(Image.new("RGB", image), (224, 224), strategy)
    xs, ys = g.cell_edges(grid)
    rng = random.Random(hash((strategy, image, grid)) % 2**32)
    for x, y in [(0, 0), (w0 - 1, h0 - 1), (w0 - 0.01, 0)] + [(rng.uniform(0, w0), rng.uniform(0, h0))
                                                             for _ in range(200)]:
        r, c = g.cell_at(x, y, grid)
        assert 0 <= r < h and 0 <= c < w and xs[c] <= x <= xs[c + 1] and ys[r] <= y <= ys[r + 1], (x, y, r, c)
    for r in range(h):  # the centre of a cell's part of the image maps back to it; cells in the padding have none
        for c in range(w):
            if xs[c + 1] > xs[c] and ys[r + 1] > ys[r]:
                assert g.cell_at((xs[c] + xs[c + 1]) / 2, (ys[r] + ys[r + 1]) / 2, grid) == (r, c)
    for x, y in [(-1, h0 / 2), (w0, h0 / 2), (w0 / 2, -0.5), (w0 / 2, h0 + 3)]:  # where the letterbox pads
        assert g.cell_at(x, y, grid) is None
        assert g.cell_at(x, y, grid, clamp=True) == g.cell_at(min(max(x, 0), w0 - 0.01), min(max(y, 0), h0 - 0.01),
                                                            grid)


def test_cell_at_on_a_letterboxed_wide_image_and_a_crop():
    _, g = apply_geometry(Image.new("RGB", (64, 32)), (32, 32), "letterbox")  # image rows 8..24 of the input
    assert g.cell_at(50, 20, (4, 4)) == (2, 3) and g.cell_at(0, 0, (4, 4)) == (1, 0)  # rows 0 and 3: padding only
    assert g.cell_at(63.9, 31.9, (4, 4)) == (2, 3) and g.cell_at(10, 32, (4, 4)) is None
    _, crop = apply_geometry(Image.new("RGB", (400, 100)), (100, 100), "resize-crop")  # columns 150..250 seen
    assert crop.cell_at(160, 50, (4, 4)) == (2, 0) and crop.cell_at(100, 50, (4, 4)) is None
    assert crop.cell_at(100, 50, (4, 4), clamp=True) == (2, 0) and crop.cell_at(399, 0, (4, 4), clamp=True) == (0, 3)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("size", [(64, 64), (32, 48), (100, 80)])
def test_fit_batch_puts_a_batch_where_apply_geometry_puts_one_image(strategy, size):
    """The tensor path (training sets fed to a backbone of another size) against the PIL path the VLM uses: same
    frame and size; pixels equal up to resampling (bilinear vs bicubic) and a sub-pixel padding edge."""
    from toolkit.geometry import fit_batch

    yy, xx = np.mgrid[0:40, 0:60]
    img = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)
    want = np.asarray(apply_geometry(Image.fromarray(img), size, strategy, fill=(10, 20, 30))[0]).astype(float)
    got = fit_batch(torch.from_numpy(img).permute(2, 0, 1)[None].repeat(2, 1, 1, 1), size, strategy, (10, 20, 30))
    assert got.dtype == torch.uint8 and got.shape[0] == 2 and torch.equal(got[0], got[1])
    diff = np.abs(got[0].permute(1, 2, 0).numpy().astype(float) - want)
    assert diff.shape == want.shape and diff.mean() < 6 and (diff > 8).mean() < 0.1  # edge rows only


def test_fit_batch_moves_label_maps_without_blending():
    from toolkit.geometry import fit_batch

    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[..., 2:4, 2:6] = 3
    out = fit_batch(labels, (12, 8), "shrink-and-pad", 255, mode="nearest")  # never enlarged: pasted top-left
    assert out.shape == (1, 1, 12, 8) and torch.equal(out[..., :8, :], labels) and (out[..., 8:, :] == 255).all()
    up = fit_batch(labels, (16, 16), "letterbox", 255, mode="nearest")
    assert set(up.unique().tolist()) == {0, 3} and (up == 3).sum() == 4 * (labels == 3).sum()
    same = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    assert fit_batch(same, (16, 16), "letterbox") is same
