"""toolkit.interpret: map shapes on each backbone's grid, value ranges, what is captured per family, input checks."""
from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import RUN_BACKBONES, scan_kernels_available, scene_image, tiny_vlm
from PIL import Image

from toolkit.boxes import GROUNDING_PROMPT, box_iou
from toolkit.interpret.analysis import tap_mixer
from toolkit.registry import create_backbone
from toolkit.interpret import (analyze, backbone_attention, compare, example_images, lm_image_attention, load_image,
                               parse_pixel_box, results_table, scan_paths, text_image_similarity)

needs_scan_kernels = pytest.mark.skipif(not scan_kernels_available(),
                                        reason="toolkit_kernels.ss2d_scan_attention_fn missing")


@pytest.fixture(scope="module")
def vlms(tiny_tokenizer):
    return {name: tiny_vlm(tiny_tokenizer, name) for name in RUN_BACKBONES}


def _tokens(vlm, image=None):
    pixels, _ = vlm.preprocess(image or scene_image())
    return pixels, vlm.encode_images(pixels[None]), vlm.backbone.grid(tuple(pixels.shape[-2:]))


@pytest.mark.parametrize("name", RUN_BACKBONES)
@pytest.mark.parametrize("contextual", [False, True])
def test_similarity_maps_on_the_backbone_grid(vlms, name, contextual):
    vlm = vlms[name]
    _, tokens, grid = _tokens(vlm)
    sim = text_image_similarity(vlm, tokens, "the small blue star", grid, contextual=contextual)
    assert sim.maps.shape == (len(sim.tokens), *grid) and len(sim.tokens) >= 4
    assert "".join(sim.tokens).replace("▁", " ").strip() == "the small blue star"
    assert torch.allclose(sim.mean, sim.maps.mean(0))
    assert sim.maps.abs().max() <= 1 + 1e-5 and torch.isfinite(sim.maps).all()


def test_vit_attention_is_what_the_model_used(vlms):
    """Captured maps: one per block, CLS dropped, rows are distributions; capturing leaves outputs unchanged and
    restores the fused path."""
    bb = vlms["vit-test"].backbone
    pixels, tokens, grid = _tokens(vlms["vit-test"])
    att = backbone_attention(bb, pixels)
    n = grid[0] * grid[1]
    assert list(att.layers) == [name for name, _ in bb.attention_modules()] and not att.skipped
    for a in list(att.layers.values()) + [att.rollout()]:
        assert a.shape == (n, n) and torch.allclose(a.sum(-1), torch.ones(n), atol=1e-5) and (a >= 0).all()
    assert all(m.fused_attn for _, m in bb.attention_modules())
    assert torch.allclose(bb(pixels[None]), tokens, atol=1e-5)
    maps = att.query_maps((1, 2))
    assert set(maps) == set(att.layers) | {"rollout"} and all(m.shape == grid for m in maps.values())


