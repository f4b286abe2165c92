"""The evaluation harness on real benchmark files, written out as the field's evaluators write results.

:func:`run_eval` scores a :class:`~toolkit.vlm.VLM` on whatever it is given:

- **RefCOCO / RefCOCO+ / RefCOCOg** from the REFER layout (``{root}/{dataset}/refs({splitby}).p`` +
  ``{root}/{dataset}/instances.json``, read by :func:`toolkit.data.load_refcoco`), per dataset x split;
- **VQAv2** from a questions file and its annotations file (10 human answers per question);
- **your own expressions**: a JSONL file, one ``{"image", "expression", "box"?, "id"?}`` object per line.

Grounding, toolkit protocol (every split): the prompt is :data:`toolkit.boxes.GROUNDING_PROMPT`; the answer must parse
to 4 numbers in [0, 1] (:func:`toolkit.boxes.parse_box`, else *invalid*: IoU 0, wrong, centre miss); the parsed box is
mapped onto the ORIGINAL image's pixels through the model's own ``box_frame`` (``VLM.read_box``: "input" undoes the
model's resize/letterbox geometry, "original" divides by the original size); IoU with the ground-truth box in those
pixels. Metrics: ``acc@T`` = share with IoU >= T for T in 0.1/0.3/0.5/0.7/0.9, ``mean_iou``, ``center_acc`` (the
predicted box's centre lies inside the ground-truth box, edges included), ``invalid_rate``, ``error_rate`` (image could
not be read: counted as a wrong, invalid answer).

Grounding, Prismatic protocol (the same answers, val splits only; metric keys suffixed ``,prismatic``, rows with
``protocol="prismatic"``): what differs from the toolkit protocol is exactly

1. only the ``val`` split of each dataset is scored (testA/testB/test are not);
2. the parsed box is read as normalised by the ORIGINAL image size, whatever the model's ``box_frame`` (i.e.
   ``box_frame="original"``), and compared with the ground truth normalised by the original size; a model that answers
   in its letterboxed input frame (``box_frame="input"``) on a non-square image is scored against a shifted box;
3. only ``acc@0.5``, ``mean_iou`` and ``invalid_rate`` are reported (Prismatic's harness reports Acc@IoU>=0.5).

For a model with ``box_frame="original"`` both protocols give the same val numbers. Validity is the same parse in both
(4 literal numbers in [0, 1]; degenerate boxes with x2 <= x1 or y2 <= y1 are invalid here, which can only move a
wrong answer between "invalid" and "IoU 0").

VQAv2: ``exact_match`` (toolkit's :func:`~toolkit.eval.metrics.normalize_answer` of the answer equals that of the
``multiple_choice_answer``) and ``vqa_accuracy``, the official soft accuracy (:func:`vqa_soft_accuracy`) after the
official answer normalisation (:func:`normalize_vqa_answer`), overall (split ``all``) and per ``answer_type``.

Outputs in ``out_dir`` (see :func:`run_eval`): ``results.json``, ``samples_<task>.jsonl``, ``results.md``,
``results.tex``. Runs resume: samples already in a ``samples_<task>.jsonl`` are not recomputed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from toolkit.report import latex_table
from toolkit.boxes import GROUNDING_PROMPT, box_iou, normalize_box, parse_box
from toolkit.data.expressions import VQA_PROMPT
from toolkit.data.formats import REFS_FILE, FormatError, load_annotation_pickle, load_refcoco, load_vqa
from toolkit.eval.answers import Answer, answer_batch, batches
from toolkit.eval.metrics import metric_row, normalize_answer

REFCOCO_DATASETS = ("refcoco", "refcoco+", "refcocog")
REFCOCO_SPLITS = ("val", "testA", "testB")
# The splits papers report per data set (RefCOCOg's umd split has val/test): the default when no splits are given.
PAPER_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"),
                "refcocog": ("val", "test")}
IOU_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
GROUNDING_METRICS = tuple(f"acc@{t}" for t in IOU_THRESHOLDS) + ("mean_iou", "center_acc", "invalid_rate",
                                                                 "error_rate")
PRISMATIC_METRICS = ("acc@0.5", "mean_iou", "invalid_rate")
PRISMATIC_SPLITS = ("val",)
VQA_TASK = "vqav2"
EXPRESSIONS_TASK = "expressions"
# Tried in order when no VQA image pattern is given: VQAv2's own file names, then the scene world's.
VQA_IMAGE_PATTERNS = ("COCO_val2014_{image_id:012d}.jpg", "COCO_test2015_{image_id:012d}.jpg",
                      "COCO_train2014_{image_id:012d}.jpg", "{image_id:06d}.png", "{image_id:012d}.jpg",
                      "{image_id}.jpg", "{image_id}.png")
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_NEW_TOKENS = 32  # a box is ~9 tokens with the toolkit's tokenizer, ~25 with Llama's digit-wise one
RESULT_FILES = ("results.json", "results.md", "results.tex")
SAMPLES_FORMAT = 1  # bump when a sample line's meaning changes: older samples then count as another model's


class HarnessError(ValueError):
    """Bad input to the harness; the message is one line naming the file and what is wrong with it."""


# ------------------------------------------------------------------------------------ VQAv2 answer scoring

_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"  # every mark the official evaluator strips; apostrophe and colon stay
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions typed without their apostrophe -> the spelling the annotators' answers use.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the official VQAv2 evaluator compares it.

    In order: newlines/tabs become spaces and the ends are trimmed; punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @
    ` , ? !`` is deleted where it touches a space or where the text holds a comma between digits (``100,978`` ->
    ``100978``), else replaced by a space (``black-and-white`` -> ``black and white``); a period is deleted unless a
    digit follows it (``2.5`` stays); then, word by word after lower-casing, number words zero..ten (and "none")
    become digits, the articles a/an/the are dropped and apostrophe-less contractions get their apostrophe
    (``dont`` -> ``don't``).
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        if p not in text:
            continue
        if delete_all or (p + " ") in text or (" " + p) in text:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = []
    for w in text.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_soft_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one ``answer`` given the ``human_answers`` (10 in VQAv2), both normalised with
    :func:`normalize_vqa_answer`: for each human i, ``min(1, #(other humans who gave the answer) / 3)``, averaged over
    the 10 leave-one-out subsets of 9, as the official evaluator does. E.g. 4 or more of 10 humans -> 1.0, 3 -> 0.9,
    2 -> 0.6, 1 -> 0.3, 0 -> 0.0 (the common simplification ``min(1, matches / 3)`` gives 1, 2/3, 1/3 for 3, 2, 1).

    Fewer than 10 answers (data sets other than VQAv2, the scene world's files without an answer list): with n >= 2
    answers the same leave-one-out average is taken with the threshold scaled to 30% of the remaining annotators,
    ``3 * (n - 1) / 9`` (3 when n = 10; 10 or more answers keep 3); with a single answer the score is exact match
    against it (it is treated as unanimous, which is what 10 copies of it would give). Raises ValueError on none.
    """
    humans = [normalize_vqa_answer(h) for h in human_answers]
    if not humans:
        raise ValueError("soft accuracy needs at least one human answer")
    mine = normalize_vqa_answer(answer)
    n = len(humans)
    if n == 1:
        return float(mine == humans[0])
    threshold = 3.0 if n >= 10 else 3.0 * (n - 1) / 9
    matches = sum(h == mine for h in humans)
    return sum(min(1.0, (matches - (h == mine)) / threshold) for h in humans) / n


