"""Real-format writers and loaders: round trips, the real key sets, the safe unpickler and clear errors."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from toolkit.boxes import GROUNDING_PROMPT, format_box, normalize_box
from toolkit.data import (VQA_PROMPT, FormatError, RefExample, SceneObject, SceneWorldConfig,
                          VQAExample, build_world, load_annotation_pickle, load_coco_instances,
                          load_coco_semantic, load_llava, load_refcoco, load_vqa, load_vqa_split, scene_objects)
from toolkit.data.expressions import QA
from toolkit.data.formats import AnnotatedImage, write_annotations


def _record(image_id: int, split: str) -> AnnotatedImage:
    objects = [SceneObject("circle", "red", "small", (2, 3, 12, 13)),
               SceneObject("star", "blue", "large", (20, 4, 60, 40))]
    return AnnotatedImage(
        image_id=image_id, split=split, file_name=f"{split}/{image_id:06d}.png", width=64, height=48, objects=objects,
        areas=[80, 700], polygons=[[[2, 3, 11, 3, 11, 12, 2, 12]], [[20, 4, 59, 4, 40, 39]]],
        refs={"refcoco": [(1, ["the rightmost object", "the star"])], "refcoco+": [(0, ["red circle"])],
              "refcocog": [(0, ["the circle to the left of the star"]), (1, ["the star to the right of the circle"])]},
        vqa=[QA("How many objects are there?", "2", "count"), QA("Is there a blue star?", "yes", "exists")])


RECORDS = [_record(1, "train"), _record(2, "val")]


@pytest.fixture()
def written(tmp_path):
    write_annotations(tmp_path, RECORDS)
    return tmp_path


def test_coco_semantic_labels_follow_polygons_categories_and_crowds(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "a.png", "width": 8, "height": 6}],
            "categories": [{"id": 3, "name": "star"}, {"id": 1, "name": "circle"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 0,
                 "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
                {"id": 2, "image_id": 7, "category_id": 1, "bbox": [2, 2, 3, 3], "iscrowd": 0,  # drawn on top
                 "segmentation": [[2, 2, 5, 2, 5, 5, 2, 5]]},
                {"id": 3, "image_id": 7, "category_id": 1, "bbox": [6, 0, 2, 2], "iscrowd": 1,
                 "segmentation": {"counts": [0, 4], "size": [6, 8]}}]}
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    paths, labels, names = load_coco_semantic(tmp_path / "inst.json", tmp_path, (6, 8))
    assert names == ["circle", "star"] and paths == [tmp_path / "a.png"]  # classes by category id: 1 circle, 2 star
    y = labels[0]
    assert y[0, 0] == 2 and y[3, 3] == 1 and y[5, 0] == 0  # star, circle over the star, background
    assert (y[0:2, 6:8] == 255).all()  # crowd region left out of the loss
    half = load_coco_semantic(tmp_path / "inst.json", tmp_path, (3, 4))[1][0]
    assert half.shape == (3, 4) and half[0, 0] == 2
    coco["annotations"][0]["category_id"] = 9
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    with pytest.raises(FormatError, match="category_id 9"):
        load_coco_semantic(tmp_path / "inst.json", tmp_path, (6, 8))


def test_coco_round_trip_and_keys(written):
    (im,) = load_coco_instances(written / "coco" / "instances_val.json", written / "images")
    assert (im.image_id, im.image_path, im.width, im.height) == (2, written / "images" / "val" / "000002.png", 64, 48)
    assert im.objects == tuple(RECORDS[1].objects) and im.ann_ids == (20, 21)
    data = json.loads((written / "coco" / "instances_val.json").read_text())
    assert set(data) == {"images", "annotations", "categories"}
    ann = data["annotations"][1]
    assert ann["bbox"] == [20, 4, 40, 36] and ann["iscrowd"] == 0 and ann["area"] == 700
    assert ann["segmentation"] == [[20, 4, 59, 4, 40, 39]]
    assert {c["name"] for c in data["categories"]} >= {"circle", "star"}


def test_refcoco_round_trip_and_real_keys(written):
    refs = load_annotation_pickle(written / "refcocog" / "refs(umd).p")
    assert set(refs[0]) == {"ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids", "category_id",
                            "file_name"}
    assert set(refs[0]["sentences"][0]) == {"tokens", "raw", "sent", "sent_id"}
    assert refs[0]["sentences"][0]["tokens"] == ["the", "circle", "to", "the", "left", "of", "the", "star"]
    assert (written / "refcoco+" / "refs(unc).p").is_file() and (written / "refcoco+" / "instances.json").is_file()
    got = load_refcoco(written, "refcoco", "val")
    path = written / "images" / "val" / "000002.png"
    assert got == [RefExample(path, "the rightmost object", (20, 4, 60, 40), 64, 48, 1, 2, "refcoco", "val"),
                   RefExample(path, "the star", (20, 4, 60, 40), 64, 48, 1, 3, "refcoco", "val")]
    assert got[0].box_norm == normalize_box((20, 4, 60, 40), 64, 48)
    assert [r.expression for r in load_refcoco(written, "refcocog", "train")] == \
        ["the circle to the left of the star", "the star to the right of the circle"]
    with pytest.raises(ValueError, match=r"no split `testA`.*\['train', 'val'\]"):
        load_refcoco(written, "refcoco", "testA")


def test_vqa_round_trip_and_real_keys(written):
    got = load_vqa_split(written, "train")
    path = written / "images" / "train" / "000001.png"
    assert got == [VQAExample(path, "How many objects are there?", "2", "count", 1000),
                   VQAExample(path, "Is there a blue star?", "yes", "exists", 1001)]
    ann = json.loads((written / "vqa" / "train_annotations.json").read_text())["annotations"][1]
    assert set(ann) == {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"}
    assert ann["answer_type"] == "yes/no" and len(ann["answers"]) == 10
    assert set(ann["answers"][0]) == {"answer", "answer_confidence", "answer_id"}
    real_style = load_vqa(written / "vqa" / "train_questions.json", written / "vqa" / "train_annotations.json",
                          lambda image_id: f"COCO_train2014_{image_id:012d}.jpg")
    assert str(real_style[0].image_path) == "COCO_train2014_000000000001.jpg"


def test_llava_round_trip(written):
    (conv,) = load_llava(written / "llava" / "val.json", written)
    assert conv.id == "000002" and conv.image_path == written / "images" / "val" / "000002.png"
    box = format_box(normalize_box((20, 4, 60, 40), 64, 48))
    assert conv.turns[0] == ("<image>\n" + GROUNDING_PROMPT.format(expression="the rightmost object"), box)
    assert conv.turns[-1] == (VQA_PROMPT.format(question="Is there a blue star?"), "yes")
    assert VQA_PROMPT.endswith("\nAnswer the question using a single word or phrase.")
    assert len(conv.turns) == 5 + 2 and sum(h.startswith("<image>") for h, _ in conv.turns) == 1


def test_world_formats_agree_with_each_other(tmp_path):
    cfg = SceneWorldConfig(image_size=64, n_train=12, n_val=6, n_test=0, n_cls_train=0, n_cls_val=0)
    world = build_world(tmp_path, cfg, progress=False)
    for split in ("train", "val"):
        convs = load_llava(world.llava / f"{split}.json", world.root)
        turns = {(str(c.image_path), h.replace("<image>\n", ""), g) for c in convs for h, g in c.turns}
        refs = {(str(r.image_path), GROUNDING_PROMPT.format(expression=r.expression), format_box(r.box_norm))
                for style in ("refcoco", "refcoco+", "refcocog") for r in load_refcoco(world.root, style, split)}
        vqa = {(str(r.image_path), VQA_PROMPT.format(question=r.question), r.answer)
               for r in load_vqa_split(world.root, split)}
        assert turns == refs | vqa
        boxes = scene_objects(world.root, split)
        assert len(boxes) == cfg.scene_count(split)
        assert all(r.box_xyxy in boxes[str(r.image_path)] for r in load_refcoco(world.root, "refcoco", split))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "refcoco" / "refs(unc).p"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps([{"ref_id": 0, "sentences": _Evil(marker)}], protocol=2))
    with pytest.raises(FormatError, match=r"refs\(unc\)\.p.*refusing to load global `(posix|os)\.system`"):
        load_annotation_pickle(evil)
    with pytest.raises(FormatError, match="refusing"):
        load_refcoco(tmp_path, "refcoco", "val")
    assert not marker.exists()
    plain = tmp_path / "plain.p"
    value = [{"a": [1, 2.5, "x", None, True, (1, 2)], "b": {"c": -3}}]
    plain.write_bytes(pickle.dumps(value, protocol=2))
    assert load_annotation_pickle(plain) == value


@pytest.mark.parametrize("rel,edit,message", [
    ("vqa/train_questions.json", lambda d: d["questions"][0].pop("question"), "question #0 has no key `question`"),
    ("vqa/train_annotations.json", lambda d: d["annotations"][1].pop("multiple_choice_answer"),
     "annotation #1 has no key `multiple_choice_answer`"),
    ("vqa/train_annotations.json", lambda d: d.pop("annotations"), "the file has no key `annotations`"),
    ("llava/train.json", lambda d: d[0].pop("conversations"), "record #0 has no key `conversations`"),
    ("llava/train.json", lambda d: d[0]["conversations"].pop(0), "should alternate human/gpt"),
    ("coco/instances_train.json", lambda d: d["annotations"][0].pop("bbox"), "has no key `bbox`"),
    ("refcoco/instances.json", lambda d: d["images"][0].pop("file_name"), "has no key `file_name`"),
])
def test_malformed_files_name_the_file_and_the_key(written, rel, edit, message):
    path = written / rel
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    loaders = {"vqa": lambda: load_vqa_split(written, "train"),
               "llava": lambda: load_llava(written / "llava" / "train.json", written),
               "coco": lambda: load_coco_instances(written / "coco" / "instances_train.json", written / "images"),
               "refcoco": lambda: load_refcoco(written, "refcoco", "train")}
    with pytest.raises(FormatError, match=rf"{path.name}.*{message}"):
        loaders[rel.split("/")[0]]()


def test_invalid_json_and_bad_refs_name_the_file(written):
    (written / "llava" / "val.json").write_text("[{not json")
    with pytest.raises(FormatError, match=r"val\.json: not valid JSON"):
        load_llava(written / "llava" / "val.json", written)
    refs_path = written / "refcoco" / "refs(unc).p"
    refs = load_annotation_pickle(refs_path)
    del refs[0]["sentences"]
    refs_path.write_bytes(pickle.dumps(refs))
    with pytest.raises(FormatError, match=r"refs\(unc\)\.p: ref #0 has no key `sentences`"):
        load_refcoco(written, "refcoco", "train")


