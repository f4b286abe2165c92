"""toolkit.viz: maps land on the original image (padding removed), figures build, export writes real files, widgets."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CHROMIUM, RUN_BACKBONES, scan_kernels_available, scene_image, tiny_vlm
from PIL import Image

from toolkit.geometry import apply_geometry
from toolkit.interpret import Example, compare
from toolkit.viz import map_on_original, save_figure, scan_path_figure, side_by_side
from toolkit.viz.overlays import cell_box


@pytest.fixture(scope="module")
def analyses(tiny_tokenizer):
    vlms = {name: tiny_vlm(tiny_tokenizer, name) for name in RUN_BACKBONES}
    vlms["vit-test"].generate = lambda *a, **k: ["[0.10, 0.30, 0.50, 0.70]"]  # one valid box to draw and score
    return compare(vlms, scene_image(), "the red square", gt_box=(4, 4, 18, 18))


def test_maps_land_on_the_original_image_without_the_letterbox():
    _, geom = apply_geometry(scene_image((64, 32)), (32, 32), "letterbox")  # image rows 8..24 of the input
    padding = torch.ones(32, 32)
    padding[8:24] = 0
    assert map_on_original(padding, geom, (64, 32)).max() == 0
    ramp = torch.arange(4.0).repeat(4, 1)  # a 4x4 token map growing left to right
    out = map_on_original(ramp, geom, (64, 32))
    assert out.shape == (32, 64) and (out == out[:1]).all() and list(np.unique(out[0])) == [0, 1, 2, 3]
    assert cell_box((1, 0), (4, 4), geom) == pytest.approx((0, 0, 16, 16))  # row 1 starts at input row 8: y 0
    _, crop = apply_geometry(scene_image((64, 32)), (32, 32), "resize-crop")  # the model sees columns 16..48
    seen = ~np.isnan(map_on_original(torch.ones(4, 4), crop, (64, 32)))
    assert seen[:, 16:48].all() and not seen[:, :16].any() and not seen[:, 48:].any()


def test_side_by_side_has_a_row_per_backbone_and_scores_in_titles(analyses):
    fig = side_by_side(analyses)
    titles = [a.text for a in fig.layout.annotations]
    assert len(titles) == 4 * len(analyses)
    assert titles[0].startswith("vit-test<br>'[0.10, 0.30, 0.50, 0.70]' (IoU ")
    assert any("invalid answer" in t or "IoU" in t for t in titles[4:])
    assert sum(t.type == "image" for t in fig.data) == 4 * len(analyses)
    dashed = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert len(dashed) == len(analyses)  # the ground-truth box in each row
    assert titles[4 * list(analyses).index("maxvit-test") + 3] == "attention rollout"  # block + grid attention
    maps = [t for t in fig.data if t.type == "heatmap"]
    assert maps and all(t.showscale and 0 < t.colorbar.x <= 1 and 0 < t.colorbar.y < 1 for t in maps)
    assert len({(round(t.colorbar.x, 3), round(t.colorbar.y, 3)) for t in maps}) == len(maps)  # one scale per panel
    assert {s.label.text for s in fig.layout.shapes} >= {"predicted", "truth"}


@pytest.mark.skipif(not scan_kernels_available(), reason="toolkit_kernels.ss2d_scan_attention_fn missing")
def test_scan_path_figure_has_a_panel_per_direction_and_the_sum(analyses):
    fig = scan_path_figure(analyses["vmamba-test"])
    assert [a.text for a in fig.layout.annotations] == ["row-major", "column-major", "row-major reversed",
                                                        "column-major reversed", "merged"]


def test_scan_path_figure_explains_a_backbone_without_scans(analyses):
    with pytest.raises(ValueError, match="no scan paths"):
        scan_path_figure(analyses["vit-test"])


def test_export_html(analyses, tmp_path):
    path = save_figure(side_by_side(analyses), tmp_path / "fig.html")
    assert "plotly" in path.read_text()[:100000]


@pytest.mark.skipif(CHROMIUM is None, reason="PNG export needs Chromium (apt-get install chromium)")
def test_export_png_is_a_real_png(analyses, tmp_path):
    fig = side_by_side(analyses)
    path = save_figure(fig, tmp_path / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(path).size == (fig.layout.width, fig.layout.height)


@pytest.mark.skipif(CHROMIUM is None, reason="PNG export needs Chromium (apt-get install chromium)")
def test_gallery_exports_as_png_svg_and_pdf(analyses, tmp_path):
    from toolkit.interpret import PixelPoint, gallery_maps
    from toolkit.viz import export_gallery, map_gallery

    g = gallery_maps(analyses, "backbone_attention", query=PixelPoint(40, 20))
    written, problem = export_gallery(analyses, g, tmp_path / "out")
    assert problem is None and list(written) == ["png", "svg", "pdf"]
    for fmt, magic in (("png", b"\x89PNG\r\n\x1a\n"), ("svg", b"<svg"), ("pdf", b"%PDF-")):
        assert written[fmt] == tmp_path / "out" / f"gallery.{fmt}" and written[fmt].read_bytes().startswith(magic)
    fig = map_gallery(analyses, g)
    assert Image.open(written["png"]).size == (fig.layout.width, fig.layout.height)
    assert "backbone_attention (query=40, 20)" in written["svg"].read_text()


def test_explorer_runs_and_reports_bad_input(tiny_tokenizer, tmp_path):
    from toolkit.viz import Explorer

    scene_image().save(tmp_path / "scene.png")
    ui = Explorer({"vit-test": tiny_vlm(tiny_tokenizer, "vit-test")},
                  [Example(str(tmp_path / "scene.png"), "the red square")])
    assert ui.expression.value == "the red square"  # filled from the chosen example
    assert list(ui.run()) == ["vit-test"] and "<table" in ui.status.value
    ui.expression.value = ""
    assert ui.run() is None and "expression is empty" in ui.status.value


def test_explorer_gallery_follows_its_menus_and_a_click_and_exports(tiny_run, tmp_path):
    pytest.importorskip("anywidget", reason="the gallery's clicks need plotly's FigureWidget (anywidget)")
    from toolkit.interpret import PixelPoint, example_images
    from toolkit.runs import load_vlms
    from toolkit.viz import Explorer

    ui = Explorer(load_vlms(tiny_run), example_images(tiny_run), export_dir=tmp_path)
    assert ui.gt.value == "4, 4, 18, 18"  # the example's ground truth, as the box field reads it
    assert sorted(ui.run()) == sorted(RUN_BACKBONES) and ui.gallery.name == "similarity"
    ui.map_type.value = "backbone_attention"  # the menus are generated from the map type's declared options
    assert list(ui.controls) == ["module", "query"] and ui.query_option == "query"
    ui.controls["module"].value = "blocks.1.attn"
    assert ui.gallery.options == {"module": "blocks.1.attn", "query": "box-centre"}
    before = ui.gallery.maps["vit-test"]
    assert "does not apply" in ui.gallery.unavailable["maxvit-test"] and "maxvit-test" in ui.gallery_status.value
    # a click as the browser sends it to the FigureWidget: on the vit-test panel's map, at pixel (6, 22)
    fw = ui.gallery_figure
    heatmap = next(i for i, t in enumerate(fw.data) if t.type == "heatmap" and t.xaxis == "x2")
    fw._js2py_pointsCallback = dict(event_type="plotly_click", selector=None, device_state=None,
                                    points=dict(xs=[6.0], ys=[22.0], point_indexes=[[0, 0]],
                                                trace_indexes=[heatmap]))
    assert ui.controls["query"].value == PixelPoint(6.0, 22.0) and ui.gallery.options["query"] == PixelPoint(6, 22)
    assert ui.gallery.queries["vit-test"] == (2, 0) and ui.gallery_figure is not fw  # input y 20 of 32: row 2
    assert not torch.equal(ui.gallery.maps["vit-test"], before)  # recomputed from the new query
    for fmt, magic in (("png", b"\x89PNG"), ("svg", b"<svg"), ("pdf", b"%PDF"), ("json", b"{")):
        if fmt != "json" and CHROMIUM is None:
            assert ui.export(fmt) is None and "unavailable" in ui.export_status.value
            continue
        ui.export_buttons[fmt].click()
        assert (tmp_path / f"explore.{fmt}").read_bytes().startswith(magic)
        assert f"wrote explore.{fmt}" in ui.export_status.value
    saved = json.loads((tmp_path / "explore.json").read_text())
    assert saved["gallery"]["options"]["query"] == {"x": 6.0, "y": 22.0}
    assert saved["gallery"]["maps"]["vit-test"]["query"] == [2, 0]
    ui.map_type.value = "similarity"  # no query: a click says so and changes nothing
    ui.on_click(None, SimpleNamespace(xs=[6.0], ys=[22.0]))
    assert "has no query patch" in ui.gallery_status.value and ui.gallery.name == "similarity"


def test_explorer_names_the_extra_when_ipywidgets_is_missing(monkeypatch):
    from toolkit.viz import widgets

    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(ImportError, match="notebooks"):
        widgets.Explorer({})


def test_training_curves_draw_a_line_per_backbone_and_skip_missing_curves():
    from toolkit.viz.results import training_curves

    curve = [[1, 2.0], [2, 1.5], [3, 1.2]]
    fig = training_curves({"vit-test": {"pretrain": {"loss_curve": curve}, "vlm": {"loss_curve": curve}},
                           "maxvit-test": {"pretrain": {"top1": 0.5}, "vlm": {"loss_curve": curve[:2]}},
                           "vmamba-test": {}})
    assert [(t.name, t.xaxis) for t in fig.data] == [("vit-test", "x"), ("vit-test", "x2"), ("maxvit-test", "x2")]
    assert list(fig.data[2].x) == [1, 2] and list(fig.data[2].y) == [2.0, 1.5]
    assert [t.showlegend for t in fig.data] == [True, False, True]  # one legend entry per backbone
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    fig = training_curves({"vit-test": {"vlm": {"loss_curve": curve, "monitor_curve": [[2, {"acc@0.5": 0.25}],
                                                                                      [3, {"acc@0.5": 0.5}]]}}})
    assert [(t.xaxis, list(t.y)) for t in fig.data] == [("x2", [2.0, 1.5, 1.2]), ("x3", [0.25, 0.5])]


def _score_rows():
    from toolkit.eval.metrics import metric_row

    rows = [metric_row("vit-test", "grounding", s, "acc@0.5", [1, 0, 1, 1]) for s in ("refcoco", "refcocog")]
    rows += [metric_row("maxvit-test", "grounding", "refcocog", "acc@0.5", [0, 0, 1, 0]),
             metric_row("vit-test", "grounding", "refcoco", "mean_iou", [0.5, 0.7]),
             metric_row("vit-test", "vqa", "all", "accuracy", [1, 0]),
             metric_row("vit-test", "vqa", "color", "accuracy", [1, 1]),
             metric_row("chance:majority", "vqa", "color", "accuracy", [0, 1]),
             metric_row("chance:mean-box", "grounding", "refcoco", "acc@0.5", 0.1)]  # a value without an interval
    return pd.DataFrame(rows)


def test_score_bars_group_backbones_with_intervals_and_mark_chance():
    from toolkit.viz.results import score_bars

    df = _score_rows()
    fig = score_bars(df)
    assert [(t.name, t.xaxis) for t in fig.data] == [("vit-test", "x"), ("maxvit-test", "x"), ("chance:mean-box", "x"),
                                                    ("vit-test", "x2"), ("chance:majority", "x2")]
    vit = fig.data[0]
    assert list(vit.x) == ["refcoco", "refcocog"] and list(vit.y) == [0.75, 0.75]
    row = df[(df.backbone == "vit-test") & (df.split == "refcoco") & (df.metric == "acc@0.5")].iloc[0]
    assert vit.error_y.array[0] == pytest.approx(row.ci_high - row.value)
    assert vit.error_y.arrayminus[0] == pytest.approx(row.value - row.ci_low)
    assert list(fig.data[2].error_y.array) == [None]  # no interval, no error bar
    for chance in (fig.data[2], fig.data[4]):
        assert chance.marker.color == "lightgrey" and chance.marker.pattern.shape
    assert not fig.data[0].marker.pattern.shape
    assert list(fig.layout.xaxis.categoryarray) == ["refcoco", "refcocog"]
    assert list(fig.layout.xaxis2.categoryarray) == ["color", "all"]  # the pooled score last
    assert fig.layout.barmode == "group"


def test_write_result_figures_writes_html_and_links_them(tmp_path):
    from types import SimpleNamespace

    from toolkit.report import write_report, write_result_figures

    (tmp_path / "backbones").mkdir()
    (tmp_path / "backbones" / "vit-test.json").write_text(json.dumps(dict(top1=0.5, loss_curve=[[1, 2.0], [2, 1.0]])))
    (tmp_path / "backbones" / "vit-test+dense.json").write_text(json.dumps(dict(miou=0.3, loss_curve=[[1, 3.0]])))
    (tmp_path / "backbones" / "maxvit-test.json").write_text(json.dumps(dict(top1=0.4)))  # recorded before curves
    (tmp_path / "vlms" / "vit-test").mkdir(parents=True)
    (tmp_path / "vlms" / "vit-test" / "train_record.json").write_text(json.dumps(dict(loss_curve=[[5, 1.0]])))
    rows = _score_rows().to_dict("records")
    df = write_report(tmp_path, rows, {}, SimpleNamespace(name="t", backbones=("vit-test",), connector="mlp2x_gelu"),
                      figures=True)
    written = write_result_figures(tmp_path, df).paths
    assert {p.name for p in written} >= {"training_curves.html", "scores.html"}
    assert all(p.is_file() and p.parent == tmp_path / "figures" for p in written)
    html = (tmp_path / "figures" / "training_curves.html").read_text()
    assert "vit-test" in html and "vit-test+dense" not in html  # the segmentation curve is not a pretraining curve
    md = (tmp_path / "results.md").read_text()
    assert "## Figures" in md and "(figures/training_curves.html)" in md and "(figures/scores.png)" in md


def test_report_functions_return_their_notes_and_print_nothing(tmp_path, monkeypatch, capsys):
    """Without a browser for kaleido the figures are HTML and one note says so (not one per figure); a run without
    an analysis output gets a note saying how to make one. The caller (``vlmtk``) prints them."""
    import toolkit.viz.figures as figures
    from toolkit.report import write_map_score_tables, write_result_figures

    tries, html_only = [], figures.save_figure_as

    def no_browser(fig, stem, formats, **kw):
        if formats != ["html"]:
            tries.append(formats)
            raise RuntimeError("Kaleido requires Google Chrome to be installed.\nInstall it with ...")
        return html_only(fig, stem, formats, **kw)

    monkeypatch.setattr(figures, "save_figure_as", no_browser)
    written = write_result_figures(tmp_path, _score_rows(), formats=("html", "png", "svg"))
    assert [p.name for p in written.paths] == ["training_curves.html", "scores.html"]
    assert all(p.is_file() for p in written.paths) and tries == [["png", "svg"]]
    assert written.notes == ["PNG/PDF/SVG export skipped (RuntimeError: Kaleido requires Google Chrome to be "
                             f"installed.); the figures are HTML in {tmp_path / 'figures'}. For images: `make "
                             "chromium`, then run again."]
    tables = write_map_score_tables(tmp_path, tmp_path / "figures")
    assert tables.paths == [] and len(tables.notes) == 1
    assert tables.notes[0].startswith("No map-score table: No finished `vlmtk analyze` output in this run yet")
    assert capsys.readouterr().out == ""


def test_markup_in_expressions_and_answers_is_shown_as_text(analyses):
    from dataclasses import replace

    a = next(iter(analyses.values()))
    fig = side_by_side({"<b>vit</b>": replace(a, expression="<img src=x onerror=alert(1)> square")})
    assert "<img" not in fig.layout.title.text and "&lt;img" in fig.layout.title.text
    assert not any("<b>vit</b>" in ann.text for ann in fig.layout.annotations)