# ------------------------------------------------------------------------------------ geometry of scoring


def _iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """IoU of two xyxy boxes (any common unit, ``toolkit.boxes.box_iou``); 0 when either is missing."""
    if a is None or b is None:
        return 0.0
    return float(box_iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))


def _centre_inside(pred: Sequence[float] | None, target: Sequence[float]) -> bool:
    if pred is None:
        return False
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return bool(target[0] <= cx <= target[2] and target[1] <= cy <= target[3])


def _rounded(box: Sequence[float] | None, nd: int = 4) -> list[float] | None:
    return None if box is None else [round(float(v), nd) for v in box]


# ------------------------------------------------------------------------------------ work items


@dataclass
class _Item:
    id: str
    image: Path
    prompt: str
    meta: dict = field(default_factory=dict)  # copied into the sample line
    target_box: tuple[float, float, float, float] | None = None  # grounding: original pixels
    prismatic: bool = False  # grounding: also score under the Prismatic protocol
    human_answers: tuple[str, ...] = ()  # VQA
    target: str | None = None  # VQA multiple_choice_answer


@dataclass
class _Task:
    name: str  # results key and samples file stem
    kind: str  # "grounding" | "vqa"
    items: list[_Item]
    splits: list[str]


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise HarnessError(f"{path}: {what} not found" + (" (it is a directory)" if path.is_dir() else ""))


