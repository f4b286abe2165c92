"""Metric rows with bootstrap intervals, collapse diagnostics, and the report tables built from them."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from toolkit.eval.evaluate import summarize
from toolkit.eval.metrics import bootstrap_ci, grounding_collapse, metric_row, vqa_collapse
from toolkit.report import results_frame, summary_tables, summary_text, write_report


def _g(ds, answer, valid, box, correct=False, size=(200, 100)):
    return dict(dataset=ds, expression="x", answer=answer, valid=valid, iou=0.6 if correct else 0.0, correct=correct,
                pred_box=box, gt_box=(0, 0, 10, 10), image_path="img.png", image_size=size)


def test_bootstrap_interval_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (30, 300, 3000):
        v = rng.random(n) < 0.6
        low, high = bootstrap_ci(v)
        assert low <= v.mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2] > 0
    assert bootstrap_ci(v) == bootstrap_ci(v)  # fixed seed: results.csv does not change between runs


def test_metric_row_columns():
    row = metric_row("vit", "vqa", "count", "accuracy", [1, 0, 1, 1])
    assert row["value"] == 0.75 and row["n"] == 4 and row["ci_low"] <= 0.75 <= row["ci_high"]
    plain = metric_row("vit", "grounding", "refcoco", "top_answer_share", 0.5, n=10, ci=False)
    assert (plain["value"], plain["n"], plain["ci_low"], plain["ci_high"]) == (0.5, 10, None, None)


def test_collapse_of_identical_answers():
    rows = [_g("refcoco", "[0.10, 0.20, 0.30, 0.40]", True, (20.0, 20.0, 60.0, 40.0)) for _ in range(5)]
    (m,) = grounding_collapse(rows).values()
    assert m == {"top_answer_share": 1.0, "box_spread": 0.0, "zero_area_rate": 0.0}
    vqa = [dict(question_type="count", answer=a, correct=False) for a in ("3", "3.", " 3", "2")]
    assert vqa_collapse(vqa) == {"count": {"top_answer_share": 0.75}}


def test_collapse_counts_zero_area_boxes_and_skips_spread_without_image_size():
    rows = [_g("refcoco", "[0.50, 0.50, 0.50, 0.90]", False, None),
            _g("refcoco", "[0.10, 0.20, 0.30, 0.40]", True, (20.0, 20.0, 60.0, 40.0)),
            _g("refcoco", "[0.20, 0.20, 0.60, 0.40]", True, (40.0, 20.0, 120.0, 40.0)),
            _g("refcoco", "not a box", False, None)]
    m = grounding_collapse(rows)["refcoco"]
    assert m["zero_area_rate"] == pytest.approx(1 / 3) and m["top_answer_share"] == 0.25
    # x1 and x2 each spread by 0.1 (of 200 px), y not at all: mean std over the 4 coordinates
    assert m["box_spread"] == pytest.approx((0.05 + 0.0 + 0.15 + 0.0) / 4)
    for r in rows:
        del r["image_size"]  # an evaluation cache written before image sizes were recorded
    assert "box_spread" not in grounding_collapse(rows)["refcoco"]


def test_summarize_emits_intervals_and_collapse_rows_the_report_shows():
    g = [_g(ds, "[0.10, 0.20, 0.30, 0.40]", True, (20.0, 20.0, 60.0, 40.0), correct=i % 2 == 0)
         for ds in ("refcoco", "refcocog") for i in range(20)]
    q = [dict(question_type="color", answer="red", correct=i % 3 == 0) for i in range(12)]
    df = results_frame(summarize("vit", g, q))
    assert list(df.columns) == ["backbone", "task", "split", "metric", "value", "n", "ci_low", "ci_high"]
    scores = df[df.metric.isin(["acc@0.5", "mean_iou", "invalid_rate", "accuracy"])]
    assert scores.ci_low.notna().all() and (scores.ci_low <= scores.value).all() and (scores.value <= scores.ci_high).all()
    collapse = df[df.metric.isin(["box_spread", "top_answer_share", "zero_area_rate"])]
    assert set(zip(collapse.task, collapse.split)) == {("grounding", "refcoco"), ("grounding", "refcocog"),
                                                       ("vqa", "color")}
    assert collapse.ci_low.isna().all() and not df.duplicated(["backbone", "task", "split", "metric"]).any()

    tables = summary_tables(df)
    acc = tables["Grounding Acc@IoU>=0.5"].loc["vit", "refcoco"]
    assert acc.startswith("0.500 [") and acc.endswith("]")
    assert isinstance(tables["Grounding invalid-answer rate"].loc["vit", "refcoco"], float)
    diag = tables["Collapse diagnostics"]
    assert list(diag.columns) == ["task", "split", "box_spread", "top_answer_share", "zero_area_rate"]
    assert diag.loc[diag.split == "refcoco", "top_answer_share"].item() == 1.0


def test_summary_text_holds_every_table_under_its_title_and_prints_nothing(capsys):
    rows = summarize("vit", [_g("refcoco", "[0.10, 0.20, 0.30, 0.40]", True, (20.0, 20.0, 60.0, 40.0), correct=i < 3)
                             for i in range(10)], [])
    df = results_frame(rows)
    text = summary_text(df)
    assert capsys.readouterr().out == ""
    assert text.startswith("\n") and text.endswith("\n")  # `vlmtk demo` prints it as it is
    blocks = text.strip("\n").split("\n\n")  # a blank line before each table's title
    assert [block.splitlines()[0] for block in blocks] == list(summary_tables(df)) and len(blocks) >= 2
    assert "\nGrounding Acc@IoU>=0.5\n" in text and "0.300 [" in text
    assert summary_text(df.iloc[:0]) == ""


def test_report_keeps_numbers_in_csv_and_intervals_in_markdown(tmp_path):
    rows = summarize("vit", [_g("refcoco", "[0.10, 0.20, 0.30, 0.40]", True, (20.0, 20.0, 60.0, 40.0), correct=i < 3)
                             for i in range(10)], [])
    write_report(tmp_path, rows, {}, SimpleNamespace(name="t", backbones=("vit",), connector="mlp2x_gelu"))
    csv = pd.read_csv(tmp_path / "results.csv")
    assert all(pd.api.types.is_float_dtype(csv[c]) for c in ("value", "ci_low", "ci_high"))
    md = (tmp_path / "results.md").read_text()
    assert "0.300 [" in md and "## Collapse diagnostics" in md


def _ground(image, pred, gt, dataset="refcoco"):
    from toolkit.boxes import box_iou
    import torch

    iou = float(box_iou(torch.tensor(pred, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32)))
    return dict(dataset=dataset, image_path=image, valid=True, pred_box=pred, gt_box=gt, iou=iou, correct=iou >= 0.5)


def test_object_choice_separates_finding_an_object_from_reading_the_expression():
    from toolkit.eval.evaluate import grounding_baselines, object_choice
    from toolkit.report import choice_flags

    a, b, c = (0, 0, 10, 10), (20, 20, 30, 30), (40, 0, 50, 10)
    objects = {"two.png": [a, b], "three.png": [a, b, c], "one.png": [a]}
    rows = [_ground("two.png", a, a),            # right object
            _ground("two.png", b, a),            # an object, the wrong one
            _ground("three.png", (60, 60, 70, 70), c),  # no object at all
            _ground("three.png", c, c),
            _ground("one.png", b, a)]            # one-object scenes are left out
    got = {r["metric"]: r for r in object_choice("m", rows, objects)}
    assert got["on_object"]["value"] == pytest.approx(3 / 4) and got["on_object"]["n"] == 4
    assert got["right_object"]["value"] == pytest.approx(2 / 3) and got["right_object"]["n"] == 3
    missed = object_choice("m", [_ground("two.png", (60, 60, 70, 70), a)], objects)
    assert [r["metric"] for r in missed] == ["on_object"]  # no boxed object: no choice to score
    refs = [SimpleNamespace(image_path=p, dataset="refcoco", box_xyxy=a, image_width=64, image_height=64)
            for p in ("two.png", "three.png", "one.png")]
    (chance,) = [r for r in grounding_baselines(refs, refs, objects) if r["metric"] == "right_object"]
    assert chance["value"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    # an interval that reaches chance is flagged; one above it is not
    df = results_frame([dict(chance), dict(got["right_object"], ci_low=0.3, ci_high=0.9),
                        dict(got["right_object"], backbone="good", ci_low=0.6, ci_high=0.9)])
    (line, _) = choice_flags(df)
    assert "m box(es)" in line and "good" not in line
    assert "Scenes with 2+ objects: of those, the object the expression names" in summary_tables(df)
