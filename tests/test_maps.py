"""toolkit.interpret maps, scores and `vlmtk analyze`: every map type on every tiny family (or its reason), each map
against the computation it wraps, scores on hand-computed cases, deletion bookkeeping, the batch command end to end."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import RUN_BACKBONES, TINY_LM, scan_kernels_available, scene_image, tiny_vlm
from PIL import Image

from toolkit.cli import main
from toolkit.geometry import Geometry, apply_geometry
from toolkit.interpret import (DELETION_FRACTIONS, MAP_TYPES, MapUnavailable, backbone_attention, build_context,
                               compute_map, deletion_curve, deletion_curves, lm_image_attention, map_options,
                               mass_in_box, pixel_saliency, pointing_game, random_map, text_image_similarity,
                               token_integrated_gradients)
from toolkit.interpret.attention import rollout
from toolkit.interpret.maps import MapSpec, parse_map_spec, split_map_specs
from toolkit.interpret.scores import curve_auc
from toolkit.registry import create_backbone
from toolkit.vlm import VLM, VLMConfig
from toolkit_kernels import selective_scan_ref
from toolkit.viz.overlays import cell_box, map_on_original

# + a family whose scans are 1-D and attention is windowed, both over padded windows, and one whose windowed and
# global blocks alternate
BACKBONES = RUN_BACKBONES + ("mambavision-test", "vitdet-test")
# (map type, backbone) -> a phrase of the reason it has no map; every other pair must give one
UNAVAILABLE = {("backbone_attention", "vmamba-test"): "no attention modules",
               ("scan_path", "vit-test"): "no scan modules", ("scan_path", "maxvit-test"): "no scan modules",
               ("scan_path", "vitdet-test"): "no scan modules"}
SCENE = scene_image((64, 32))
needs_scan_kernels = pytest.mark.skipif(not scan_kernels_available(),
                                        reason="toolkit_kernels.ss2d_scan_attention_fn missing")


@pytest.fixture(scope="module")
def contexts(tiny_tokenizer):
    """One context per family on a 64x32 scene, letterboxed: the middle half of the input's rows is the image."""
    return {name: build_context(tiny_vlm(tiny_tokenizer, name), SCENE, "the red square") for name in BACKBONES}


# ------------------------------------------------------------------------------------ the registry


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", list(MAP_TYPES))
def test_every_map_type_on_every_family_gives_a_map_or_a_reason(contexts, name, backbone):
    ctx = contexts[backbone]
    why = MAP_TYPES[name].available(ctx.vlm)
    assert why == MAP_TYPES[name].available(ctx)  # the blank-image probe says what a real image says
    if (name, backbone) in UNAVAILABLE:
        assert UNAVAILABLE[name, backbone] in why
        with pytest.raises(MapUnavailable, match=UNAVAILABLE[name, backbone]):
            compute_map(name, ctx)
        return
    assert why is None
    m = compute_map(name, ctx)
    assert m.shape == ctx.grid and m.dtype == torch.float32 and torch.isfinite(m).all() and m.abs().sum() > 0
    if name != "similarity":  # the signed cosine is the one map kept signed
        assert (m >= 0).all()
    on_image = map_on_original(m, ctx.geometry, ctx.image.size)
    assert on_image.shape == (ctx.image.height, ctx.image.width) and np.isfinite(on_image).all()


def test_options_are_declared_resolved_per_model_and_checked(contexts):
    ctx = contexts["vit-test"]
    opts = map_options("lm_attention", ctx.vlm)  # the tiny LM: 1 layer, 2 heads
    assert opts["layer"].choices == ("mean", "rollout", 0) and opts["head"].choices == ("mean", 0, 1)
    assert map_options("backbone_attention", ctx.vlm)["module"].choices == ("rollout", "blocks.0.attn",
                                                                            "blocks.1.attn")
    assert {n: {k: o.default for k, o in t.options.items()} for n, t in MAP_TYPES.items()}["integrated_gradients"] \
        == {"baseline": "zeros", "n_steps": 16}
    with pytest.raises(ValueError, match="unknown map type `nope`; known: similarity, lm_attention, "):
        compute_map("nope", ctx)
    with pytest.raises(ValueError, match="has no option"):
        compute_map("saliency", ctx, layer=0)
    with pytest.raises(ValueError, match="layer=5 is not one of: 'mean', 'rollout', 0"):
        compute_map("lm_attention", ctx, layer=5)
    with pytest.raises(ValueError, match="contextual=1 is not one of"):  # 1 is not taken for True
        compute_map("similarity", ctx, contextual=1)
    with pytest.raises(ValueError, match="outside the 4x4 token grid"):
        compute_map("backbone_attention", ctx, query=(4, 0))
    m = compute_map("similarity", ctx.vlm, SCENE, "the red square")  # a VLM: the context is built for it
    assert torch.allclose(m, compute_map("similarity", ctx))