def _refcoco_tasks(root: Path, datasets: Sequence[str], splits: Sequence[str] | None, image_root: Path | None,
                   limit: int | None, log: Callable[[str], None]) -> list[_Task]:
    if not root.is_dir():
        raise HarnessError(f"{root}: RefCOCO root not found (expected {{root}}/{{dataset}}/refs(...).p and "
                           "instances.json)")
    present = [d for d in datasets if (root / d).is_dir()]
    if not present:
        raise HarnessError(f"{root}: none of the data set folders {list(datasets)} exists (REFER layout: "
                           "{root}/refcoco/refs(unc).p + {root}/refcoco/instances.json, ...)")
    for d in datasets:
        if d not in present:
            log(f"{d}: no folder {root / d}, skipped")
    have: dict[str, list[str]] = {}
    for d in present:
        if d not in REFS_FILE:
            raise HarnessError(f"unknown RefCOCO data set `{d}`; choose from {list(REFS_FILE)}")
        refs_path, inst_path = root / d / REFS_FILE[d], root / d / "instances.json"
        _check_file(refs_path, f"the {d} refs file")
        _check_file(inst_path, f"the {d} instances file (COCO annotations the refs point at)")
        try:
            refs = load_annotation_pickle(refs_path)
        except FormatError as e:
            raise HarnessError(str(e)) from None
        if not isinstance(refs, list) or not all(isinstance(r, dict) and "split" in r for r in refs):
            raise HarnessError(f"{refs_path}: should hold a list of refs, each with a `split`")
        have[d] = sorted({r["split"] for r in refs})
    for s in splits or ():
        if not any(s in have[d] for d in present):
            raise HarnessError(f"split `{s}` is in no refs file: " +
                               "; ".join(f"{root / d / REFS_FILE[d]} has {have[d]}" for d in present))
    tasks = []
    for d in present:
        items, kept = [], []
        for s in splits if splits is not None else PAPER_SPLITS.get(d, REFCOCO_SPLITS):
            if s not in have[d]:
                log(f"{d}: no split `{s}` in {root / d / REFS_FILE[d]} (it has {have[d]}), skipped")
                continue
            try:
                recs = load_refcoco(root, d, s, image_root=image_root)
            except (FormatError, ValueError) as e:
                raise HarnessError(str(e)) from None
            kept.append(s)
            for r in recs[:limit]:
                items.append(_Item(
                    id=f"{s}:{r.ref_id}:{r.sent_id}", image=Path(r.image_path),
                    prompt=GROUNDING_PROMPT.format(expression=r.expression),
                    meta=dict(dataset=d, split=s, ref_id=r.ref_id, sent_id=r.sent_id, expression=r.expression,
                              annotated_size=[r.image_width, r.image_height]),
                    target_box=tuple(float(v) for v in r.box_xyxy), prismatic=s in PRISMATIC_SPLITS))
        if kept:
            tasks.append(_Task(d, "grounding", items, kept))
    if not tasks:
        raise HarnessError(f"{root}: no refs file has the splits papers report (" + "; ".join(
            f"{root / d / REFS_FILE[d]} has {have[d]}" for d in present) + "); name the splits to score")
    return tasks


def _vqa_task(questions: Path, annotations: Path | None, images: Path | None, pattern: str | None,
              limit: int | None) -> _Task:
    _check_file(questions, "VQA questions file")
    if annotations is None:
        raise HarnessError(f"{questions}: a VQA questions file needs its annotations file (vqa_annotations / "
                           "--vqa-annotations), which holds the answers")
    _check_file(annotations, "VQA annotations file")
    if images is None or not Path(images).is_dir():
        raise HarnessError(f"{images}: VQA image folder not found (vqa_images / --vqa-images)")
    images = Path(images)
    chosen: list[str] = [pattern] if pattern else []

    def locate(image_id: int) -> Path:
        if not chosen:  # the first image decides the pattern for all
            for p in VQA_IMAGE_PATTERNS:
                if (images / p.format(image_id=image_id)).is_file():
                    chosen.append(p)
                    break
            else:
                raise HarnessError(f"{images}: no image for image_id {image_id} under any known name "
                                   f"({', '.join(VQA_IMAGE_PATTERNS)}); give the file-name pattern "
                                   "(vqa_image_pattern / --vqa-image-pattern)")
        return images / chosen[0].format(image_id=image_id)

    try:
        records = load_vqa(questions, annotations, locate)
        data = json.loads(annotations.read_text(encoding="utf-8"))
    except FormatError as e:
        raise HarnessError(str(e)) from None
    wanted = {r.question_id for r in records}
    humans: dict[int, tuple[tuple[str, ...], str]] = {}
    for i, a in enumerate(data["annotations"]):
        if a.get("question_id") not in wanted:
            continue
        answers = a.get("answers")
        if answers is None:
            got: tuple[str, ...] = (a["multiple_choice_answer"],)
        elif not (isinstance(answers, list) and answers and all(isinstance(x, dict) and isinstance(x.get("answer"), str)
                                                                 for x in answers)):
            raise HarnessError(f"{annotations}: `answers` of annotation #{i} should be a non-empty list of "
                               "{\"answer\": ...} objects")
        else:
            got = tuple(x["answer"] for x in answers)
        humans[a["question_id"]] = (got, str(a.get("answer_type", "all")))
    items = []
    for r in records[:limit]:
        answers, answer_type = humans[r.question_id]
        items.append(_Item(id=str(r.question_id), image=r.image_path, prompt=VQA_PROMPT.format(question=r.question),
                           meta=dict(question_id=r.question_id, question=r.question, question_type=r.question_type,
                                     answer_type=answer_type),
                           human_answers=answers, target=r.answer))
    return _Task(VQA_TASK, "vqa", items, ["all"])


