"""The evaluation harness on files in the real layouts (REFER pickle + instances.json, VQAv2 questions + annotations,
own JSONL): metric values against hand computation, VQAv2 soft accuracy and answer normalisation, both RefCOCO
protocols, resume, the output files, bad input, and the `vlmtk eval` hooks; the scene world's evaluation and training
monitor, which answer through the harness's code."""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_vlm
from toolkit.boxes import GROUNDING_PROMPT
from toolkit.data import SceneWorldConfig, VQA_PROMPT, build_world
from toolkit.data.formats import load_refcoco, load_vqa_split
from toolkit.eval.evaluate import evaluate_grounding, evaluate_vqa, grounding_monitor
from toolkit.eval.harness import (HarnessError, add_eval_arguments, eval_command, load_expressions,
                                  normalize_vqa_answer, run_eval, vqa_soft_accuracy)

# ------------------------------------------------------------------------------------ fixtures in the real layouts

# image id -> (width, height); image 2 is non-square, so letterbox moves its boxes
IMAGES = {1: (40, 40), 2: (40, 20), 3: (40, 40)}
ANNS = {11: (1, (0, 0, 20, 20)), 21: (2, (0, 0, 20, 8)), 31: (3, (10, 10, 30, 30))}  # ann id -> image id, xyxy px
# (split, ann id, sentences): refcoco val has 5 expressions, testA 2, testB 1
REFS = [("val", 11, ["e1", "e2", "e3", "e4", "e5"]), ("testA", 31, ["ta1", "ta2"]), ("testB", 11, ["tb1"])]
ANSWERS = {
    "e1": "[0.00, 0.00, 0.50, 0.50]",  # pred (0,0,20,20): IoU 1, centre in
    "e2": "[0.00, 0.00, 0.30, 0.50]",  # (0,0,12,20): IoU 240/400 = 0.6, centre (6,10) in
    "e3": "[0.50, 0.50, 1.00, 1.00]",  # (20,20,40,40): IoU 0, centre out
    "e4": "I cannot tell",  # not a box: invalid
    "e5": "[0.10, 0.10, 0.60, 0.60]",  # (4,4,24,24): IoU 256/544, centre (14,14) in
    "ta1": "[0.25, 0.25, 0.75, 0.75]",  # IoU 1
    "ta2": "[0.25, 0.25, 0.75]",  # three numbers: invalid
    "tb1": "[0.00, 0.00, 0.50, 0.50]",
    # the wide image 2, GT (0,0,20,8): letterboxed into a 40x40 square it sits at y 10..18 -> input-frame answer
    "wide": "[0.00, 0.25, 0.50, 0.45]",
}
# VQAv2: (question id, image id, question, answer type, 10 human answers, model answer, soft accuracy, exact match)
VQA = [
    (101, 1, "How many squares?", "number", ["2"] * 10, "two", 1.0, False),
    (102, 1, "What colour is it?", "other", ["red"] * 3 + ["blue"] * 7, "Red.", 0.9, False),
    (103, 3, "Is it raining?", "yes/no", ["yes"] * 2 + ["no"] * 8, "yes", 0.6, False),
    (104, 3, "What animal?", "other", ["a dog"] * 10, "dog", 1.0, False),
    (105, 1, "Is it day?", "yes/no", ["no"] * 10, "no", 1.0, True),
]


def _write_image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)