# ------------------------------------------------------------------------------------ each map = what it wraps


def test_similarity_map_is_text_image_similarity(contexts):
    ctx = contexts["vit-test"]
    for contextual in (False, True):
        sim = text_image_similarity(ctx.vlm, ctx.tokens, ctx.expression, ctx.grid, contextual=contextual)
        assert torch.allclose(compute_map("similarity", ctx, contextual=contextual), sim.mean)
        assert torch.allclose(compute_map("similarity", ctx, token=1, contextual=contextual), sim.maps[1])


def test_lm_attention_map_is_lm_image_attention_and_rolls_out(contexts):
    ctx = contexts["vit-test"]
    att = lm_image_attention(ctx.vlm, ctx.tokens, ctx.prompt, ctx.answer, ctx.grid)
    assert torch.allclose(compute_map("lm_attention", ctx), att.mean())
    assert torch.allclose(compute_map("lm_attention", ctx, layer=0, head=1), att.maps[0, 1])
    # one layer: the rollout (A + I) / 2 from answer rows onto image positions (never the row itself) is A / 2
    assert torch.allclose(compute_map("lm_attention", ctx, layer="rollout"), att.mean() / 2, atol=1e-6)
    with pytest.raises(ValueError, match="head='mean'"):
        compute_map("lm_attention", ctx, layer="rollout", head=0)


def test_lm_attention_per_answer_token_is_the_row_that_wrote_it(contexts):
    """Token i's map is the eager attention row of the position that predicts the answer's token i (the
    probabilities behind the logits the default kernel gives), on the image positions; the answer's tokens, EOS
    last, are the menu, and their maps average to the "all" map."""
    ctx = contexts["vit-test"]  # the tiny LM: 1 layer, 2 heads
    vlm, tok = ctx.vlm, ctx.vlm.tokenizer
    ids = tok(ctx.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    menu = map_options("lm_attention", vlm)["token"].menu(ctx)
    assert len(ids) > 2 and menu == {i: f"{i}: {t}" for i, t in enumerate(tok.convert_ids_to_tokens(ids))}
    b = vlm.assemble(ctx.tokens, [ctx.prompt], [ctx.answer])
    impl = vlm.lm.config._attn_implementation
    with torch.no_grad():
        logits = vlm.lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask).logits
        vlm.lm.set_attn_implementation("eager")
        try:
            out = vlm.lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask, output_attentions=True)
        finally:
            vlm.lm.set_attn_implementation(impl)
    assert torch.allclose(out.logits, logits, atol=1e-5)
    (att,) = out.attentions  # (1, heads, T, T)
    labelled = (b.labels[0] != -100).nonzero()[:, 0]  # where the answer's tokens and EOS sit
    assert b.input_ids[0, labelled].tolist() == ids
    for i, p in enumerate(labelled.tolist()):
        for head in (0, 1):
            torch.testing.assert_close(compute_map("lm_attention", ctx, token=i, layer=0, head=head),
                                       att[0, head, p - 1, b.image_mask[0]].reshape(ctx.grid).float())
    per_token = torch.stack([compute_map("lm_attention", ctx, token=i) for i in menu])
    torch.testing.assert_close(per_token.mean(0), compute_map("lm_attention", ctx))
    torch.testing.assert_close(per_token[0], compute_map("lm_attention", ctx, source="prompt"))
    torch.testing.assert_close(compute_map("lm_attention", ctx, token=-1), per_token[-1])
    rolled = torch.stack([compute_map("lm_attention", ctx, layer="rollout", token=i) for i in menu])
    torch.testing.assert_close(rolled.mean(0), compute_map("lm_attention", ctx, layer="rollout"))
    with pytest.raises(ValueError, match=f"token {len(ids)} is outside the answer's {len(ids)} tokens"):
        compute_map("lm_attention", ctx, token=len(ids))
    with pytest.raises(ValueError, match="use token='all'"):
        compute_map("lm_attention", ctx, token=1, source="prompt")
    with pytest.raises(ValueError, match="token='first' is not one of: 'all', int"):
        compute_map("lm_attention", ctx, token="first")