def load_expressions(jsonl_path: str | Path, images_dir: str | Path | None = None,
                     errors: list[str] | None = None) -> list[dict]:
    """Read your own grounding data: one JSON object per line, ``{"image": "rel/path.png", "expression": "...",
    "box": [x1, y1, x2, y2] (optional, pixels of the image), "id": ... (optional)}``; blank lines are skipped.

    ``image`` is relative to ``images_dir`` (default: the JSONL file's folder) unless absolute. Returns dicts with
    ``id`` (the given one, else ``line<N>``), ``line`` (1-based), ``image`` (Path), ``expression`` (whitespace
    collapsed) and ``box`` (tuple of 4 floats or None). Raises :class:`HarnessError` naming ``file:line`` for a
    malformed line (bad JSON, a missing/empty field, a box that is not 4 finite numbers with x2 > x1, y2 > y1,
    a repeated id); with an ``errors`` list, that message is appended to it and the line skipped instead. A file
    without a single good line raises either way.
    """
    path = Path(jsonl_path)
    _check_file(path, "expressions file")
    base = Path(images_dir) if images_dir is not None else path.parent
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                e = _expression_line(line, f"{path}:{n}", base)
                if e["id"] is None:
                    e["id"] = f"line{n}"
                if e["id"] in seen:
                    raise HarnessError(f"{path}:{n}: id `{e['id']}` repeats an earlier line's")
            except HarnessError as err:
                if errors is None:
                    raise
                errors.append(str(err))
                continue
            seen.add(e["id"])
            out.append(dict(e, line=n))
    if not out:
        raise HarnessError(f"{path}: holds no expressions" + (f" ({len(errors)} malformed lines)" if errors else ""))
    return out


def _expression_line(line: str, where: str, base: Path) -> dict:
    """One line of an expressions file -> ``id`` (None when not given), ``image``, ``expression``, ``box``."""
    from toolkit.vlm import validate_expression

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise HarnessError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise HarnessError(f"{where}: should be a JSON object, got {type(obj).__name__}")
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise HarnessError(f"{where}: needs `image`, a path relative to {base}")
    try:
        expression = validate_expression(obj.get("expression"))
    except ValueError as e:
        raise HarnessError(f"{where}: `expression`: {e}") from None
    box = obj.get("box")
    if box is not None:
        ok = (isinstance(box, list) and len(box) == 4
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
              and box[2] > box[0] and box[3] > box[1])
        if not ok:
            raise HarnessError(f"{where}: `box` should be [x1, y1, x2, y2] in pixels with x2 > x1 and "
                               f"y2 > y1, got {box!r}")
        box = tuple(float(v) for v in box)
    return dict(id=str(obj["id"]) if obj.get("id") is not None else None, image=base / image, expression=expression,
                box=box)


def _expressions_task(jsonl: Path, images_dir: Path | None, limit: int | None) -> _Task:
    items = [_Item(id=e["id"], image=e["image"], prompt=GROUNDING_PROMPT.format(expression=e["expression"]),
                   meta=dict(line=e["line"], split="all", expression=e["expression"]), target_box=e["box"])
             for e in load_expressions(jsonl, images_dir)[:limit]]
    return _Task(EXPRESSIONS_TASK, "grounding", items, ["all"])


# ------------------------------------------------------------------------------------ answering and scoring