def _support(kind: str, grid: tuple[int, int], p: int) -> torch.Tensor:
    """(N, N) bool from the partition definitions: block attention mixes the tokens of one p x p window, grid
    attention the tokens H/p (W/p) apart, one of each p x p dilated group."""
    h, w = grid
    r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    if kind == "attn_block":
        key_r, key_c = r // p, c // p
    else:
        key_r, key_c = r % (h // p), c % (w // p)
    return (key_r[:, None] == key_r[None]) & (key_c[:, None] == key_c[None])


def _window_tokens(kind: str, grid: tuple[int, int], p: int, k: int) -> list[int]:
    """Flat stage-grid indices of the tokens of partition ``k`` (timm's order: partitions and tokens row-major)."""
    h, w = grid
    if kind == "attn_block":
        wr, wc = divmod(k, w // p)
        return [(wr * p + i) * w + wc * p + j for i in range(p) for j in range(p)]
    gr, gc = divmod(k, w // p)
    return [(i * (h // p) + gr) * w + j * (w // p) + gc for i in range(p) for j in range(p)]


def test_maxvit_block_and_grid_attention_are_placed_on_their_stage_grid_and_pooled_to_the_tap(vlms):
    """Each window's probabilities land on its tokens' places: rows are distributions whose support is the query's
    window (block) or dilated group (grid); finer stages are pooled onto the tap grid; capturing changes nothing."""
    from toolkit.interpret.attention import capture_attention, pool_to_grid, stage_attention

    bb = vlms["maxvit-test"].backbone
    pixels, tokens, grid = _tokens(vlms["maxvit-test"])
    fused = [m.fused_attn for _, m in bb.attention_modules()]
    with capture_attention(bb) as captured, torch.no_grad():
        bb(pixels[None])
    layouts = bb.attention_layouts(tuple(pixels.shape[-2:]))
    att = backbone_attention(bb, pixels)
    names = [name for name, _ in bb.attention_modules()]
    assert list(att.layers) == names and not att.skipped and list(layouts) == names
    assert [layouts[n].grid for n in names] == [(16, 16)] * 2 + [(8, 8)] * 2 + [(4, 4)] * 2  # stages 1-3, 64 px
    for name in names:
        kind, lay, probs = name.split(".")[-2], layouts[name], captured[name]
        p = bb.cfg.img_size // 32  # MaxViT's window and grid side
        n = lay.grid[0] * lay.grid[1]
        full = stage_attention(probs, lay)
        assert full.shape == (n, n) and torch.allclose(full.sum(-1), torch.ones(n), atol=1e-5)
        assert torch.equal(full > 0, _support(kind, lay.grid, p))
        k = probs.shape[0] // 2 + 1  # one window, away from the first
        idx = torch.tensor(_window_tokens(kind, lay.grid, p, k))
        assert torch.allclose(full[idx][:, idx], probs[k].float().mean(0), atol=1e-6)
        a = att.layers[name]
        assert a.shape == (16, 16) and torch.allclose(a.sum(-1), torch.ones(16), atol=1e-5)
        assert torch.allclose(a, pool_to_grid(full, lay.grid, grid), atol=1e-6)
        f = lay.grid[0] // grid[0]  # tap cell (1, 2) from tap cell (2, 0): mean over its queries of the keys' sum
        hs, ws = lay.grid
        q = [(1 * f + i) * ws + 2 * f + j for i in range(f) for j in range(f)]
        kk = [(2 * f + i) * ws + 0 * f + j for i in range(f) for j in range(f)]
        assert torch.allclose(a[1 * 4 + 2, 2 * 4 + 0], full[q][:, kk].sum(1).mean(), atol=1e-6)
    assert [m.fused_attn for _, m in bb.attention_modules()] == fused  # restored
    assert torch.allclose(bb(pixels[None]), tokens, atol=1e-5)
    r = att.rollout()
    assert r.shape == (16, 16) and torch.allclose(r.sum(-1), torch.ones(16), atol=1e-5)
    maps = att.query_maps((1, 2))
    assert set(maps) == {*names, "rollout"} and all(m.shape == grid for m in maps.values())


def test_mambavision_attention_is_captured_and_placed_through_its_padded_windows():
    """The non-fused path's probabilities, @ v and through proj, reproduce the fused module's output; on a 3x3 grid
    with 2x2 windows (padded to 4x4) each real token attends over the real tokens of its window only."""
    from toolkit.interpret.attention import capture_attention, stage_attention

    torch.manual_seed(0)
    bb = create_backbone("mambavision-test", img_size=48).eval()
    pixels = torch.randn(3, 48, 48)
    ((name, attn),) = bb.attention_modules()
    seen = {}
    hooks = [attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o)),
             attn.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))]
    with torch.no_grad():
        tokens = bb(pixels[None])
        fused_out = seen["out"]
        with capture_attention(bb) as captured:
            assert torch.allclose(bb(pixels[None]), tokens, atol=1e-5)
    for h in hooks:
        h.remove()
    assert attn.fused_attn  # restored
    probs = captured[name]  # (windows, heads, n, n)
    b, n, _ = seen["qkv"].shape
    v = seen["qkv"].view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((probs @ v).transpose(1, 2).reshape(b, n, -1))
    assert torch.allclose(out, fused_out, atol=1e-5)

    lay = bb.attention_layouts((48, 48))[name]
    assert lay.grid == bb.grid((48, 48)) == (3, 3) and lay.index.shape == (4, 4)
    full = stage_attention(probs, lay)
    assert torch.allclose(full.sum(-1), torch.ones(9), atol=1e-5)
    r, c = torch.arange(3).repeat_interleave(3), torch.arange(3).repeat(3)
    window = (r // 2) * 2 + c // 2  # window of each real token on the 4x4 padded grid
    assert torch.equal(full > 0, window[:, None] == window[None])
    k, real = 1, [2, 5]  # the top-right window: real tokens (0, 2) and (1, 2), local 0 and 2; local 1, 3 are padding
    a = probs[k].float().mean(0)[[0, 2]][:, [0, 2]]
    assert torch.allclose(full[real][:, real], a / a.sum(-1, keepdim=True), atol=1e-6)
    att = backbone_attention(bb, pixels)
    assert list(att.layers) == [name] and not att.skipped and torch.allclose(att.layers[name], full, atol=1e-6)


def _random_attention(windows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(windows, 2, n, n, generator=g).softmax(-1)  # (windows, heads, n, n)


def test_place_on_grid_normalises_rows_once_as_the_placement_did_twice():
    """Partitioned maps (MaxViT's windows pooled 4x onto the tap grid, MambaVision's padded windows) are placed as
    when their rows were renormalised again after pooling; a global map (CLS dropped) is renormalised."""
    from toolkit.interpret.attention import place_on_grid, pool_to_grid, stage_attention

    maxvit = create_backbone("maxvit-test").attention_layouts()
    mamba = create_backbone("mambavision-test", img_size=48).attention_layouts((48, 48))
    cases = [(maxvit, (4, 4), "stages.0.blocks.0.attn_grid.attn"),  # 16x16 stage grid, no padding
             (mamba, (3, 3), next(iter(mamba)))]  # 3x3 grid in 2x2 windows: padding tokens
    for layouts, grid, name in cases:
        lay = layouts[name]
        probs = _random_attention(*lay.index.shape, seed=0)
        twice = pool_to_grid(stage_attention(probs, lay), lay.grid, grid)
        twice = twice / twice.sum(-1, keepdim=True).clamp_min(1e-12)
        placed = place_on_grid({name: probs}, grid, layouts).layers[name]
        assert placed.shape == twice.shape == (grid[0] * grid[1],) * 2
        assert torch.allclose(placed, twice, rtol=0, atol=1e-6)
    probs = _random_attention(1, 1 + 16, seed=1)  # one prefix token before a 4x4 grid
    a = place_on_grid({"blocks.0.attn": probs}, (4, 4)).layers["blocks.0.attn"]
    kept = probs[0].mean(0)[1:, 1:]
    assert torch.allclose(a, kept / kept.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    assert torch.allclose(a.sum(-1), torch.ones(16), atol=1e-6)


@pytest.mark.parametrize("name", RUN_BACKBONES)
@pytest.mark.parametrize("source", ["answer", "prompt"])
def test_lm_attention_on_image_positions_sums_to_at_most_one(vlms, name, source):
    vlm = vlms[name]
    _, tokens, grid = _tokens(vlm)
    impl = vlm.lm.config._attn_implementation
    att = lm_image_attention(vlm, tokens, GROUNDING_PROMPT.format(expression="the red square"),
                             "[0.10, 0.20, 0.30, 0.40]", grid, source=source)
    assert att.maps.shape == (1, 2, *grid) and att.mean().shape == grid
    totals = att.maps.sum((-1, -2))  # (layers, heads)
    assert (att.maps >= 0).all() and (totals <= 1 + 1e-5).all() and (totals > 0).all()
    assert vlm.lm.config._attn_implementation == impl  # eager only for the call


@needs_scan_kernels
def test_scan_paths_per_direction_and_merged(vlms):
    bb = vlms["vmamba-test"].backbone
    pixels, _, grid = _tokens(vlms["vmamba-test"])
    paths, skipped = scan_paths(bb, pixels, point=(0.2, 0.8))
    assert list(paths) == [name for name, _ in bb.scan_modules()] and not skipped
    assert next(reversed(paths.values())).grid == grid  # the last scan module is the tap's block
    for p in paths.values():
        assert p.per_direction.shape == (4, *p.grid) and p.merged.shape == p.grid
        assert torch.allclose(p.merged, p.per_direction.sum(0), rtol=1e-4, atol=1e-6)
        assert p.query == (int(0.2 * p.grid[0]), min(int(0.8 * p.grid[1]), p.grid[1] - 1))


def test_families_without_scan_modules_have_no_scan_paths(vlms):
    paths, skipped = scan_paths(vlms["vit-test"].backbone, _tokens(vlms["vit-test"])[0])
    assert paths == {} and skipped == {}


def test_analyze_queries_the_box_centre_and_scores_iou(vlms, monkeypatch):
    vlm = vlms["vit-test"]
    monkeypatch.setattr(vlm, "generate", lambda *a, **k: ["[0.50, 0.50, 1.00, 1.00]"])
    img = scene_image((64, 32))  # letterboxed into 32x32: the image fills rows 8..24 of the input
    a = analyze(vlm, img, "the red square", gt_box=(32, 16, 64, 32), saliency=True)
    assert a.grounding.valid and a.grounding.box_pixels == pytest.approx((32, 16, 64, 32))
    assert a.iou == pytest.approx(1.0) and a.query == (2, 3)  # box (clipped to the image) centre: y 0.625, x 0.75
    assert a.backbone_map()[0] == "attention rollout" and a.backbone_map()[1].shape == a.grid
    assert a.saliency.shape == (32, 32) and (a.saliency >= 0).all() and a.saliency.sum() > 0
    assert analyze(vlm, img, "the red square", query=(0, 1)).query == (0, 1)
    with pytest.raises(ValueError, match="outside"):
        analyze(vlm, img, "the red square", query=(4, 0))


def test_compare_runs_every_family_and_tabulates(vlms):
    res = compare(vlms, scene_image(), "the red square", gt_box=(4, 4, 18, 18))
    assert list(res) == list(RUN_BACKBONES)
    for a in res.values():
        assert a.similarity.mean.shape == a.grid and a.lm_attention.mean().shape == a.grid
        assert a.iou == (float(box_iou(torch.tensor(a.grounding.box_pixels), torch.tensor([4., 4., 18., 18.])))
                         if a.grounding.valid else 0.0)
    names = [name for name, _ in vlms["maxvit-test"].backbone.attention_modules()]  # block and grid attention
    assert list(res["maxvit-test"].attention) == [*names, "rollout"] and res["maxvit-test"].scan_paths == {}
    table = results_table(res)
    assert list(table.backbone) == list(RUN_BACKBONES) and list(table.columns) == ["backbone", "answer", "valid",
                                                                                    "box", "iou", "backbone_map"]
    maps = dict(zip(table.backbone, table.backbone_map))
    assert maps["maxvit-test"] == maps["vit-test"] == "attention rollout"
    # a hybrid's map follows its last mixer before the tap: MambaVision's stages end in attention blocks
    assert {n: tap_mixer(create_backbone(n)) for n in ("vit-test", "vmamba-test", "mambavision-test")} == {
        "vit-test": "attention", "vmamba-test": "scan", "mambavision-test": "attention"}
    att, scan = res["vit-test"], res[RUN_BACKBONES[-1]]
    hybrid = dataclasses.replace(att, scan_paths=scan.scan_paths)
    assert hybrid.backbone_map()[0] == "attention rollout"
    if scan.scan_paths:
        assert dataclasses.replace(hybrid, tap_mixer="scan").backbone_map()[0].startswith("scan path")
        assert dataclasses.replace(hybrid, tap_mixer="attention", attention={}).backbone_map()[0].startswith("scan")
    assert res["maxvit-test"].no_map_reason() is None and res["vit-test"].no_map_reason() is None
    # a family without a map says why, in the table: the distinct reasons, each with its module count
    why = {"stages.0.blocks.0.attn_block.attn": "windowed or off-grid attention: 4 row(s)",
           "stages.0.blocks.0.attn_grid.attn": "windowed or off-grid attention: 4 row(s)"}
    bare = dataclasses.replace(res["maxvit-test"], attention={}, skipped=why)
    assert bare.no_map_reason() == "windowed or off-grid attention (2 modules)"
    assert results_table({"maxvit-test": bare}).backbone_map[0] == bare.no_map_reason()


def _bomb_png(side: int = 20000) -> bytes:
    """A PNG header claiming ``side x side`` pixels (no pixel data): what a decompression bomb looks like to PIL."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


@pytest.mark.parametrize("image,expression,match", [
    (scene_image(), "", "expression is empty"),
    (scene_image(), "x" * 10000, "10000 characters"),
    (None, "the red square", "no image given"),
    (42, "the red square", "not an image"),
    ("no/such/file.png", "the red square", "does not exist"),
    (b"this is not an image", "the red square", "not a readable image"),
    (_bomb_png(), "the red square", "too large to decode safely"),
    (np.zeros((4, 4, 2)), "the red square", "image array"),
])
def test_bad_input_raises_a_clear_value_error(vlms, image, expression, match):
    with pytest.raises(ValueError, match=match):
        compare(vlms, image, expression)


def test_no_backbone_selected_is_a_clear_error():
    with pytest.raises(ValueError, match="no backbone selected"):
        compare({}, scene_image(), "the red square")


def test_load_image_caps_sizes_and_reads_every_form(tmp_path):
    big = load_image(np.zeros((300, 5000), dtype=np.uint8), max_side=1000)
    assert big.size == (1000, 60) and big.mode == "RGB"
    assert load_image(np.ones((8, 8, 3)), max_side=16).getpixel((0, 0)) == (255, 255, 255)
    buf = io.BytesIO()
    scene_image().save(buf, format="PNG")
    (tmp_path / "s.png").write_bytes(buf.getvalue())
    for source in (buf.getvalue(), tmp_path / "s.png", str(tmp_path / "s.png"), scene_image()):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(scene_image()))


def test_pixel_boxes_parse_or_explain():
    assert parse_pixel_box(" ") is None and parse_pixel_box("[4, 4, 18.5, 18]") == (4, 4, 18.5, 18)
    for bad in ("1, 2, 3", "a, b, c, d", "10, 10, 5, 20"):
        with pytest.raises(ValueError, match="ground-truth box"):
            parse_pixel_box(bad)


def test_example_images_come_from_the_run(tiny_run, tmp_path):
    (ex,) = example_images(tiny_run)
    assert ex.expression == "the red square" and ex.gt_box == (4, 4, 18, 18) and Image.open(ex.image).size == (48, 32)
    assert example_images(tmp_path) == []


def test_phone_photos_come_upright_and_messages_name_no_server_folder(tmp_path, vlms):
    """EXIF orientation 6 (the camera held upright, the sensor sideways): stored 40x20, shown 20x40."""
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    img.paste((20, 20, 200), (0, 0, 10, 20))  # the stored left edge is blue
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    up = load_image(tmp_path / "phone.jpg")
    assert up.size == (20, 40) and up.getpixel((10, 2))[2] > 150  # turned 90 degrees clockwise: blue on top
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError) as e:
        load_image(tmp_path / "upload" / "broken.png")
    assert "`broken.png` is not a readable image" in str(e.value) and str(tmp_path) not in str(e.value)
    assert "Error" not in str(e.value)  # no exception class names
    with pytest.raises(ValueError, match="leaves the 48x32 image"):
        analyze(vlms["vit-test"], scene_image(), "the red square", gt_box=(4, 4, 60, 18))