def test_backbone_attention_map_is_the_captured_attention(contexts):
    ctx = contexts["vit-test"]
    captured = backbone_attention(ctx.vlm.backbone, ctx.pixels)
    for module in ("blocks.0.attn", "blocks.1.attn", "rollout"):
        assert torch.allclose(compute_map("backbone_attention", ctx, module=module, query=(1, 2)),
                              captured.query_maps((1, 2))[module])
    assert torch.allclose(compute_map("backbone_attention", ctx), captured.query_maps(ctx.query)["rollout"])


def _own_capture(backbone, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every attention module's probabilities ``(windows, heads, n, n)`` of one forward, hooked here (not by the
    toolkit's capture) on the non-fused path's ``attn_drop``."""
    store, handles = {}, []
    for name, mod in backbone.attention_modules():
        mod.fused_attn = False
        handles.append(mod.attn_drop.register_forward_hook(
            lambda m, i, o, name=name: store.__setitem__(name, i[0].detach())))
    with torch.no_grad():
        backbone(pixels[None])
    for (_, mod), h in zip(backbone.attention_modules(), handles):
        mod.fused_attn = True
        h.remove()
    return store


def test_vitdet_windowed_blocks_map_their_padded_window(contexts):
    """ViTDet-test: a 4x4 grid, windows of 3 padded to 6x6 (2x2 windows, row-major), block 2 global. A windowed
    block's map from a query is non-zero exactly on the query's window cut at the grid's edge, and is its row of
    the captured probabilities, heads averaged, renormalised over the real tokens; the global block's map is its
    row as captured; the rollout of the windowed blocks alone stays inside the window."""
    ctx = contexts["vitdet-test"]
    assert not ctx.attention.skipped and list(ctx.attention.layers) == [f"blocks.{i}.attn" for i in range(3)]
    probs = _own_capture(ctx.vlm.backbone, ctx.pixels)
    ws, cells = 3, torch.arange(4)
    for r, c in ((1, 1), (1, 3), (3, 0), (3, 3)):
        (wr, lr), (wc, lc) = divmod(r, ws), divmod(c, ws)
        window = ((cells // ws == wr)[:, None] & (cells // ws == wc)[None])  # (4, 4)
        row = torch.zeros(6, 6)
        row[wr * ws:(wr + 1) * ws, wc * ws:(wc + 1) * ws] = probs["blocks.0.attn"][wr * 2 + wc].float().mean(0)[
            lr * ws + lc].reshape(ws, ws)
        row = row[:4, :4]  # the padding goes, and its share with it
        m = compute_map("backbone_attention", ctx, module="blocks.0.attn", query=(r, c))
        assert torch.equal(m > 0, window)
        torch.testing.assert_close(m, row / row.sum())
        windowed = rollout([ctx.attention.layers[f"blocks.{i}.attn"] for i in (0, 1)])[r * 4 + c].reshape(4, 4)
        assert torch.equal(windowed > 0, window)
        torch.testing.assert_close(compute_map("backbone_attention", ctx, module="blocks.2.attn", query=(r, c)),
                                   probs["blocks.2.attn"][0].float().mean(0)[r * 4 + c].reshape(4, 4))
    assert compute_map("backbone_attention", ctx).shape == ctx.grid  # the rollout over all three blocks


def test_vitdet_layouts_follow_the_grid_of_a_non_square_input():
    """At 24x40 px (a 3x5 grid) the windows of 3 pad the columns only: two windows, the second with a padding
    column; every windowed block is placed, none skipped."""
    torch.manual_seed(0)
    bb = create_backbone("vitdet-test", img_size=(24, 40)).eval()
    lay = bb.attention_layouts()["blocks.0.attn"]
    assert set(bb.attention_layouts()) == {"blocks.0.attn", "blocks.1.attn"} and lay.grid == (3, 5)
    assert lay.index.tolist() == [[0, 1, 2, 5, 6, 7, 10, 11, 12], [3, 4, -1, 8, 9, -1, 13, 14, -1]]
    att = backbone_attention(bb, torch.randn(3, 24, 40))
    assert not att.skipped and list(att.layers) == [f"blocks.{i}.attn" for i in range(3)]
    assert torch.equal(att.layers["blocks.1.attn"] > 0, (torch.arange(15) % 5 // 3)[:, None] == (torch.arange(15)
                                                                                                 % 5 // 3)[None])


@needs_scan_kernels
def test_scan_path_map_is_the_scans_own_jacobian(contexts):
    """The tap block's map from a query equals |row of d scan output / d scan input| (the brute-force Jacobian of
    tests/test_kernels.py), channel-averaged, per direction and merged."""
    from test_kernels import _brute_force_maps

    ctx = contexts["vmamba-test"]
    name, mod = list(ctx.vlm.backbone.scan_modules())[-1]
    s = mod.ssm_inputs(ctx.scan_inputs[name][:1])
    h, w = s["delta"].shape[-2:]
    assert (h, w) == ctx.grid
    brute = _brute_force_maps([s[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")], h, w)
    row = brute.mean(2)[0, :, 0 * w + 1].reshape(4, h, w).float()  # (K, h, w) from query (0, 1)
    tol = dict(rtol=1e-4, atol=1e-4 * float(row.abs().max()))
    for k in range(4):
        torch.testing.assert_close(compute_map("scan_path", ctx, direction=k, query=(0, 1)), row[k].abs(), **tol)
    torch.testing.assert_close(compute_map("scan_path", ctx, query=(0, 1)), row.sum(0).abs(), **tol)
    first = next(ctx.vlm.backbone.scan_modules())[0]  # an earlier block's finer grid, averaged onto the tap grid
    assert compute_map("scan_path", ctx, module=first).shape == ctx.grid


@needs_scan_kernels
def test_mambavision_scan_path_is_its_1d_scans_jacobian_through_the_windows(tiny_tokenizer, monkeypatch):
    """MambaVision-test at 48 px: a 3x3 stage grid (the tap's) in 2x2 windows padded to 4x4, each mixer scanning
    one window's 4 tokens row-major. The tap mixer's map from a query is |row of d scan output / d scan input|
    (torch.autograd through the sequential definition, D skip off), channel-averaged, over the query's window:
    its real tokens at their places, zero elsewhere. One direction, so it is also the merged map."""
    torch.manual_seed(0)
    vlm = VLM.build(VLMConfig(backbone="mambavision-test", lm=TINY_LM, backbone_overrides=dict(img_size=48)),
                    tiny_tokenizer).eval()
    name, mod = next(vlm.backbone.scan_modules())
    with torch.no_grad():  # longer steps and stronger B, C than the initialisation's, for a map far from zero
        mod.dt_proj.bias.fill_(0.5)
        mod.x_proj.weight.normal_(0, 0.3)
    ctx = build_context(vlm, SCENE, "the red square")
    assert ctx.grid == (3, 3) and ctx.scan_inputs[name].shape[:2] == (4, 4)  # (windows, tokens, C)
    assert map_options("scan_path", vlm)["direction"].choices == ("merged", 0)
    for r, c in ((1, 2), (0, 0), (2, 1)):
        (wr, lr), (wc, lc) = divmod(r, 2), divmod(c, 2)
        s = mod.ssm_inputs(ctx.scan_inputs[name][wr * 2 + wc][None])  # the query's window
        rest = [s[k].detach().double() for k in ("delta", "A", "B", "C")]
        scan = lambda u: selective_scan_ref(u, *rest, None, s["delta_bias"].double(), delta_softplus=True)  # noqa
        J = torch.autograd.functional.jacobian(scan, s["u"].detach().double())[0, :, lr * 2 + lc, 0]  # (D, D, 4)
        row = torch.diagonal(J).mean(-1)  # (4,): channel d's output from channel d's inputs, averaged
        want = torch.zeros(4, 4)
        want[wr * 2:wr * 2 + 2, wc * 2:wc * 2 + 2] = row.reshape(2, 2).abs().float()
        want = want[:3, :3]  # the padding column and row feed the scan but are no place of the image
        assert want.sum() > 1e-3 * row.abs().max()
        tol = dict(rtol=1e-4, atol=1e-5 * float(want.max()))
        for direction in (0, "merged"):
            torch.testing.assert_close(compute_map("scan_path", ctx, direction=direction, query=(r, c)), want, **tol)
    with pytest.raises(ValueError, match="direction=1 is not one of: 'merged', 0"):
        compute_map("scan_path", ctx, direction=1)
    monkeypatch.setattr(type(vlm.backbone), "scan_layouts", lambda self, img_size=None: {})
    assert "scan inputs are not 2-D" in MAP_TYPES["scan_path"].available(ctx)  # a 1-D scan is placed by its layout


@pytest.mark.parametrize("baseline", ["zeros", "mean"])
def test_integrated_gradients_are_complete(contexts, baseline):
    ctx = contexts["vit-test"]
    vlm = ctx.vlm
    ig = token_integrated_gradients(vlm, ctx.tokens, ctx.prompt, ctx.answer, baseline=baseline)
    gap = ig.f_input - ig.f_baseline
    assert abs(gap) > 1e-3 and abs(float(ig.per_token.sum()) - gap) <= 1e-2 * abs(gap)
    # f(x) from the LM's full logits: the answer's tokens (EOS left out), teacher-forced
    with torch.no_grad():
        b = vlm.assemble(ctx.tokens, [ctx.prompt], [ctx.answer])
        logp = vlm.lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask).logits[0, :-1].log_softmax(-1)
        labels = b.labels[0, 1:]
        keep = (labels != -100).nonzero()[:-1, 0]
    assert ig.f_input == pytest.approx(float(logp[keep, labels[keep]].sum()), rel=1e-4)
    if baseline == "zeros":
        assert torch.equal(compute_map("integrated_gradients", ctx), ig.per_token.clamp(min=0).reshape(ctx.grid))


def test_saliency_map_is_pixel_saliency_averaged_per_cell(contexts):
    ctx = contexts["vit-test"]  # 32 px input, 4x4 grid: 8x8 pixels a cell
    sal = pixel_saliency(ctx.vlm, ctx.pixels, ctx.prompt, ctx.answer)
    assert torch.allclose(compute_map("saliency", ctx), sal.reshape(4, 8, 4, 8).mean((1, 3)), atol=1e-7)


def test_a_peak_in_one_cell_lands_in_that_cells_box_on_a_letterboxed_image(contexts):
    ctx = contexts["vit-test"]  # grid rows 0 and 3 are padding
    m = compute_map("backbone_attention", ctx)
    xs, ys = ctx.geometry.cell_edges(ctx.grid)
    assert list(np.diff(ys) > 0) == [False, True, True, False]
    visible = torch.tensor(np.outer(np.diff(ys) > 0, np.diff(xs) > 0))
    r, c = divmod(int(torch.where(visible, m, 0).argmax()), ctx.grid[1])
    peak = torch.zeros(ctx.grid)
    peak[r, c] = m[r, c]
    box = cell_box((r, c), ctx.grid, ctx.geometry)
    on = map_on_original(peak, ctx.geometry, ctx.image.size)  # (32, 64), pixel centres at +0.5
    yy, xx = np.nonzero(on > 0)
    assert len(xx) == (box[2] - box[0]) * (box[3] - box[1])
    assert (box[0] <= xx + 0.5).all() and (xx + 0.5 <= box[2]).all()
    assert (box[1] <= yy + 0.5).all() and (yy + 0.5 <= box[3]).all()
    assert mass_in_box(peak, box, ctx.geometry) == 1.0 and pointing_game(peak, box, ctx.geometry)


# ------------------------------------------------------------------------------------ scores by hand

SQUARE = Geometry(32, 32, 32, 32, 1.0, 1.0, 0.0, 0.0)  # no resize: a 4x4 grid has 8 px cells


def test_mass_in_box_by_hand():
    one = torch.zeros(4, 4)
    one[0, 0] = 3.0
    assert mass_in_box(one, (0, 0, 8, 8), SQUARE) == 1.0 and mass_in_box(one, (8, 0, 32, 32), SQUARE) == 0.0
    flat = torch.ones(4, 4)
    assert mass_in_box(flat, (0, 0, 16, 16), SQUARE) == pytest.approx(0.25)
    assert mass_in_box(flat, (4, 4, 12, 12), SQUARE) == pytest.approx(64 / 1024)  # parts of four cells
    signed = -torch.ones(4, 4)
    signed[3, 3] = 2.0
    assert mass_in_box(signed, (24, 24, 32, 32), SQUARE) == 1.0  # negative cells weigh nothing
    assert np.isnan(mass_in_box(-flat, (0, 0, 32, 32), SQUARE))
    _, lb = apply_geometry(Image.new("RGB", (64, 32)), (32, 32), "letterbox")  # image at input rows 8..24
    padded = torch.zeros(4, 4)
    padded[0] = 100.0  # all in the padding row above the image
    padded[1, 0] = 1.0  # input rows 8..16, cols 0..8 = original (0, 0, 16, 16)
    assert mass_in_box(padded, (0, 0, 16, 16), lb) == 1.0
    assert mass_in_box(torch.ones(4, 4), (0, 0, 32, 32), lb) == pytest.approx(0.5)  # half the image's width


def test_pointing_game_by_hand():
    m = torch.zeros(4, 4)
    m[1, 2] = 1.0  # centre (20, 12)
    assert pointing_game(m, (16, 8, 24, 16), SQUARE) and pointing_game(m, (0, 0, 20, 12), SQUARE)  # edges count
    assert not pointing_game(m, (0, 0, 19.9, 32), SQUARE)
    assert not pointing_game(torch.ones(4, 4), (0, 0, 32, 32), SQUARE)  # flat: points nowhere
    _, lb = apply_geometry(Image.new("RGB", (64, 32)), (32, 32), "letterbox")
    m = torch.zeros(4, 4)
    m[0, 0] = 2.0  # padding
    m[1, 0] = 1.0
    assert not pointing_game(m, (0, 0, 64, 32), lb)  # the maximum is off the image


def test_curve_auc_by_hand():
    assert curve_auc((0, 0.5), (1, 0)) == pytest.approx(0.5)
    assert curve_auc(DELETION_FRACTIONS, [1.0] * len(DELETION_FRACTIONS)) == pytest.approx(1.0)
    assert curve_auc((0, 0.1, 0.5), (1, 0.5, 0.5)) == pytest.approx((0.1 * 0.75 + 0.4 * 0.5) / 0.5)


# ------------------------------------------------------------------------------------ deletion


def test_deletion_replaces_the_top_ranked_tokens_in_one_generate_call(contexts, monkeypatch):
    ctx = contexts["vit-test"]  # 16 tokens: fractions delete 0, 1, 2, 3, 5, 8 of them
    calls = []

    def fake_generate(tokens, prompts, max_new_tokens):
        calls.append((tokens.clone(), list(prompts)))
        # the whole image while nothing is deleted, then no box at all
        return ["[0.00, 0.25, 1.00, 0.75]" if torch.equal(t, ctx.tokens[0]) else "no box" for t in tokens]

    monkeypatch.setattr(ctx.vlm, "generate", fake_generate)
    ramp = torch.arange(16.0).reshape(4, 4)  # ranks cell 15 first
    maps = {"ramp": ramp, "random": random_map(ctx.grid, seed=3)}
    curves = deletion_curves(ctx, maps, gt_box=(0, 0, 64, 32))
    (tokens, prompts), = calls
    assert tokens.shape == (12, 16, ctx.tokens.shape[-1]) and prompts == [ctx.prompt] * 12
    mean = ctx.tokens[0].mean(0)
    for i, (name, m) in enumerate(maps.items()):
        assert curves[name].deleted == (0, 1, 2, 3, 5, 8)
        order = torch.argsort(m.flatten(), descending=True)
        for j, k in enumerate(curves[name].deleted):
            replaced = (tokens[i * 6 + j] == mean).all(-1)
            assert set(replaced.nonzero()[:, 0].tolist()) == set(order[:k].tolist())
        assert curves[name].ious == (1.0, 0, 0, 0, 0, 0) and curves[name].auc == pytest.approx(0.05)
    assert set(torch.argsort(ramp.flatten(), descending=True)[:8].tolist()) == set(range(8, 16))
    assert torch.equal(random_map((4, 4), 3), maps["random"]) and not torch.equal(random_map((4, 4), 4), maps["random"])


def test_deletion_curve_with_real_generation_keeps_its_bookkeeping(contexts):
    ctx = contexts["vmamba-test" if "vmamba-test" in contexts else "vit-test"]
    c = deletion_curve(ctx, compute_map("lm_attention", ctx), gt_box=(4, 4, 18, 18))
    n = ctx.grid[0] * ctx.grid[1]
    assert c.fractions == DELETION_FRACTIONS and c.deleted == tuple(round(f * n) for f in DELETION_FRACTIONS)
    assert list(c.deleted) == sorted(c.deleted) and len(c.answers) == len(c.ious) == 6
    assert all(0 <= v <= 1 for v in c.ious) and 0 <= c.auc <= 1
    assert c.ious[0] == pytest.approx(ctx.iou((4, 4, 18, 18)))  # nothing deleted: the context's own answer
    with pytest.raises(ValueError, match="fractions must increase"):
        deletion_curve(ctx, compute_map("lm_attention", ctx), (4, 4, 18, 18), fractions=(0.5, 0.1))
    with pytest.raises(ValueError, match="not on the"):
        deletion_curve(ctx, torch.zeros(3, 3), (4, 4, 18, 18))


# ------------------------------------------------------------------------------------ vlmtk analyze


@pytest.fixture
def world_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run whose evaluation cache names a tiny scene world (3 val scenes)."""
    from toolkit.data import SceneWorldConfig, build_world

    world = build_world(tmp_path_factory.mktemp("world"), SceneWorldConfig(
        image_size=32, n_train=1, n_val=3, n_test=0, n_cls_train=0, n_cls_val=0), progress=False)
    run = tmp_path_factory.mktemp("analyze") / "run"
    shutil.copytree(tiny_run, run)
    vdir = run / "vlms" / RUN_BACKBONES[0]
    (vdir / "eval_val_test.json").write_text(json.dumps(dict(grounding=[], vqa=[],
                                                             world_root=os.path.relpath(world.root, vdir))))
    return run


def _count_generate(monkeypatch) -> list:
    calls, original = [], VLM.generate
    monkeypatch.setattr(VLM, "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def test_analyze_command_scores_a_world_split_and_resumes(world_run, monkeypatch, capsys):
    args = ["analyze", "--run", str(world_run), "--split", "val", "--limit", "2", "--threads", "1"]
    calls = _count_generate(monkeypatch)
    main(args)
    out = world_run / "analysis" / "val"
    assert "## Scores" in capsys.readouterr().out
    for name in RUN_BACKBONES:
        lines = [json.loads(s) for s in (out / name / "samples.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and len({r["id"] for r in lines}) == 2 and not any(r["error"] for r in lines)
        have = {m for m in MAP_TYPES if (m, name) not in UNAVAILABLE}
        for r in lines:
            assert set(r["maps"]) == have and 0 <= r["iou"] <= 1 and 0 <= r["random"]["deletion_auc"] <= 1
            assert all(0 <= s["deletion_auc"] <= 1 and len(s["deletion_iou"]) == 6 for s in r["maps"].values())
            saved = np.load(out / name / "maps" / f"{r['id']}.npz")
            assert set(saved.files) == have and all(saved[m].ndim == 2 for m in have)
    assert len(calls) == 2 * 2 * len(RUN_BACKBONES)  # per sample: the answer, then every deletion row in one call
    summary = (out / "summary.md").read_text()
    assert "- maxvit-test: `scan_path`: " in summary and "- maxvit-test: `backbone_attention`" not in summary
    csv = (out / "summary.csv").read_text().splitlines()
    assert csv[0] == "backbone,task,split,metric,value,n,ci_low,ci_high"
    assert any(line.startswith("vit-test,backbone_attention,val,deletion_auc,") and ",2," in line for line in csv)
    calls.clear()
    main(args)  # everything is on disk: nothing is generated again, the summary is the same
    assert calls == [] and (out / "summary.md").read_text() == summary


def test_analyze_command_counts_bad_input_and_never_crashes_on_it(tiny_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    scene_image().save(tmp_path / "scene.png")
    lines = [dict(image="scene.png", expression="the red square", box=[4, 4, 18, 18]),
             dict(image="scene.png", expression="the blue circle"),  # no box: answered and mapped, not scored
             dict(image="gone.png", expression="the red square", box=[4, 4, 18, 18])]
    (tmp_path / "own.jsonl").write_text("\n".join([json.dumps(x) for x in lines] + [
        "{not json", json.dumps(dict(image="scene.png", expression="  ")), json.dumps(dict(image="scene.png"))]))
    main(["analyze", "--run", str(run), "--expressions", str(tmp_path / "own.jsonl"), "--maps",
          "similarity,scan_path", "--threads", "1"])
    out = run / "analysis" / "own"
    summary = (out / "summary.md").read_text()
    assert "## Input problems (4)" in summary and "own.jsonl:4: not valid JSON" in summary
    assert "own.jsonl:5: `expression`: the referring expression is empty" in summary
    assert "`gone.png` does not exist" in summary and "- vit-test: `scan_path`: the backbone has no scan modules" \
        in summary
    rows = [json.loads(s) for s in (out / "vit-test" / "samples.jsonl").read_text().splitlines()]
    assert [r["error"] is None for r in rows] == [True, True, False]
    assert rows[0]["maps"]["similarity"]["deletion_auc"] is not None and rows[1]["maps"]["similarity"] == dict(
        mass_in_box=None, pointing_game=None, deletion_auc=None, deletion_iou=None)
    capsys.readouterr()
    for args, message in ((["--run", str(run), "--maps", "similarity,nope"],
                           "unknown map type `nope`; known: similarity, lm_attention, backbone_attention"),
                          (["--run", str(tmp_path / "nowhere")], "no trained VLMs under"),
                          (["--run", str(run), "--images", str(tmp_path)], "--images goes with --expressions")):
        with pytest.raises(SystemExit) as e:
            main(["analyze", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("vlmtk analyze: error: ") and message in err


def test_analyze_command_maps_the_windowed_families(tiny_run, tiny_tokenizer, tmp_path):
    """`vlmtk analyze --maps` takes the availability from the registry: MambaVision's scan paths and ViTDet's
    windowed attention are mapped and scored; of the two, only ViTDet's missing scans are reported."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("mambavision-test", "vitdet-test"):
        tiny_vlm(tiny_tokenizer, name).save(run / "vlms" / name)
    scene_image().save(tmp_path / "scene.png")
    (tmp_path / "own.jsonl").write_text(json.dumps(dict(image="scene.png", expression="the red square",
                                                        box=[4, 4, 18, 18])))
    main(["analyze", "--run", str(run), "--expressions", str(tmp_path / "own.jsonl"), "--maps",
          "scan_path,backbone_attention", "--threads", "1"])
    out = run / "analysis" / "own"
    for name, have in (("mambavision-test", {"scan_path", "backbone_attention"}), ("vitdet-test",
                                                                                   {"backbone_attention"})):
        (row,) = [json.loads(s) for s in (out / name / "samples.jsonl").read_text().splitlines()]
        assert set(row["maps"]) == have and all(0 <= s["deletion_auc"] <= 1 for s in row["maps"].values())
    summary = (out / "summary.md").read_text()
    assert "- vitdet-test: `scan_path`: the backbone has no scan modules" in summary
    assert "- mambavision-test: `" not in summary and "- vitdet-test: `backbone_attention`" not in summary


def test_map_specs_name_options_and_label_their_scores(tiny_run, tmp_path, capsys, monkeypatch):
    """`--maps` takes options per map (``name:option=value``): each spec is computed with them, scored and saved under
    its own label beside the default map; a bad option or value is refused before any sample runs."""
    assert parse_map_spec("lm_attention:token=2:layer=0") == MapSpec("lm_attention", dict(token=2, layer=0))
    assert parse_map_spec("backbone_attention:query=(2, 3)").options == dict(query=(2, 3))
    assert parse_map_spec("similarity:contextual=true").label == "similarity:contextual=true"
    assert MapSpec("backbone_attention", dict(query=(2, 3))).label == "backbone_attention:query=(2,3)"
    assert split_map_specs("similarity, lm_attention:token=1,backbone_attention:query=(1, 2)") == [
        "similarity", "lm_attention:token=1", "backbone_attention:query=(1, 2)"]
    for bad, message in (("lm_attention:tokn=1", "has no option"), ("lm_attention:token", "is not option=value"),
                         ("nope:token=1", "unknown map type")):
        with pytest.raises(ValueError, match=message):
            parse_map_spec(bad)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=lambda d, names: [n for n in names if d.endswith("vlms") and n != "vit-test"])
    scene_image().save(tmp_path / "scene.png")
    (tmp_path / "own.jsonl").write_text(json.dumps(dict(image="scene.png", expression="the red square",
                                                        box=[4, 4, 18, 18])))
    # the command analyses this very model (a tiny VLM's backbone is drawn at random on every load)
    vlm = VLM.load(run / "vlms" / "vit-test").eval()
    monkeypatch.setattr("toolkit.interpret.batch.load_vlms", lambda *a, **k: {"vit-test": vlm})
    specs = "lm_attention,lm_attention:token=0,backbone_attention:module=rollout:query=(1,2)"
    main(["analyze", "--run", str(run), "--expressions", str(tmp_path / "own.jsonl"), "--maps", specs,
          "--threads", "1"])
    out = run / "analysis" / "own" / "vit-test"
    (row,) = [json.loads(s) for s in (out / "samples.jsonl").read_text().splitlines()]
    labels = {"lm_attention", "lm_attention:token=0", "backbone_attention:module=rollout:query=(1,2)"}
    assert set(row["maps"]) == labels
    saved = np.load(out / "maps" / f"{row['id']}.npz")
    ctx = build_context(vlm, scene_image(), "the red square")
    assert torch.allclose(torch.from_numpy(saved["lm_attention:token=0"]), compute_map("lm_attention", ctx, token=0),
                          atol=1e-6)
    assert torch.allclose(torch.from_numpy(saved["backbone_attention:module=rollout:query=(1,2)"]),
                          compute_map("backbone_attention", ctx, query=(1, 2)), atol=1e-6)
    assert not torch.allclose(torch.from_numpy(saved["lm_attention:token=0"]), torch.from_numpy(saved["lm_attention"]))
    assert "lm_attention:token=0" in (run / "analysis" / "own" / "summary.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["analyze", "--run", str(run), "--expressions", str(tmp_path / "own.jsonl"), "--maps",
              "lm_attention:layer=99"])
    assert "`lm_attention` option layer=99 is not one of" in capsys.readouterr().err