def write_refer(root: Path, dataset: str = "refcoco", refs=REFS, images=IMAGES, anns=ANNS) -> Path:
    """``{root}/{dataset}/refs(unc|umd).p`` + ``instances.json`` with the REFER keys, images in ``{root}/images``."""
    for i, size in images.items():
        _write_image(root / "images" / f"{i:06d}.png", size)
    inst = {"images": [{"id": i, "file_name": f"{i:06d}.png", "width": w, "height": h} for i, (w, h) in images.items()],
            "annotations": [{"id": a, "image_id": im, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                            for a, (im, (x1, y1, x2, y2)) in anns.items()],
            "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}]}
    out, sent_id = [], 0
    for ref_id, (split, ann, sents) in enumerate(refs):
        ss = [{"tokens": s.split(), "raw": s, "sent": s, "sent_id": sent_id + j} for j, s in enumerate(sents)]
        sent_id += len(ss)
        out.append({"ref_id": ref_id, "ann_id": ann, "image_id": anns[ann][0], "split": split, "sentences": ss,
                    "sent_ids": [s["sent_id"] for s in ss], "category_id": 1, "file_name": f"x_{ann}.png"})
    d = root / dataset
    d.mkdir(parents=True, exist_ok=True)
    (d / "instances.json").write_text(json.dumps(inst))
    (d / {"refcocog": "refs(umd).p"}.get(dataset, "refs(unc).p")).write_bytes(pickle.dumps(out, protocol=2))
    return root


def write_vqa(root: Path) -> tuple[Path, Path, Path]:
    """VQAv2 questions + annotations (10 answers each) and images named as VQAv2's val2014 ones."""
    images = root / "val2014"
    for _, image_id, *_ in VQA:
        path = images / f"COCO_val2014_{image_id:012d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 16), (10, 200, 10)).save(path)
    questions = {"questions": [{"image_id": im, "question": q, "question_id": qid} for qid, im, q, *_ in VQA]}
    annotations = {"annotations": [
        {"question_id": qid, "image_id": im, "question_type": q.split()[0].lower(), "answer_type": at,
         "multiple_choice_answer": max(set(hs), key=hs.count),
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(hs)]}
        for qid, im, q, at, hs, *_ in VQA]}
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "annotations.json").write_text(json.dumps(annotations))
    return root / "questions.json", root / "annotations.json", images


@pytest.fixture(scope="module")
def vlm(tiny_tokenizer):
    return tiny_vlm(tiny_tokenizer, "vit-test")  # 32 px input, letterbox, box_frame "input"


class FakeGenerate:
    """Stands in for VLM.generate: the fixed answer of each prompt; counts the prompts it answered."""

    def __init__(self, extra: dict | None = None):
        self.answers = {GROUNDING_PROMPT.format(expression=e): a for e, a in ANSWERS.items()}
        self.answers.update({VQA_PROMPT.format(question=q): a for _, _, q, _, _, a, _, _ in VQA})
        self.answers.update(extra or {})
        self.prompts: list[str] = []

    def __call__(self, visual_tokens, prompts, max_new_tokens=24):
        assert visual_tokens.shape[0] == len(prompts)
        self.prompts += list(prompts)
        return [self.answers.get(p, "no idea") for p in prompts]


@pytest.fixture()
def fake(vlm, monkeypatch):
    f = FakeGenerate()
    monkeypatch.setattr(vlm, "generate", f)
    return f


def _m(res, task, split, metric):
    return res["results"][task][split][metric]