def model_fingerprint(vlm, max_new_tokens: int) -> str:
    """16 hex digits identifying what a sample's answer depends on: the model's config, its connector weights, the
    tokenizer's vocabulary size, ``max_new_tokens`` and the prompts. Samples of another fingerprint are never
    reused for a resume."""
    h = hashlib.sha256()
    h.update(json.dumps(vlm.cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps([max_new_tokens, GROUNDING_PROMPT, VQA_PROMPT, len(vlm.tokenizer), SAMPLES_FORMAT]).encode())
    for k, v in sorted(vlm.connector.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _score_grounding(vlm, it: _Item, a: Answer) -> dict:
    row = dict(it.meta)
    g, geom = a.box, None if a.box is None else a.box.geometry
    pred = None if g is None or not g.valid else g.box_pixels
    row.update(answer=a.text, valid=bool(g is not None and g.valid),
               parsed_box=_rounded(g.box_norm) if g is not None and g.valid else None,
               pred_box=_rounded(pred), target_box=_rounded(it.target_box),
               image_size=None if geom is None else [geom.orig_w, geom.orig_h], box_frame=vlm.cfg.box_frame)
    if it.target_box is None:
        row.update(iou=None, correct=None, center_hit=None)
    else:
        iou = _iou(pred, it.target_box)
        row.update(iou=round(iou, 6), correct=iou >= 0.5, center_hit=_centre_inside(pred, it.target_box))
    if it.prismatic:
        box = parse_box(a.text) if a.error is None else None
        target = None if geom is None else normalize_box(it.target_box, geom.orig_w, geom.orig_h)
        p_iou = _iou(box, target)
        row["prismatic"] = dict(valid=box is not None, target_box_norm=_rounded(target), iou=round(p_iou, 6),
                                correct=p_iou >= 0.5)
    return row


def _score_vqa(vlm, it: _Item, a: Answer) -> dict:
    row = dict(it.meta)
    soft = 0.0 if a.error is not None else vqa_soft_accuracy(a.text, it.human_answers)
    exact = a.error is None and normalize_answer(a.text) == normalize_answer(it.target)
    row.update(answer=a.text, answer_normalized=None if a.text is None else normalize_vqa_answer(a.text),
               target=it.target, human_answers=list(it.human_answers), exact_match=bool(exact),
               vqa_accuracy=round(soft, 6))
    return row


def _answer_batch(vlm, items: Sequence[_Item], max_new_tokens: int, score, fingerprint: str,
                  log: Callable[[str], None]) -> list[dict]:
    """Answer and score one batch (``answer_batch``: each distinct image read and encoded once; an unreadable one
    gives error rows)."""
    answers = answer_batch(vlm, [it.image for it in items], [it.prompt for it in items], max_new_tokens, log=log)
    return [dict(id=it.id, image=str(it.image), prompt=it.prompt, **score(vlm, it, a), error=a.error,
                 model=fingerprint) for it, a in zip(items, answers)]


def _read_samples(path: Path, fingerprint: str, log: Callable[[str], None]) -> dict[str, dict]:
    """Finished samples of an earlier (interrupted) run, by id; error rows are left out so they are retried.
    A half-written last line (a kill mid-write) is cut off the file."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
        log(f"{path}: dropped a half-written last line (an interrupted run); that sample is recomputed")
    done = {}
    for n, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            sid, fp = row["id"], row["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HarnessError(f"{path}:{n}: not a sample line of this harness ({type(e).__name__}); delete the file "
                               "to start that task over") from None
        if fp != fingerprint:
            raise HarnessError(f"{path}: holds samples of another model or settings (fingerprint {fp}, this run "
                               f"{fingerprint}); use another output folder or delete the file")
        if row.get("error"):
            done.pop(sid, None)
        else:
            done[sid] = row
    return done


def _run_task(vlm, task: _Task, path: Path, done: dict[str, dict], batch_size: int, max_new_tokens: int,
              fingerprint: str, log: Callable[[str], None]) -> list[dict]:
    """Answer and score the task's items not in ``done`` (finished samples by id), appending each batch's lines to
    ``path`` as it finishes; returns the samples of every item, in the items' order."""
    todo = [it for it in task.items if it.id not in done]
    todo.sort(key=lambda it: str(it.image))  # neighbours share images: each is encoded once per batch
    score = _score_grounding if task.kind == "grounding" else _score_vqa
    fresh: dict[str, dict] = {}
    with open(path, "a", encoding="utf-8") as f, \
            tqdm(total=len(task.items), initial=len(task.items) - len(todo), desc=task.name, unit="sample") as bar:
        for batch in batches(todo, batch_size):
            rows = _answer_batch(vlm, batch, max_new_tokens, score, fingerprint, log)
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
            fresh.update((r["id"], r) for r in rows)
            bar.update(len(rows))
    done.update(fresh)
    return [done[it.id] for it in task.items]


# ------------------------------------------------------------------------------------ metrics and files


def _grounding_rows(model: str, task: str, samples: Sequence[dict]) -> list[dict]:
    rows = []
    by_split = defaultdict(list)
    for s in samples:
        by_split[s["split"]].append(s)
    for split, ss in by_split.items():
        values: dict[str, list] = {}
        scored = [s for s in ss if s["iou"] is not None]  # own data: lines without a box are answered, not scored
        if scored:
            for t in IOU_THRESHOLDS:
                values[f"acc@{t}"] = [s["iou"] >= t for s in scored]
            values["mean_iou"] = [s["iou"] for s in scored]
            values["center_acc"] = [s["center_hit"] for s in scored]
        values["invalid_rate"] = [not s["valid"] for s in ss]
        values["error_rate"] = [s["error"] is not None for s in ss]
        rows += [dict(metric_row(model, task, split, m, v), protocol="toolkit") for m, v in values.items()]
        pris = [s["prismatic"] for s in ss if "prismatic" in s]
        if pris:
            values = {"acc@0.5": [p["correct"] for p in pris], "mean_iou": [p["iou"] for p in pris],
                      "invalid_rate": [not p["valid"] for p in pris]}
            rows += [dict(metric_row(model, task, split, m, v), protocol="prismatic") for m, v in values.items()]
    return rows


def _vqa_rows(model: str, samples: Sequence[dict]) -> list[dict]:
    rows = [metric_row(model, VQA_TASK, "all", "vqa_accuracy", [s["vqa_accuracy"] for s in samples]),
            metric_row(model, VQA_TASK, "all", "exact_match", [s["exact_match"] for s in samples]),
            metric_row(model, VQA_TASK, "all", "error_rate", [s["error"] is not None for s in samples])]
    by_type = defaultdict(list)
    for s in samples:
        by_type[s["answer_type"]].append(s["vqa_accuracy"])
    if len(by_type) > 1:
        rows += [metric_row(model, VQA_TASK, t, "vqa_accuracy", v) for t, v in sorted(by_type.items())]
    for r in rows:
        r["protocol"] = "toolkit"
    return rows


def _metric_key(row: dict) -> str:
    return row["metric"] if row["protocol"] == "toolkit" else f"{row['metric']},{row['protocol']}"


def _nested(rows: Sequence[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["task"], {}).setdefault(r["split"], {})[_metric_key(r)] = dict(
            value=r["value"], n=r["n"], ci_low=r["ci_low"], ci_high=r["ci_high"])
    return out


def _cell(r) -> str:
    if r["ci_low"] is None or (isinstance(r["ci_low"], float) and math.isnan(r["ci_low"])):
        return f"{r['value']:.4f}"
    return f"{r['value']:.4f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _tables(rows: Sequence[dict], model: str) -> list[tuple[str, pd.DataFrame]]:
    """(title, frame) pairs for results.md / results.tex."""
    df = pd.DataFrame(rows)
    if df.empty:
        return []
    df["cell"] = [_cell(r) for r in rows]
    df["key"] = [_metric_key(r) for r in rows]
    out = []
    g = df[df.task.isin(REFCOCO_DATASETS) & (df.protocol == "toolkit") & (df.metric == "acc@0.5")]
    if len(g):
        wide = pd.DataFrame([g.cell.tolist()], index=pd.Index([model], name="model"),
                            columns=[f"{t} {s}" for t, s in zip(g.task, g.split)])
        out.append(("RefCOCO Acc@0.5 as papers report it (toolkit protocol; boxes in original-image pixels)", wide))
    p = df[df.protocol == "prismatic"]
    if len(p):
        out.append(("Prismatic protocol: val only, answer read as normalised by the original image size",
                    p.pivot_table(index=["task", "split"], columns="metric", values="cell", aggfunc="first",
                                  sort=False)))
    for title, sel in (("Grounding, every metric (toolkit protocol)",
                        df.task.isin(REFCOCO_DATASETS + (EXPRESSIONS_TASK,)) & (df.protocol == "toolkit")),
                       ("VQAv2 (soft accuracy over the 10 leave-one-out subsets; exact match)", df.task == VQA_TASK)):
        sub = df[sel]
        if len(sub):
            table = sub.pivot_table(index=["task", "split"], columns="metric", values="cell", aggfunc="first",
                                    sort=False)
            n = sub.groupby(["task", "split"], sort=False).n.max()
            table.insert(0, "n", n.reindex(table.index).astype(int))
            out.append((title, table.fillna("")))
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for key, dist in (("toolkit", "vlm-backbone-toolkit"), ("transformers", "transformers")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = "unknown"
    return out


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


# ------------------------------------------------------------------------------------ the entry point


def run_eval(vlm, out_dir: str | Path, *, refcoco_root: str | Path | None = None,
             datasets: Sequence[str] = REFCOCO_DATASETS, splits: Sequence[str] | None = None,
             image_root: str | Path | None = None, vqa_questions: str | Path | None = None,
             vqa_annotations: str | Path | None = None, vqa_images: str | Path | None = None,
             vqa_image_pattern: str | None = None, expressions_jsonl: str | Path | None = None,
             images_dir: str | Path | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, limit: int | None = None, model_name: str | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Score ``vlm`` on every benchmark given and write the results into ``out_dir``; returns results.json's dict.

    Inputs (any combination, at least one):

    - ``refcoco_root``: the REFER layout, ``{root}/{dataset}/refs(unc|umd).p`` + ``{root}/{dataset}/instances.json``
      for each of ``datasets``; images under ``image_root`` (default ``{root}/images``) by the instances' file names.
      Each dataset x ``splits`` pair is scored (default ``splits=None``: the splits papers report, val/testA/testB for
      RefCOCO and RefCOCO+, val/test for RefCOCOg, :data:`PAPER_SPLITS`); a pair the refs file lacks (refcocog has
      val/test) is skipped with a log line, a split that no refs file has is an error naming the splits the files
      have. A data set whose folder
      is absent is skipped with a log line (an error if none of them exists); a folder lacking a file is an error.
    - ``vqa_questions`` + ``vqa_annotations`` (VQAv2 JSON), images in ``vqa_images`` named by ``vqa_image_pattern``
      (e.g. ``"COCO_val2014_{image_id:012d}.jpg"``; default: the first of :data:`VQA_IMAGE_PATTERNS` that exists).
    - ``expressions_jsonl`` (see :func:`load_expressions`) with ``images_dir``: every line is answered; lines with a
      ``box`` (pixels) are scored, under task ``expressions``, split ``all``.

    ``limit``: score only the first N records of each dataset x split / of the VQA file / of the expressions file.
    ``batch_size``: samples per generate call; ``max_new_tokens``: answer length cap (tokens).

    Writes into ``out_dir`` (created):

    - ``samples_<task>.jsonl`` (task: refcoco, refcoco+, refcocog, vqav2, expressions): one line per sample, appended
      and flushed batch by batch: id, image, prompt, answer, the scores (grounding: parsed_box normalised as answered,
      pred_box and target_box in original pixels, iou, correct (IoU >= 0.5), center_hit, valid and, on val, the
      Prismatic protocol's ``prismatic`` block; VQA: target, human_answers, answer_normalized, exact_match,
      vqa_accuracy), ``error`` (null, or why the image could not be read) and ``model`` (the model fingerprint).
      A rerun into the same folder reuses every finished sample (matched by id; error rows are retried) and only
      computes the rest; samples of another model/settings there are refused.
    - ``results.json`` (written last, atomically: present means complete): ``results[task][split][metric]`` =
      {value, n, ci_low, ci_high} (95% bootstrap intervals of the mean; metric keys of the Prismatic protocol end in
      ``,prismatic``), the same as flat ``rows`` (with a ``protocol`` column), the model's name, config and
      fingerprint, the versions of toolkit/torch/transformers/python, the arguments, notes and image errors.
    - ``results.md`` and ``results.tex``: the tables.

    Bad input raises :class:`HarnessError` (one line naming the file) before any model work; stale result files in
    ``out_dir`` are removed when the work starts, so a failed run never leaves results that look complete. An image
    that cannot be read is an error row (wrong, invalid; logged with its path; counted in ``error_rate``); an answer
    that is not a box is invalid, never an exception.
    """
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        log(msg)

    if batch_size < 1:
        raise HarnessError(f"batch_size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise HarnessError(f"limit must be at least 1, got {limit}")
    tasks: list[_Task] = []
    if refcoco_root is not None:
        tasks += _refcoco_tasks(Path(refcoco_root), list(datasets), None if splits is None else list(splits),
                                Path(image_root) if image_root is not None else None, limit, note)
    if vqa_questions is not None or vqa_annotations is not None:
        if vqa_questions is None:
            raise HarnessError(f"{vqa_annotations}: a VQA annotations file needs its questions file "
                               "(vqa_questions / --vqa-questions)")
        tasks.append(_vqa_task(Path(vqa_questions), None if vqa_annotations is None else Path(vqa_annotations),
                               None if vqa_images is None else Path(vqa_images), vqa_image_pattern, limit))
    if expressions_jsonl is not None:
        tasks.append(_expressions_task(Path(expressions_jsonl), None if images_dir is None else Path(images_dir),
                                       limit))
    elif images_dir is not None:
        raise HarnessError(f"{images_dir}: an images folder was given without an expressions file (--expressions)")
    if not tasks:
        raise HarnessError("nothing to evaluate: give a RefCOCO root, VQA questions + annotations, or an "
                           "expressions JSONL file")
    for task in tasks:  # a wrong image folder is one error, not one error row per sample
        paths = {it.image for it in task.items}
        if paths and not any(p.is_file() for p in paths):
            raise HarnessError(f"{next(iter(paths)).parent}: none of the {len(paths)} images of {task.name} is "
                               f"there (e.g. {next(iter(paths)).name}); check the image folder argument")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model_name or vlm.cfg.backbone
    fingerprint = model_fingerprint(vlm, max_new_tokens)
    paths = {t.name: out_dir / f"samples_{t.name}.jsonl" for t in tasks}
    finished = {t.name: _read_samples(paths[t.name], fingerprint, note) for t in tasks}  # refuses foreign samples
    for name in RESULT_FILES:  # a failed run must not leave an older run's results looking like its own
        (out_dir / name).unlink(missing_ok=True)
    was_training = vlm.training
    vlm.eval()
    t0 = time.perf_counter()
    samples: dict[str, list[dict]] = {}
    try:
        for task in tasks:
            samples[task.name] = _run_task(vlm, task, paths[task.name], finished[task.name], batch_size,
                                           max_new_tokens, fingerprint, log)
    finally:
        vlm.train(was_training)
    seconds = time.perf_counter() - t0

    rows: list[dict] = []
    for task in tasks:
        ss = samples[task.name]
        rows += _grounding_rows(model, task.name, ss) if task.kind == "grounding" else _vqa_rows(model, ss)
    rows = [{k: r[k] for k in ("backbone", "task", "split", "protocol", "metric", "value", "n", "ci_low", "ci_high")}
            for r in rows]
    errors = [dict(task=t, id=s["id"], image=s["image"], error=s["error"])
              for t, ss in samples.items() for s in ss if s["error"]]
    args = dict(refcoco_root=refcoco_root, datasets=list(datasets), splits=None if splits is None else list(splits),
                image_root=image_root,
                vqa_questions=vqa_questions, vqa_annotations=vqa_annotations, vqa_images=vqa_images,
                vqa_image_pattern=vqa_image_pattern, expressions_jsonl=expressions_jsonl, images_dir=images_dir,
                batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit)
    result = _json_safe(dict(
        harness="toolkit.eval.harness", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=dict(name=model, fingerprint=fingerprint, config=vlm.cfg.to_dict()),
        versions=_versions(), args=args,
        protocols=dict(toolkit="every split; answer mapped to original-image pixels through the model's box_frame "
                               f"(`{vlm.cfg.box_frame}`); IoU in pixels",
                       prismatic="val only; answer read as normalised by the original image size; Acc@0.5"),
        results=_nested(rows), rows=rows,
        n_samples={t.name: {s: sum(x.get("split", "all") == s for x in samples[t.name]) for s in t.splits}
                   for t in tasks},
        seconds_this_run=round(seconds, 3), notes=notes, errors=errors))

    tables = _tables(rows, model)
    md = [f"# Evaluation: {model}", "",
          f"Model fingerprint `{fingerprint}`; box_frame `{vlm.cfg.box_frame}`; versions: " +
          ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
          "Cells: value [95% bootstrap interval]. Grounding boxes are compared in the original image's pixels.", ""]
    for title, table in tables:
        md += [f"## {title}", "", table.reset_index().to_markdown(index=False), ""]
    if errors:
        md += ["## Images that could not be read (scored as wrong)", ""] + [f"- {e['task']} `{e['id']}`: {e['error']}"
                                                                           for e in errors] + [""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    _atomic_write(out_dir / "results.md", "\n".join(md))
    _atomic_write(out_dir / "results.tex", "\n".join(latex_table(t, df) for t, df in tables))
    _atomic_write(out_dir / "results.json", json.dumps(result, indent=2))  # last: its presence means complete
    return result


# ------------------------------------------------------------------------------------ CLI hooks


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``vlmtk eval`` arguments to ``parser`` (returns it); :func:`eval_command` runs them."""
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a VLM directory (as VLM.save writes it), or a release (Prismatic) run directory "
                             "with --llm and --vision-weights")
    parser.add_argument("--llm", metavar="DIR", help="release run dirs: the LLM's local Hugging Face directory")
    parser.add_argument("--vision-weights", metavar="FILE",
                        help="release run dirs: the backbone's official weights file")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: results.json/.md/.tex and samples_<task>.jsonl; rerun to resume")
    parser.add_argument("--refcoco-root", metavar="DIR",
                        help="REFER layout root: {root}/{dataset}/refs(unc|umd).p + instances.json")
    parser.add_argument("--datasets", default=",".join(REFCOCO_DATASETS),
                        help="comma-separated RefCOCO data sets (default: %(default)s)")
    parser.add_argument("--splits", default=None,
                        help="comma-separated splits, e.g. val,testA,testB (default: the splits papers report: "
                             "val,testA,testB for refcoco and refcoco+, val,test for refcocog)")
    parser.add_argument("--image-root", metavar="DIR", help="where the instances' file names live (default "
                                                            "{refcoco-root}/images)")
    parser.add_argument("--vqa-questions", metavar="JSON", help="VQAv2 questions file")
    parser.add_argument("--vqa-annotations", metavar="JSON", help="VQAv2 annotations file (the answers)")
    parser.add_argument("--vqa-images", metavar="DIR", help="folder of the VQA images")
    parser.add_argument("--vqa-image-pattern", default=None,
                        help="VQA image file name, e.g. 'COCO_val2014_{image_id:012d}.jpg' (default: detected)")
    parser.add_argument("--expressions", metavar="JSONL",
                        help='your own data: {"image": ..., "expression": ..., "box": [x1, y1, x2, y2]} per line')
    parser.add_argument("--images", metavar="DIR", help="folder the expressions' images are relative to "
                                                        "(default: the JSONL's folder)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="samples per generate call (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="answer length cap in tokens (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each dataset x split / file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    return parser


def eval_command(args: argparse.Namespace) -> int:
    """Run ``vlmtk eval`` from parsed :func:`add_eval_arguments` arguments: load the VLM, :func:`run_eval`, print
    the headline numbers and where the files are. Bad input prints one ``vlmtk eval: error: ...`` line to stderr and
    exits with status 2 (SystemExit); returns 0 on success."""
    def split_list(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from toolkit.vlm import VLM

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            if (Path(args.model) / "checkpoints").is_dir():  # a release run directory
                if not (args.llm and args.vision_weights):
                    raise HarnessError(f"{args.model} is a release run directory: give --llm (the LLM's local "
                                       f"directory) and --vision-weights (the backbone's official file)")
                vlm = VLM.from_prismatic(args.model, args.llm, args.vision_weights).to(device).eval()
            else:
                vlm = VLM.load(args.model).to(device).eval()
        except (FileNotFoundError, ValueError, OSError) as e:
            raise HarnessError(f"{args.model}: cannot load the VLM ({(str(e).splitlines() or [''])[0]})") from None
        res = run_eval(vlm, args.out, refcoco_root=args.refcoco_root, datasets=split_list(args.datasets),
                       splits=split_list(args.splits) if args.splits else None, image_root=args.image_root,
                       vqa_questions=args.vqa_questions, vqa_annotations=args.vqa_annotations,
                       vqa_images=args.vqa_images,
                       vqa_image_pattern=args.vqa_image_pattern, expressions_jsonl=args.expressions,
                       images_dir=args.images, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       limit=args.limit, model_name=Path(args.model).name)
    except HarnessError as e:
        print(f"vlmtk eval: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for task, per_split in res["results"].items():
        for split, metrics in per_split.items():
            shown = [f"{k} {metrics[k]['value']:.4f}" for k in ("acc@0.5", "acc@0.5,prismatic", "vqa_accuracy",
                                                                  "exact_match") if k in metrics]
            if shown:
                print(f"{task:12s} {split:8s} n={max(m['n'] for m in metrics.values()):6d}  " + "  ".join(shown))
    if res["errors"]:
        print(f"{len(res['errors'])} image(s) could not be read; see results.md")
    print(f"Results: {Path(args.out) / 'results.json'}  {Path(args.out) / 'results.md'}  "
          f"{Path(args.out) / 'results.tex'}  samples_<task>.jsonl")
    return 0
