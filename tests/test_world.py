"""Scene world invariants: geometry, checked expressions, exact VQA answers, determinism and caching."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from toolkit.data import (CLASS_NAMES, COLOURS, LOCATION_WORDS, SHAPES, SIZES, STYLES, Query, SceneObject,
                          SceneWorldConfig, build_world, load_annotation_pickle,
                          load_coco_instances, load_refcoco, load_vqa_split, parse_expression, render_expression,
                          render_scene, resolve)
from toolkit.data import world as world_module
from toolkit.data.world import COLOUR_RGB, MIN_VISIBLE, SPLITS

CFG = SceneWorldConfig(image_size=64, n_train=40, n_val=12, n_test=8, n_cls_train=48, n_cls_val=48)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), CFG, progress=False)


def _coco(world, split):
    return load_coco_instances(world.coco / f"instances_{split}.json", world.images)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("split", SPLITS)
def test_boxes_are_tight_visible_mask_boxes_and_match_coco(world, split):
    images = _coco(world, split)
    assert len(images) == CFG.scene_count(split)
    raw = json.loads((world.coco / f"instances_{split}.json").read_text())
    polygons = {a["id"]: a["segmentation"] for a in raw["annotations"]}
    for index, im in enumerate(images):
        scene = render_scene(CFG, split, index)
        assert CFG.min_objects <= len(scene.objects) <= CFG.max_objects
        assert scene.masks.sum(0).max() <= 1  # visible masks never overlap
        assert min(scene.visible_fraction) >= MIN_VISIBLE
        assert [(o.shape, o.colour, o.size, tuple(o.box)) for o in im.objects] == \
            [(o.shape, o.colour, o.size, o.box) for o in scene.objects]
        for o, mask, ann_id in zip(scene.objects, scene.masks, im.ann_ids):
            ys, xs = np.nonzero(mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 <= o.box[0] < o.box[2] <= CFG.image_size and 0 <= o.box[1] < o.box[3] <= CFG.image_size
            filled = np.zeros_like(mask, np.uint8)  # polygons are the outer contours of the visible mask
            cv2.fillPoly(filled, [np.array(p, np.int32).reshape(-1, 2) for p in polygons[ann_id]], 1)
            ys, xs = np.nonzero(filled)
            assert o.box[0] <= xs.min() and xs.max() < o.box[2] and o.box[1] <= ys.min() and ys.max() < o.box[3]
            assert (mask & ~filled.astype(bool)).sum() <= max(4, 0.05 * mask.sum())  # only 1-2 px slivers lack one


def test_resolver_semantics_on_a_hand_made_scene():
    s = 100
    objs = [SceneObject("square", "red", "small", (10, 40, 20, 50)),  # left
            SceneObject("square", "red", "large", (70, 40, 90, 60)),  # right
            SceneObject("circle", "blue", "small", (40, 10, 50, 20)),  # top middle
            SceneObject("square", "red", "small", (12, 80, 22, 90))]  # below the first, nearly same x
    assert resolve(Query(colour="red", shape="square"), objs, s) == {0, 1, 3}
    assert resolve(Query(shape="square", extreme="right"), objs, s) == {1}
    assert resolve(Query(shape="square", extreme="left"), objs, s) == {0, 3}  # within the margin: ambiguous
    assert resolve(Query(extreme="top"), objs, s) == {2}
    assert resolve(Query(size="small", colour="red", extreme="bottom"), objs, s) == {3}
    assert resolve(Query(shape="square", relation="above", anchor=Query(size="small", shape="square")), objs, s) \
        == set()  # the anchor is not unique
    assert resolve(Query(shape="square", relation="below", anchor=Query(shape="circle")), objs, s) == {0, 1, 3}
    assert resolve(parse_expression("the small red square that is above the blue circle"), objs, s) == set()
    assert resolve(parse_expression("red square on the right"), objs, s) == {1}
    for text in ("the leftmost red square", "red square on the right", "the top circle", "the large red square",
                 "blue star", "the small blue star to the left of the yellow circle",
                 "the green triangle that is above the red square", "the bottom object"):
        q = parse_expression(text)
        assert text in {render_expression(q, form) for form in range(4)}
    with pytest.raises(ValueError, match="not a scene-world referring expression"):
        parse_expression("the red square on the left at the top")


@pytest.mark.parametrize("style", STYLES)
def test_every_expression_resolves_to_exactly_its_target(world, style):
    refs = load_annotation_pickle(world.refs_dir(style) / {"refcocog": "refs(umd).p"}.get(style, "refs(unc).p"))
    ann_of_sent = {s["sent_id"]: r["ann_id"] for r in refs for s in r["sentences"]}
    n = 0
    for split in SPLITS:
        images = {str(im.image_path): im for im in _coco(world, split)}
        for r in load_refcoco(world.root, style, split):
            im = images[str(r.image_path)]
            target = im.ann_ids.index(ann_of_sent[r.sent_id])
            assert resolve(parse_expression(r.expression), im.objects, im.width) == {target}, r.expression
            assert r.box_xyxy == im.objects[target].box
            words = set(r.expression.split())
            assert words <= set(COLOURS + SHAPES + SIZES) | {"the", "object", "that", "is", "to", "of", "on", "at"} \
                | LOCATION_WORDS
            if style == "refcoco+":
                assert not words & LOCATION_WORDS, r.expression
            if style == "refcocog":
                assert parse_expression(r.expression).relation is not None
            n += 1
    assert n >= 2 * CFG.n_train  # about two referred objects per scene


def _np_matches(words: list[str], o: SceneObject) -> bool:
    """An independent reading of a noun phrase: every size/colour/shape word must match."""
    return all(w not in vocab or getattr(o, attr) == w
               for w in words for attr, vocab in (("size", SIZES), ("colour", COLOURS), ("shape", SHAPES)))


def _unique(words: list[str], objects) -> SceneObject:
    found = [o for o in objects if _np_matches(words, o)]
    assert len(found) == 1, (words, objects)
    return found[0]


def _answer(question: str, objects, size: int) -> str:
    """Answers recomputed from the COCO annotations, independently of the generator."""
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        *words, noun = m[1].split()
        noun = noun[:-2] if noun.endswith("sses") else noun[:-1]  # crosses -> cross, stars -> star
        return str(sum(_np_matches(words + [noun], o) for o in objects))
    if m := re.fullmatch(r"What color is the (.+)\?", question):
        return _unique(m[1].split(), objects).colour
    if m := re.fullmatch(r"What shape is the (.+) object\?", question):
        return _unique(m[1].split(), objects).shape
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if any(o.colour == m[1] and o.shape == m[2] for o in objects) else "no"
    m = re.fullmatch(r"Is the (.+) (to the left of|to the right of|above|below) the (.+)\?", question)
    a, b = _unique(m[1].split(), objects), _unique(m[3].split(), objects)
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.box, b.box
    dx, dy = (ax1 + ax2 - bx1 - bx2) / 2, (ay1 + ay2 - by1 - by2) / 2
    major, minor = {"to the left of": (-dx, dy), "to the right of": (dx, dy),
                    "above": (-dy, dx), "below": (dy, dx)}[m[2]]
    if major >= 0.1 * size and major >= 1.5 * abs(minor):
        return "yes"
    assert -major >= 0.1 * size and -major >= 1.5 * abs(minor), question  # a "no" asks the clear opposite
    return "no"


@pytest.mark.parametrize("split", SPLITS)
def test_vqa_answers_match_independent_recomputation(world, split):
    objects = {str(im.image_path): im.objects for im in _coco(world, split)}
    records = load_vqa_split(world.root, split)
    assert {r.question_type for r in records} == {"count", "color", "shape", "exists", "relation"}
    for r in records:
        assert r.answer == _answer(r.question, objects[str(r.image_path)], CFG.image_size), r.question
        assert len(r.answer.split()) == 1


def test_yes_no_answers_are_balanced(tmp_path):
    recs = load_vqa_split(build_world(tmp_path, SceneWorldConfig(image_size=32, n_train=400, n_val=0, n_test=0,
                                                                  n_cls_train=0, n_cls_val=0), progress=False).root,
                          "train")
    for qtype in ("exists", "relation"):
        answers = [r.answer for r in recs if r.question_type == qtype]
        assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_classification_set_is_an_image_folder(world):
    from torchvision.datasets import ImageFolder

    train, val = (ImageFolder(str(world.classification / s)) for s in ("train", "val"))
    assert train.classes == val.classes == sorted(c.replace(" ", "_") for c in CLASS_NAMES)
    assert len(train) == CFG.n_cls_train and len(val) == CFG.n_cls_val
    for i in range(0, len(train), 7):  # the label names the colour that is actually drawn
        image, label = train[i]
        colour = train.classes[label].split("_")[0]
        distance = np.abs(np.asarray(image, np.int32) - np.array(COLOUR_RGB[colour])).sum(-1)
        assert image.size == (CFG.image_size, CFG.image_size) and (distance < 60).sum() >= 5


def test_determinism_and_seed_sensitivity(tmp_path):
    cfg = SceneWorldConfig(image_size=48, n_train=6, n_val=3, n_test=3, n_cls_train=48, n_cls_val=48)
    a = build_world(tmp_path / "a", cfg, progress=False, workers=2)
    b = build_world(tmp_path / "b", cfg, progress=False, workers=1)  # output never depends on the worker count
    c = build_world(tmp_path / "c", replace(cfg, seed=1), progress=False)
    assert _files(a.root) == _files(b.root)
    ma, mc = (json.loads(p.manifest.read_text()) for p in (a, c))
    assert ma["content_sha256"] != mc["content_sha256"]
    assert (a.images / "train" / "000001.png").read_bytes() != (c.images / "train" / "000001.png").read_bytes()


def test_cache_hit_does_not_regenerate_and_config_change_does(tmp_path, monkeypatch):
    cfg = SceneWorldConfig(image_size=32, n_train=5, n_val=2, n_test=2, n_cls_train=0, n_cls_val=0)
    paths = build_world(tmp_path, cfg, progress=False)
    stamp = paths.manifest.stat().st_mtime_ns

    def boom(*args):
        raise AssertionError("regenerated a cached world")

    monkeypatch.setattr(world_module, "_scene_job", boom)
    assert build_world(tmp_path, cfg, progress=False) == paths
    assert paths.manifest.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    build_world(tmp_path, replace(cfg, n_train=3), progress=False)
    assert len(list((paths.images / "train").iterdir())) == 3  # stale files of the old config are gone
    assert json.loads(paths.manifest.read_text())["config"]["n_train"] == 3


def test_large_resolution_single_image(tmp_path):
    cfg = SceneWorldConfig(image_size=512, n_train=1, n_val=0, n_test=0, n_cls_train=0, n_cls_val=0)
    paths = build_world(tmp_path, cfg, progress=False, workers=1)
    (im,) = load_coco_instances(paths.coco / "instances_train.json", paths.images)
    assert cv2.imread(str(im.image_path)).shape == (512, 512, 3)
    scene = render_scene(cfg, "train", 0)
    assert [o.box for o in im.objects] == [o.box for o in scene.objects]
    for r in load_refcoco(paths.root, "refcocog", "train"):
        assert len(resolve(parse_expression(r.expression), im.objects, 512)) == 1


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_cls_val=10"):
        SceneWorldConfig(n_cls_val=10)
    with pytest.raises(ValueError, match="max_objects"):
        SceneWorldConfig(min_objects=3, max_objects=9)