def _samples(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ VQAv2 scoring rules


@pytest.mark.parametrize("humans_agreeing, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_averages_the_ten_leave_one_out_subsets(humans_agreeing, expected):
    humans = ["cat"] * humans_agreeing + ["dog"] * (10 - humans_agreeing)
    assert vqa_soft_accuracy("cat", humans) == pytest.approx(expected)
    # by hand: each subset drops one human; min(1, matches among the other 9 / 3), averaged over the 10
    by_hand = sum(min(1.0, (humans_agreeing - (h == "cat")) / 3) for h in humans) / 10
    assert by_hand == pytest.approx(expected)


def test_vqa_soft_accuracy_normalises_and_degrades_gracefully():
    assert vqa_soft_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_soft_accuracy("the Dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_soft_accuracy("3", ["three"] * 10) == 1.0
    # a single answer (or the scene world's one answer repeated 10 times) is exact match
    assert vqa_soft_accuracy("red", ["red"]) == 1.0 and vqa_soft_accuracy("blue", ["red"]) == 0.0
    assert vqa_soft_accuracy("red", ["red"] * 10) == 1.0 and vqa_soft_accuracy("blue", ["red"] * 10) == 0.0
    # n < 10: the threshold is 30% of the other n - 1 annotators (3 * (n-1) / 9)
    assert vqa_soft_accuracy("a", ["a", "b"]) == pytest.approx(0.5)
    assert vqa_soft_accuracy("a", ["a", "a", "b", "b"]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        vqa_soft_accuracy("a", [])


@pytest.mark.parametrize("raw, normalised", [
    ("Two.", "2"), ("ten!", "10"), ("None", "0"),  # number words, final period, punctuation
    ("The dog", "dog"), ("a red car", "red car"), ("an apple", "apple"),  # articles
    ("dont know", "don't know"), ("Its raining, isnt it", "its raining isn't it"), ("oclock", "o'clock"),
    ("black-and-white", "black and white"), ("yes, it is", "yes it is"), ("what?is", "what is"),
    ("100,978", "100978"), ("2.5", "2.5"), ("a.m.", "am"), ("  Yes\n", "yes"), ("t-shirt", "t shirt"),
    ("red;blue", "red blue"), ("(left)", "left"), ("man's hat", "man's hat"), ("10:30", "10:30"),
])
def test_vqa_answer_normalisation_follows_the_official_rules(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


# ------------------------------------------------------------------------------------ grounding metrics by hand


def test_refcoco_metrics_match_hand_computation(tmp_path, vlm, fake):
    root = write_refer(tmp_path / "refer")
    res = run_eval(vlm, tmp_path / "out", refcoco_root=root, datasets=("refcoco",), batch_size=3)
    ious = [1.0, 0.6, 0.0, 0.0, 256 / 544]  # e1..e5, see ANSWERS
    val = res["results"]["refcoco"]["val"]
    for t, want in ((0.1, 0.6), (0.3, 0.6), (0.5, 0.4), (0.7, 0.2), (0.9, 0.2)):
        assert val[f"acc@{t}"]["value"] == pytest.approx(want), t
        assert val[f"acc@{t}"]["value"] == pytest.approx(sum(i >= t for i in ious) / 5)
    assert val["mean_iou"]["value"] == pytest.approx(sum(ious) / 5, abs=1e-5)
    assert val["center_acc"]["value"] == pytest.approx(0.6)
    assert val["invalid_rate"]["value"] == pytest.approx(0.2)
    assert val["error_rate"]["value"] == 0.0
    assert all(m["n"] == 5 for m in val.values())
    assert val["acc@0.5"]["ci_low"] <= val["acc@0.5"]["value"] <= val["acc@0.5"]["ci_high"]
    # a square image: letterbox changes nothing, so the Prismatic protocol agrees on val
    assert val["acc@0.5,prismatic"]["value"] == pytest.approx(0.4)
    assert val["invalid_rate,prismatic"]["value"] == pytest.approx(0.2)
    assert _m(res, "refcoco", "testA", "acc@0.5")["value"] == pytest.approx(0.5)
    assert _m(res, "refcoco", "testA", "invalid_rate")["value"] == pytest.approx(0.5)
    assert _m(res, "refcoco", "testB", "acc@0.5")["value"] == 1.0
    assert "acc@0.5,prismatic" not in res["results"]["refcoco"]["testA"]  # Prismatic scores val only
    by_id = {s["expression"]: s for s in _samples(tmp_path / "out", "refcoco")}
    assert by_id["e4"]["valid"] is False and by_id["e4"]["parsed_box"] is None and by_id["e4"]["iou"] == 0.0
    assert by_id["e2"]["pred_box"] == pytest.approx([0, 0, 12, 20], abs=1e-3)
    assert by_id["e2"]["target_box"] == [0, 0, 20, 20] and by_id["e2"]["correct"] is True
    assert len(fake.prompts) == 8


def test_prismatic_protocol_reads_boxes_by_the_original_size(tmp_path, vlm, fake, monkeypatch):
    """A non-square image, an answer in the letterboxed input frame: right for the toolkit (box_frame "input"),
    shifted for Prismatic's harness, which divides by the original size."""
    root = write_refer(tmp_path / "refer", refs=[("val", 21, ["wide"]), ("testA", 11, ["e1"])])
    res = run_eval(vlm, tmp_path / "out", refcoco_root=root, datasets=("refcoco",), splits=("val", "testA"))
    val = res["results"]["refcoco"]["val"]
    assert val["acc@0.5"]["value"] == 1.0 and val["mean_iou"]["value"] == pytest.approx(1.0, abs=1e-5)
    # read by the original 40x20 size: (0, 5, 20, 9) against (0, 0, 20, 8): IoU 60/180
    assert val["acc@0.5,prismatic"]["value"] == 0.0
    assert val["mean_iou,prismatic"]["value"] == pytest.approx(1 / 3, abs=1e-5)
    (s,) = [s for s in _samples(tmp_path / "out", "refcoco") if s["split"] == "val"]
    assert s["prismatic"]["target_box_norm"] == [0.0, 0.0, 0.5, 0.4] and s["prismatic"]["correct"] is False
    rows = {(r["protocol"], r["split"], r["metric"]) for r in res["rows"]}
    assert ("prismatic", "val", "acc@0.5") in rows and ("prismatic", "testA", "acc@0.5") not in rows
    # a model that answers in the original frame is scored alike by both protocols
    monkeypatch.setattr(vlm.cfg, "box_frame", "original")
    res = run_eval(vlm, tmp_path / "out2", refcoco_root=root, datasets=("refcoco",), splits=("val",))
    val = res["results"]["refcoco"]["val"]
    assert val["acc@0.5"]["value"] == val["acc@0.5,prismatic"]["value"] == 0.0
    assert val["mean_iou"]["value"] == pytest.approx(val["mean_iou,prismatic"]["value"], abs=1e-5)


def test_missing_split_combinations_are_skipped_with_one_line(tmp_path, vlm, fake):
    root = write_refer(tmp_path / "refer")
    write_refer(root, "refcocog", refs=[("val", 11, ["e1"]), ("test", 31, ["ta1"])])
    lines = []
    res = run_eval(vlm, tmp_path / "out", refcoco_root=root, splits=("val", "testA", "testB"), log=lines.append)
    assert set(res["results"]) == {"refcoco", "refcocog"}
    assert set(res["results"]["refcocog"]) == {"val"}
    assert any("refcocog" in m and "testA" in m and "['test', 'val']" in m for m in lines)
    assert any("refcoco+" in m and "skipped" in m for m in lines)
    assert res["notes"] == lines
    assert res["n_samples"] == {"refcoco": {"val": 5, "testA": 2, "testB": 1}, "refcocog": {"val": 1}}
    # by default each data set gets the splits papers report: refcocog val and test
    res = run_eval(vlm, tmp_path / "out2", refcoco_root=root, log=lines.append)
    assert res["n_samples"] == {"refcoco": {"val": 5, "testA": 2, "testB": 1}, "refcocog": {"val": 1, "test": 1}}
    assert res["args"]["splits"] is None
    md = (tmp_path / "out2" / "results.md").read_text()
    assert "refcoco testB" in md and "refcocog test" in md


def test_vqa_scores_soft_accuracy_exact_match_and_answer_types(tmp_path, vlm, fake):
    q, a, images = write_vqa(tmp_path / "vqa")
    res = run_eval(vlm, tmp_path / "out", vqa_questions=q, vqa_annotations=a, vqa_images=images)
    allv = res["results"]["vqav2"]["all"]
    assert allv["vqa_accuracy"]["value"] == pytest.approx(sum(x[6] for x in VQA) / len(VQA))
    assert allv["exact_match"]["value"] == pytest.approx(sum(x[7] for x in VQA) / len(VQA))
    assert _m(res, "vqav2", "yes/no", "vqa_accuracy")["value"] == pytest.approx(0.8)
    assert _m(res, "vqav2", "number", "vqa_accuracy")["n"] == 1
    samples = {s["question_id"]: s for s in _samples(tmp_path / "out", "vqav2")}
    for qid, _, _, _, humans, ans, soft, exact in VQA:
        s = samples[qid]
        assert (s["answer"], s["vqa_accuracy"], s["exact_match"], s["human_answers"]) == (ans, pytest.approx(soft),
                                                                                         exact, humans)
    assert samples[101]["answer_normalized"] == "2"
    assert res["args"]["vqa_image_pattern"] is None  # VQAv2's COCO_val2014_ names were found on their own


# ------------------------------------------------------------------------------------ own data


def test_own_expressions_jsonl_answers_every_line_and_scores_boxed_ones(tmp_path, vlm, fake):
    data = tmp_path / "mine"
    _write_image(data / "pics" / "a.png", (40, 40))
    _write_image(data / "pics" / "b.png", (40, 40))
    lines = [{"image": "pics/a.png", "expression": "e1", "box": [0, 0, 20, 20]},
             {"image": "pics/a.png", "expression": "what is here"},
             {"image": "pics/b.png", "expression": "e3", "box": [0, 0, 20, 20], "id": "custom-7"}]
    (data / "expr.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    res = run_eval(vlm, tmp_path / "out", expressions_jsonl=data / "expr.jsonl")
    allm = res["results"]["expressions"]["all"]
    assert allm["acc@0.5"] == {"value": 0.5, "n": 2, "ci_low": pytest.approx(0.0), "ci_high": pytest.approx(1.0)}
    assert allm["invalid_rate"]["n"] == 3 and allm["invalid_rate"]["value"] == pytest.approx(1 / 3)
    samples = {s["id"]: s for s in _samples(tmp_path / "out", "expressions")}
    assert set(samples) == {"line1", "line2", "custom-7"}
    assert samples["line2"]["answer"] == "no idea" and samples["line2"]["iou"] is None
    assert samples["line2"]["target_box"] is None and samples["line1"]["iou"] == pytest.approx(1.0, abs=1e-5)
    assert len(load_expressions(data / "expr.jsonl", data)) == 3


def test_unreadable_image_is_an_error_row_and_the_run_carries_on(tmp_path, vlm, fake):
    data = tmp_path / "mine"
    _write_image(data / "a.png", (40, 40))
    (data / "broken.png").write_bytes(b"this is not a PNG")
    lines = [{"image": "a.png", "expression": "e1", "box": [0, 0, 20, 20]},
             {"image": "broken.png", "expression": "e2", "box": [0, 0, 20, 20]},
             {"image": "missing.png", "expression": "e5", "box": [0, 0, 20, 20]}]
    (data / "expr.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    logged = []
    res = run_eval(vlm, tmp_path / "out", expressions_jsonl=data / "expr.jsonl", log=logged.append)
    allm = res["results"]["expressions"]["all"]
    assert allm["acc@0.5"]["value"] == pytest.approx(1 / 3) and allm["acc@0.5"]["n"] == 3
    assert allm["error_rate"]["value"] == pytest.approx(2 / 3)
    assert sorted(Path(e["image"]).name for e in res["errors"]) == ["broken.png", "missing.png"]
    assert any("broken.png" in m and "cannot open image" in m for m in logged)
    assert fake.prompts == [GROUNDING_PROMPT.format(expression="e1")]  # only the readable image was answered
    assert "broken.png" in (tmp_path / "out" / "results.md").read_text()
    # a rerun retries error rows (the image may have been fixed) and reuses the rest
    _write_image(data / "broken.png", (40, 40))
    res = run_eval(vlm, tmp_path / "out", expressions_jsonl=data / "expr.jsonl", log=logged.append)
    assert len(res["errors"]) == 1 and fake.prompts[1:] == [GROUNDING_PROMPT.format(expression="e2")]
    assert res["results"]["expressions"]["all"]["acc@0.5"]["value"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------ resume and output files


def test_resume_computes_only_the_rest(tmp_path, vlm, fake, monkeypatch):
    root = write_refer(tmp_path / "refer")
    out = tmp_path / "out"
    run_eval(vlm, out, refcoco_root=root, datasets=("refcoco",), limit=2, batch_size=2)  # the "interrupted" run
    assert len(fake.prompts) == 5  # val 2, testA 2, testB 1
    with open(out / "samples_refcoco.jsonl", "a") as f:
        f.write('{"id": "val:0:4", "answ')  # killed in the middle of writing a line
    full = run_eval(vlm, out, refcoco_root=root, datasets=("refcoco",), batch_size=2)
    assert len(fake.prompts) == 5 + 3  # e3, e4, e5 only
    ids = [s["id"] for s in _samples(out, "refcoco")]
    assert len(ids) == len(set(ids)) == 8
    assert full["results"]["refcoco"]["val"]["acc@0.5"]["value"] == pytest.approx(0.4)
    again = run_eval(vlm, out, refcoco_root=root, datasets=("refcoco",))
    assert len(fake.prompts) == 8 and again["results"] == full["results"]
    # another model's samples are never taken for this one's
    monkeypatch.setattr(vlm.cfg, "box_frame", "original")
    with pytest.raises(HarnessError, match="another model"):
        run_eval(vlm, out, refcoco_root=root, datasets=("refcoco",))
    assert (out / "results.json").exists()  # refused before anything of the earlier run was touched


def test_output_files_and_fields(tmp_path, vlm, fake):
    root = write_refer(tmp_path / "refer")
    q, a, images = write_vqa(tmp_path / "vqa")
    out = tmp_path / "out"
    res = run_eval(vlm, out, refcoco_root=root, datasets=("refcoco",), vqa_questions=q, vqa_annotations=a,
                   vqa_images=images, model_name="tiny")
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert {"model", "versions", "args", "results", "rows", "protocols", "errors", "notes", "n_samples"} <= set(res)
    assert res["model"]["name"] == "tiny" and res["model"]["config"]["backbone"] == "vit-test"
    assert {"toolkit", "torch", "transformers"} <= set(res["versions"])
    assert res["args"]["datasets"] == ["refcoco"] and res["args"]["refcoco_root"] == str(root)
    for per_split in res["results"].values():
        for metrics in per_split.values():
            for m in metrics.values():
                assert set(m) == {"value", "n", "ci_low", "ci_high"}
    assert {tuple(r) for r in res["rows"]} == {("backbone", "task", "split", "protocol", "metric", "value", "n",
                                                "ci_low", "ci_high")}
    g = _samples(out, "refcoco")[0]
    assert {"id", "image", "prompt", "answer", "parsed_box", "pred_box", "target_box", "iou", "correct", "center_hit",
            "valid", "error", "model", "dataset", "split", "expression"} <= set(g)
    assert g["prompt"] == GROUNDING_PROMPT.format(expression=g["expression"])
    assert "prismatic" in g if g["split"] == "val" else "prismatic" not in g
    v = _samples(out, "vqav2")[0]
    assert {"id", "prompt", "answer", "target", "human_answers", "vqa_accuracy", "exact_match"} <= set(v)
    md = (out / "results.md").read_text()
    assert "RefCOCO Acc@0.5 as papers report it" in md and "Prismatic protocol" in md and "VQAv2" in md
    tex = (out / "results.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 4 and r"acc@0.5" in tex and r"yes/no" in tex
    assert not list(out.glob("*.tmp"))


# ------------------------------------------------------------------------------------ bad input


def _bad_input(case: str, tmp: Path) -> tuple[dict, str]:
    """(run_eval keyword arguments, pattern the one-line error must match) of each kind of bad input."""
    root = write_refer(tmp / "refer")
    q, a, images = write_vqa(tmp / "vqa")
    expr = tmp / "expr.jsonl"
    _write_image(tmp / "a.png", (40, 40))
    good = json.dumps({"image": "a.png", "expression": "e1"})
    if case == "no instances.json":
        (root / "refcoco" / "instances.json").unlink()
        return dict(refcoco_root=root), r"refcoco/instances\.json: the refcoco instances file .* not found"
    if case == "no refs file":
        (root / "refcoco" / "refs(unc).p").unlink()
        return dict(refcoco_root=root), r"refcoco/refs\(unc\)\.p: the refcoco refs file not found"
    if case == "no refcoco folder":
        return dict(refcoco_root=tmp / "vqa"), "none of the data set folders"
    if case == "unknown split":
        return dict(refcoco_root=root, splits=("val", "tset")), r"split `tset` is in no refs file: .*'testA'"
    if case == "images elsewhere":
        return dict(refcoco_root=root, image_root=tmp / "nowhere"), "none of the 2 images of refcoco"
    if case == "questions without annotations":
        return dict(vqa_questions=q, vqa_images=images), r"questions\.json: a VQA questions file needs its annotations"
    if case == "annotations missing":
        return dict(vqa_questions=q, vqa_annotations=tmp / "nope.json", vqa_images=images), \
            r"nope\.json: VQA annotations file not found"
    if case == "malformed JSONL line":
        expr.write_text(good + "\n" + '{"image": "a.png", "expression": ' + "\n")
        return dict(expressions_jsonl=expr), r"expr\.jsonl:2: not valid JSON"
    if case == "bad box":
        expr.write_text(good + "\n\n" + json.dumps({"image": "a.png", "expression": "x", "box": [5, 5, 2, 9]}))
        return dict(expressions_jsonl=expr), r"expr\.jsonl:3: `box` should be \[x1, y1, x2, y2\]"
    if case == "no expression":
        expr.write_text(json.dumps({"image": "a.png"}))
        return dict(expressions_jsonl=expr), r"expr\.jsonl:1: `expression`: the referring expression is empty"
    if case == "no paper splits":
        write_refer(tmp / "other", refs=[("train", 11, ["e1"])])
        return dict(refcoco_root=tmp / "other"), r"no refs file has the splits papers report .*\['train'\]"
    if case == "nothing given":
        return {}, "nothing to evaluate"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["no instances.json", "no refs file", "no refcoco folder", "unknown split",
                                  "images elsewhere", "questions without annotations", "annotations missing",
                                  "malformed JSONL line", "bad box", "no expression", "no paper splits",
                                  "nothing given"])
def test_bad_input_is_one_line_naming_the_file(tmp_path, vlm, fake, case):
    kwargs, pattern = _bad_input(case, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(HarnessError, match=pattern) as info:
        run_eval(vlm, out, **kwargs)
    assert "\n" not in str(info.value)
    assert not fake.prompts and not (out / "results.json").exists()


def test_a_failed_run_leaves_no_results_that_look_complete(tmp_path, vlm, fake, monkeypatch):
    root = write_refer(tmp_path / "refer")
    out = tmp_path / "out"
    run_eval(vlm, out, refcoco_root=root, datasets=("refcoco",), limit=1)
    assert (out / "results.json").exists()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(vlm, "generate", crash)
    with pytest.raises(KeyboardInterrupt):
        run_eval(vlm, out, refcoco_root=root, datasets=("refcoco",))
    assert not any((out / f).exists() for f in ("results.json", "results.md", "results.tex"))
    assert len(_samples(out, "refcoco")) == 3  # the finished samples stay for the resume


# ------------------------------------------------------------------------------------ the scene world, the CLI hooks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = SceneWorldConfig(image_size=32, n_train=1, n_val=3, n_test=0, n_cls_train=0, n_cls_val=0)
    return build_world(tmp_path_factory.mktemp("world"), cfg, progress=False)


def test_scene_world_files_run_as_real_benchmarks(world, vlm, tmp_path):
    """Real generation (no fake) on a scene world: its REFER and VQAv2 files, its one answer repeated 10 times
    (soft accuracy is then exact match on the normalised answer)."""
    root = world.root
    res = run_eval(vlm, tmp_path / "out", refcoco_root=root, splits=("val",), vqa_questions=root / "vqa" /
                   "val_questions.json", vqa_annotations=root / "vqa" / "val_annotations.json",
                   vqa_images=root / "images" / "val", limit=4, max_new_tokens=6)
    assert set(res["results"]) == {"refcoco", "refcoco+", "refcocog", "vqav2"}
    assert res["results"]["refcoco"]["val"]["acc@0.5"]["n"] == 4
    for s in _samples(tmp_path / "out", "vqav2"):
        assert s["vqa_accuracy"] == float(normalize_vqa_answer(s["answer"]) == normalize_vqa_answer(s["target"]))


def test_eval_command_loads_a_saved_vlm_and_reports_bad_input(tmp_path, vlm, world, capsys):
    vlm.save(tmp_path / "model")
    parser = add_eval_arguments(argparse.ArgumentParser(prog="vlmtk eval"))
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--refcoco-root",
                              str(world.root), "--datasets", "refcoco,refcocog", "--splits", "val", "--limit", "3",
                              "--batch-size", "2", "--threads", "1", "--max-new-tokens", "4", "--device", "cpu"])
    assert eval_command(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["model"]["name"] == "model" and res["args"]["limit"] == 3
    assert "refcoco " in capsys.readouterr().out
    bad = parser.parse_args(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "o2"),
                             "--vqa-questions", str(world.root / "vqa" / "val_questions.json")])
    with pytest.raises(SystemExit) as info:
        eval_command(bad)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("vlmtk eval: error: ") and "\n" not in err
    with pytest.raises(SystemExit):
        eval_command(parser.parse_args(["--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "o3"),
                                        "--expressions", str(tmp_path / "x.jsonl")]))
    assert "is not a complete VLM run" in capsys.readouterr().err


def test_scene_world_evaluation_and_the_harness_give_the_same_answers(world, vlm, tmp_path, monkeypatch):
    """The same records in the same batches (the harness orders them by image; these already are): the same answers,
    scored alike, from real generation and from answers that are not boxes."""
    root = world.root
    refs, vqa = load_refcoco(root, "refcoco", "val"), load_vqa_split(root, "val")
    assert [r.image_path for r in refs] == sorted(r.image_path for r in refs)
    assert [r.image_path for r in vqa] == sorted(r.image_path for r in vqa)
    kwargs = dict(refcoco_root=root, datasets=("refcoco",), splits=("val",), vqa_questions=root / "vqa" /
                  "val_questions.json", vqa_annotations=root / "vqa" / "val_annotations.json",
                  vqa_images=root / "images" / "val", batch_size=5, max_new_tokens=6)
    box = GROUNDING_PROMPT.format(expression=refs[1].expression)
    for run, fake in (("real", None), ("not boxes", FakeGenerate({box: "[0.00, 0.00, 0.50, 0.50]"}))):
        if fake is not None:
            monkeypatch.setattr(vlm, "generate", fake)
        run_eval(vlm, tmp_path / run, **kwargs)
        g, q = evaluate_grounding(vlm, refs, 5, 6), evaluate_vqa(vlm, vqa, VQA_PROMPT, 5, 6)
        h = _samples(tmp_path / run, "refcoco")
        assert [(s["expression"], s["answer"], s["valid"], s["correct"]) for s in h] == \
            [(r["expression"], r["answer"], r["valid"], r["correct"]) for r in g], run
        assert [s["iou"] for s in h] == pytest.approx([r["iou"] for r in g], abs=1e-6)
        assert [s["answer"] for s in _samples(tmp_path / run, "vqav2")] == [r["answer"] for r in q]
    assert [r["valid"] for r in g] == [r.expression == refs[1].expression for r in refs]


def test_training_monitor_encodes_its_images_once_and_reads_as_without_the_cache(world, vlm, tiny_tokenizer,
                                                                                monkeypatch):
    """The backbone is frozen while a VLM trains: the monitor's first reading runs it, the later ones reuse its tokens,
    bit for bit the tokens (and so the answers) the uncached evaluation generates from."""
    records = [r for s in ("refcoco", "refcoco+", "refcocog") for r in load_refcoco(world.root, s, "val")]
    n_batches = -(-len(records) // 5)  # 3 images, 36 expressions: images recur within and across batches
    generated, real_generate = [], vlm.generate

    def generate(tokens, prompts, max_new_tokens=24):
        answers = real_generate(tokens, prompts, max_new_tokens)
        generated.append((tokens.clone(), answers))
        return answers

    monkeypatch.setattr(vlm, "generate", generate)
    encoded = []
    hook = vlm.backbone.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    try:
        monitor = grounding_monitor(records, batch_size=5, max_new_tokens=6)
        readings = [monitor(vlm) for _ in range(3)]
        assert len(encoded) == n_batches and sum(encoded) < len(records)  # the first reading, each image once a batch
        rows = evaluate_grounding(vlm, records, 5, 6)
        assert len(encoded) == 2 * n_batches
    finally:
        hook.remove()
    assert readings == [{"acc@0.5": sum(r["correct"] for r in rows) / len(rows)}] * 3
    uncached = generated[3 * n_batches:]
    for k in range(3):
        for (tokens, answers), (want_tokens, want_answers) in zip(generated[k * n_batches:(k + 1) * n_batches],
                                                                 uncached):
            assert torch.equal(tokens, want_tokens) and answers == want_answers
    other = tiny_vlm(tiny_tokenizer, "vit-test")  # one monitor watches each VLM of a run in turn: its own tokens
    hook = other.backbone.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    monitor(other)
    hook.remove()
    assert len(encoded) == 3 * n_batches
