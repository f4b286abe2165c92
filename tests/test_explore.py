"""What the app and the notebook widgets stand on: map options as menus over several backbones, the map gallery
with a query shared as a point of the image, the JSON export, the gallery figure, and analysis outputs read back."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from conftest import RUN_BACKBONES, scene_image, tiny_vlm

from toolkit.interpret import (PixelPoint, analysis_json, compare, compute_map, find_analyses, gallery_maps,
                               load_samples, no_analysis_message, option_controls, parse_options, sample_example,
                               sample_pairs)
from toolkit.interpret.explore import click_query, option_text, pixel_cell
from toolkit.viz import export_comparison, export_gallery, for_screen, map_gallery

WIDE = scene_image((64, 32))  # letterboxed: the top and bottom quarter of every input frame is padding


@pytest.fixture(scope="module")
def analyses(tiny_tokenizer):
    return compare({n: tiny_vlm(tiny_tokenizer, n) for n in RUN_BACKBONES}, WIDE, "the red square",
                   gt_box=(4, 4, 18, 18))


def test_menus_merge_every_backbones_choices_and_list_values_of_admitted_types(analyses):
    modules = {c.name: c for c in option_controls("backbone_attention", analyses)}["module"]
    values = [v for _, v in modules.choices]
    assert values[:3] == ["rollout", "blocks.0.attn", "blocks.1.attn"]  # vit-test's, then maxvit-test's
    assert "stages.0.blocks.0.attn_block.attn" in values and not modules.free
    query = {c.name: c for c in option_controls("backbone_attention", analyses)}["query"]
    assert query.default == "box-centre" and query.free == (tuple,)
    points = [v for _, v in query.choices[1:]]
    assert len(points) == 8  # the 8 of vit-test's 4x4 patches that lie on the image: its rows 1 and 2
    assert query.choices[1] == ("patch (1, 0) of vit-test (x 8, y 8)", PixelPoint(8, 8))
    assert all(pixel_cell(analyses["vit-test"].context, p)[0] in (1, 2) for p in points)
    token, contextual = option_controls("similarity", analyses)
    assert [label for label, _ in token.choices][:2] == ["mean", "0: ▁the"] and token.free == (int,)
    assert [v for _, v in contextual.choices] == [False, True]
    steps = {c.name: c for c in option_controls("integrated_gradients", analyses)}["n_steps"]
    assert steps.default == 16 and 16 in [v for _, v in steps.choices]
    assert option_controls("saliency", analyses) == []


def test_menu_texts_read_back_and_typed_values_are_checked(analyses):
    for name in ("backbone_attention", "lm_attention", "similarity", "scan_path"):
        for c in option_controls(name, analyses):
            assert all(c.parse(text, WIDE.size) == v for (_, text), (_, v) in zip(c.texts(), c.choices))
    assert parse_options("integrated_gradients", analyses, {"n_steps": "7"}) == {"baseline": "zeros", "n_steps": 7}
    assert parse_options("scan_path", analyses, {"query": "30, 20.5"})["query"] == PixelPoint(30, 20.5)
    assert option_text(PixelPoint(30.0, 20.5)) == "30, 20.5"
    with pytest.raises(ValueError, match=r"the query point \(70, 5\) is outside the 64x32 image"):
        parse_options("scan_path", analyses, {"query": "70, 5"})
    with pytest.raises(ValueError, match="`layer` 'deepest' is not one of: mean, rollout, 0$"):
        parse_options("lm_attention", analyses, {"layer": "deepest"})
    with pytest.raises(ValueError, match="or an integer"):
        parse_options("similarity", analyses, {"token": "the"})
    with pytest.raises(ValueError, match="has no option"):
        parse_options("saliency", analyses, {"layer": "0"})


def test_gallery_looks_from_one_point_of_the_image_on_every_grid(analyses):
    point = PixelPoint(40, 20)  # input frames: vit-test 32x32 (4x4 grid), vmamba-test 32x32 (2x2 grid)
    g = gallery_maps(analyses, "scan_path" if "vmamba-test" in analyses else "backbone_attention", query=point)
    for name, m in g.maps.items():
        ctx = analyses[name].context
        assert g.queries[name] == pixel_cell(ctx, point)
        assert torch.equal(m, compute_map(g.name, ctx, query=pixel_cell(ctx, point)))
    assert pixel_cell(analyses["vit-test"].context, point) == (2, 2)  # input (20, 18) of 32: row 2, column 2
    assert set(g.maps) | set(g.unavailable) == set(analyses) and not set(g.maps) & set(g.unavailable)
    g = gallery_maps(analyses, "backbone_attention", module="blocks.1.attn")
    assert list(g.maps) == ["vit-test"] and g.queries == {"vit-test": analyses["vit-test"].query}
    assert g.unavailable["maxvit-test"] == "module 'blocks.1.attn' does not apply to maxvit-test"
    if "vmamba-test" in analyses:  # the family's reason comes first
        assert g.unavailable["vmamba-test"] == "the backbone has no attention modules"
    g = gallery_maps(analyses, "similarity", token=40)  # past the expression's end: a reason, not an exception
    assert not g.maps and all("outside the expression" in why for why in g.unavailable.values())
    with pytest.raises(ValueError, match="has no option"):
        gallery_maps(analyses, "similarity", layer=0)


def test_a_click_chooses_the_menu_entry_of_the_first_backbones_cell_under_it(analyses):
    first = next(iter(analyses))
    key, point = click_query("backbone_attention", analyses, PixelPoint(50, 20))  # input (25, 18) of 32: (2, 3)
    assert (key, point) == ("query", PixelPoint(56, 24))  # the centre of that cell's part of the image
    query = {c.name: c for c in option_controls("backbone_attention", analyses)}["query"]
    assert (f"patch (2, 3) of {first} (x 56, y 24)", "56, 24") in query.texts()  # the menu shows the cell
    assert parse_options("backbone_attention", analyses, {key: option_text(point)})["query"] == point
    assert click_query("backbone_attention", analyses, PixelPoint(0, 0))[1] == PixelPoint(8, 8)  # row 0: padding
    if "vmamba-test" in analyses:
        assert click_query("scan_path", analyses, PixelPoint(50, 20))[0] == "query"
    with pytest.raises(ValueError, match="is not on the part of the 64x32 image"):
        click_query("backbone_attention", analyses, PixelPoint(70, 20))
    with pytest.raises(ValueError, match="`similarity` looks from no patch: .* backbone_attention, scan_path"):
        click_query("similarity", analyses, PixelPoint(50, 20))


def test_analysis_json_holds_answers_boxes_and_every_map_on_its_grid(analyses):
    g = gallery_maps(analyses, "backbone_attention", query=PixelPoint(40, 20))
    out = json.loads(json.dumps(analysis_json(analyses, g), allow_nan=False))
    assert out["expression"] == "the red square" and out["image"] == dict(width=64, height=32)
    assert out["gt_box"] == [4, 4, 18, 18] and list(out["backbones"]) == list(analyses)
    for name, a in analyses.items():
        b = out["backbones"][name]
        assert b["answer"] == a.grounding.answer and b["iou"] == a.iou and b["grid"] == list(a.grid)
        assert b["geometry"]["orig_w"] == 64 and b["geometry"]["oy"] == a.geometry.oy
        assert torch.allclose(torch.tensor(b["maps"]["similarity"]["values"], dtype=torch.float64),
                              a.similarity.mean.double(), atol=1e-6)
        assert ("values" in b["maps"]["backbone"]) == (a.backbone_map() is not None)
    assert out["gallery"]["options"] == {"query": {"x": 40, "y": 20}}
    vit = out["gallery"]["maps"]["vit-test"]
    assert vit["query"] == [2, 2] and len(vit["values"]) == 4 and len(vit["values"][0]) == 4
    maxvit = out["gallery"]["maps"]["maxvit-test"]  # block and grid attention, placed on its 4x4 grid
    assert "unavailable" not in maxvit and len(maxvit["values"]) == 4 and len(maxvit["values"][0]) == 4
    if "vmamba-test" in analyses:
        assert "no attention modules" in out["gallery"]["maps"]["vmamba-test"]["unavailable"]
    assert "gallery" not in analysis_json(analyses)


def test_map_gallery_draws_a_panel_per_backbone_with_linked_axes(analyses):
    fig = map_gallery(analyses, "backbone_attention", query=PixelPoint(40, 20))
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0] == "vit-test<br>from patch (2, 2) of its 4x4 grid"
    assert titles[1] == "maxvit-test<br>from patch (2, 2) of its 4x4 grid"
    if "vmamba-test" in analyses:
        assert titles[2] == "vmamba-test: no map<br>the backbone has no attention modules"
    assert fig.layout.title.text.startswith("backbone_attention (query=40, 20) for “the red square”")
    assert sum(t.type == "heatmap" for t in fig.data) == 2
    assert sum(t.type == "image" for t in fig.data) == len(analyses)
    assert fig.layout.xaxis2.matches == "x" and fig.layout.yaxis3.matches == "y"  # zoom one, zoom all
    dotted = [s for s in fig.layout.shapes if s.line.dash == "dot"]
    assert [d.xref for d in dotted] == ["x", "x2"]  # the query patch, where there is a map
    assert fig.layout.width == len(analyses) * 240 + 20
    g = gallery_maps(analyses, "similarity")  # a map with negative values gets a diverging scale around 0
    heatmaps = [t for t in map_gallery(analyses, g).data if t.type == "heatmap"]
    assert [t.zmid == 0 for t in heatmaps] == [bool((m < 0).any()) for m in g.maps.values()]
    screen = for_screen(fig)
    assert screen.layout.width is None and screen.layout.autosize and screen.layout.height == fig.layout.height
    assert fig.layout.width == len(analyses) * 240 + 20  # the original is left as it was


def test_export_without_a_browser_says_so_in_one_line_and_writes_the_json(analyses, tmp_path, monkeypatch):
    import toolkit.viz.figures as figures

    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setattr(figures.shutil, "which", lambda name: None)
    written, problem = export_comparison(analyses, tmp_path / "out")
    assert list(written) == ["json"] and json.loads(written["json"].read_text())["expression"] == "the red square"
    assert problem.startswith("PNG/SVG/PDF export is unavailable here (exporting comparison.png, comparison.svg")
    assert "\n" not in problem and str(tmp_path) not in problem
    written, problem = export_gallery(analyses, gallery_maps(analyses, "similarity"), tmp_path / "out")
    assert written == {} and problem.startswith("PNG/SVG/PDF export is unavailable here (exporting gallery.png")


# ------------------------------------------------------------------------------------ analysis outputs read back


def _line(i: int, backbone: str, iou, valid=True, error=None) -> dict:
    return dict(id=f"s{i}", image=f"/data/img{i}.png", expression=f"thing {i}", gt_box=[1, 2, 3, 4], answer=backbone,
                valid=valid, iou=iou, error=error, maps={})


def _write(out, backbone: str, lines) -> None:
    (out / backbone).mkdir(parents=True, exist_ok=True)
    (out / backbone / "samples.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x)
                                                            for x in lines))


def test_analysis_outputs_are_found_read_sorted_and_filtered(tmp_path):
    run = tmp_path / "run"
    assert find_analyses(run) == {}
    assert "`vlmtk analyze --run runs/run --split val --limit 50`" in no_analysis_message(run)
    out = run / "analysis" / "val"
    _write(out, "a", [_line(0, "a", 0.9), _line(1, "a", 0.2), _line(2, "a", 0.0, valid=False),
                      _line(3, "a", None, error="`img3.png` is not a readable image"), "{broken",
                      _line(3, "a", 0.8)])  # resumed: the last line of a sample counts
    _write(out, "b", [_line(0, "b", 0.7), _line(1, "b", 0.6), _line(2, "b", 0.9), _line(3, "b", 0.1)])
    (run / "analysis" / "unfinished").mkdir()
    pd.DataFrame(dict(backbone=["a"], task=["similarity"], split=["val"], metric=["mass_in_box"], value=[0.5],
                      n=[4], ci_low=[0.4], ci_high=[0.6])).to_csv(out / "summary.csv", index=False)
    assert find_analyses(run) == {"val": out}
    samples = load_samples(out)
    assert len(samples) == 8 and samples[(samples.id == "s3") & (samples.backbone == "a")].iou.item() == 0.8
    shown = sample_pairs(samples, "a", "b")
    assert list(shown.index) == ["s3", "s0", "s1", "s2"]  # IoU a - b: 0.7, 0.2, -0.4, -0.9
    assert list(shown.columns[:6]) == ["expression", "image", "truth", "IoU a", "IoU b", "IoU a - b"]
    assert shown.loc["s0", "image"] == "img0.png" and shown.loc["s0", "truth"] == "1, 2, 3, 4"
    assert math.isclose(shown.loc["s3", "IoU a - b"], 0.7)
    assert list(sample_pairs(samples, "a", "b", "failures").index) == ["s3", "s1", "s2"]
    assert list(sample_pairs(samples, "a", "b", "invalid").index) == ["s2"]
    assert list(sample_pairs(samples, "b", "a").index) == ["s2", "s1", "s0", "s3"]
    ex = sample_example(samples, "s2")
    assert (ex.image, ex.expression, ex.gt_box) == ("/data/img2.png", "thing 2", (1, 2, 3, 4))
    with pytest.raises(ValueError, match="two different backbones"):
        sample_pairs(samples, "a", "a")
    with pytest.raises(ValueError, match="c has no samples in this analysis; it has a, b"):
        sample_pairs(samples, "a", "c")


def test_run_tables_as_markdown_under_their_headings():
    from test_viz import _score_rows

    from toolkit.report import summary_tables, tables_markdown

    text = tables_markdown(summary_tables(_score_rows()), level=3, floatfmt=".3f")
    assert text.startswith("### Grounding Acc@IoU>=0.5\n\n| backbone") and "0.750 [0.25, 1.00]" in text
