"""Writers and loaders of the real annotation formats (COCO, RefCOCO/REFER, VQAv2, LLaVA).

The scene world is written in exactly these formats and read back only through these loaders, so the loaders
that would read the real data sets are exercised for real. Layout of a generated world root::

    manifest.json                         config, generator version, content hash, counts
    images/{split}/{image_id:06d}.png     scenes; image ids are unique across train/val/test
    coco/instances_{split}.json           COCO instances (bbox xywh, polygons, extra keys colour/size)
    refcoco/instances.json                COCO instances over all splits (REFER layout; same file in each folder)
    refcoco/refs(unc).p                   REFER refs pickle: ref_id, ann_id, image_id, split, sentences, ...
    refcoco+/refs(unc).p, refcoco+/instances.json
    refcocog/refs(umd).p, refcocog/instances.json
    vqa/{split}_questions.json            VQAv2 questions
    vqa/{split}_annotations.json          VQAv2 annotations (10 answers each)
    llava/{split}.json                    LLaVA conversations mixing grounding and VQA turns
    classification/{split}/{colour}_{shape}/{idx:06d}.png   ImageFolder (train, val)

Image ``file_name`` values are relative to ``images/`` (``"val/000123.png"``). Boxes are the tight boxes of the
visible masks; COCO ``bbox`` is ``[x, y, w, h]`` in pixels, loaders return xyxy pixels. VQA ``question_type``
holds the world's question types (count/color/shape/exists/relation) rather than VQAv2's question prefixes.

Pickle is read only for the REFER refs files because that is the official format of RefCOCO/+/g; it goes
through an unpickler that resolves no globals at all, so a file can build dicts, lists, strings and numbers
but can never import or call anything.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from toolkit.boxes import GROUNDING_PROMPT, format_box, normalize_box
from toolkit.data.expressions import QA, SHAPES, STYLES, VQA_PROMPT, SceneObject

REFS_FILE = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p"}
_ANSWER_TYPE = {"count": "number", "color": "other", "shape": "other", "exists": "yes/no", "relation": "yes/no"}


class FormatError(ValueError):
    """A malformed annotation file; the message names the file and what is wrong or missing in it."""


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RefExample:
    """One referring expression; ``box_xyxy`` in pixels of the original image."""

    image_path: Path
    expression: str
    box_xyxy: tuple[float, float, float, float]
    image_width: int
    image_height: int
    ref_id: int
    sent_id: int
    dataset: str
    split: str

    @property
    def box_norm(self) -> tuple[float, float, float, float]:
        """The box normalised by the original image size, as the harness scores it."""
        return normalize_box(self.box_xyxy, self.image_width, self.image_height)


@dataclass(frozen=True)
class VQAExample:
    image_path: Path
    question: str
    answer: str  # VQAv2's multiple_choice_answer
    question_type: str
    question_id: int


@dataclass(frozen=True)
class ConversationExample:
    """A LLaVA record; ``image_path`` is None for text-only records (the real LLaVA mix has some)."""

    id: str
    image_path: Path | None
    turns: tuple[tuple[str, str], ...]  # (human, gpt) pairs


@dataclass(frozen=True)
class CocoImage:
    """A COCO image with its objects; colour/size are None when the file lacks those extra keys (real COCO)."""

    image_id: int
    image_path: Path
    width: int
    height: int
    objects: tuple[SceneObject, ...]
    ann_ids: tuple[int, ...]


@dataclass(frozen=True)
class AnnotatedImage:
    """A generated scene as the writers take it: objects, their masks' areas and polygons, expressions, QA."""

    image_id: int
    split: str
    file_name: str  # relative to images/
    width: int
    height: int
    objects: list[SceneObject]
    areas: list[int]
    polygons: list[list[list[int]]]
    refs: dict[str, list[tuple[int, list[str]]]]  # style -> [(object index, sentences)]
    vqa: list[QA]

    def ann_id(self, k: int) -> int:
        return self.image_id * 10 + k  # at most 8 objects per scene


# ----------------------------------------------------------------------------------------------- writers


def mask_polygons(mask: np.ndarray) -> list[list[int]]:
    """COCO polygons (flat x, y lists) of the outer contours of ``mask (H, W)``; pieces under 3 points dropped."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).tolist() for c in contours if len(c) >= 3]


def coco_instances(records: Sequence[AnnotatedImage]) -> dict:
    images, annotations = [], []
    for r in records:
        images.append({"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height})
        for k, (o, area, poly) in enumerate(zip(r.objects, r.areas, r.polygons)):
            x1, y1, x2, y2 = o.box
            annotations.append({"id": r.ann_id(k), "image_id": r.image_id, "category_id": SHAPES.index(o.shape) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0,
                                "segmentation": poly, "colour": o.colour, "size": o.size})
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def refer_refs(records: Sequence[AnnotatedImage], dataset: str) -> list[dict]:
    """The REFER refs list of ``dataset`` with the real keys; ref and sentence ids count from 0 per data set."""
    refs, sent_id = [], 0
    for r in records:
        for k, sentences in r.refs[dataset]:
            sents = [{"tokens": s.split(), "raw": s, "sent": s, "sent_id": sent_id + j}
                     for j, s in enumerate(sentences)]
            sent_id += len(sents)
            refs.append({"ref_id": len(refs), "ann_id": r.ann_id(k), "image_id": r.image_id, "split": r.split,
                         "sentences": sents, "sent_ids": [s["sent_id"] for s in sents],
                         "category_id": SHAPES.index(r.objects[k].shape) + 1,
                         "file_name": f"{Path(r.file_name).stem}_{r.ann_id(k)}.png"})
    return refs


def vqa_files(records: Sequence[AnnotatedImage]) -> tuple[dict, dict]:
    """VQAv2 (questions, annotations) dicts; the single exact answer is repeated as the 10 human answers."""
    questions, annotations = [], []
    for r in records:
        for k, qa in enumerate(r.vqa):
            qid = r.image_id * 1000 + k
            questions.append({"image_id": r.image_id, "question": qa.question, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": r.image_id, "question_type": qa.question_type,
                                "answer_type": _ANSWER_TYPE[qa.question_type], "multiple_choice_answer": qa.answer,
                                "answers": [{"answer": qa.answer, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i in range(10)]})
    return {"questions": questions}, {"annotations": annotations}


def llava_conversations(records: Sequence[AnnotatedImage]) -> list[dict]:
    """One conversation per image: every distinct expression as a grounding turn, then its VQA turns."""
    out = []
    for r in records:
        turns, seen = [], set()
        for style in STYLES:
            for k, sentences in r.refs[style]:
                box = format_box(normalize_box(r.objects[k].box, r.width, r.height))
                for s in sentences:
                    if s not in seen:
                        seen.add(s)
                        turns.append((GROUNDING_PROMPT.format(expression=s), box))
        turns += [(VQA_PROMPT.format(question=qa.question), qa.answer) for qa in r.vqa]
        conv = []
        for j, (human, gpt) in enumerate(turns):
            conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + human}, {"from": "gpt", "value": gpt}]
        out.append({"id": f"{r.image_id:06d}", "image": f"images/{r.file_name}", "conversations": conv})
    return out


OBJECTS_PROMPT = "List every object in the image with its bounding box."


def object_list_turn(image: CocoImage) -> tuple[str, str]:
    """An auxiliary training turn (prompt, answer) that names every object of a COCO image with its box, left to
    right: ``"red star [0.10, 0.20, 0.35, 0.45]; blue circle [...]"``. It asks the LM to read every object's
    appearance and position off the image tokens, with no expression to resolve first: the skill grounding builds on."""
    objs = sorted(image.objects, key=lambda o: (o.box[0], o.box[1]))
    parts = [f"{o.colour + ' ' if o.colour else ''}{o.shape} {format_box(normalize_box(o.box, image.width, image.height))}"
             for o in objs]
    return OBJECTS_PROMPT, "; ".join(parts)


def _dump(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def write_annotations(root: str | Path, records: Sequence[AnnotatedImage]) -> dict[str, str]:
    """Write every annotation file of the layout; returns {relative path: sha256}."""
    root, out = Path(root), {}
    splits = sorted({r.split for r in records}, key=["train", "val", "test"].index)
    for split in splits:
        recs = [r for r in records if r.split == split]
        out[f"coco/instances_{split}.json"] = _dump(root / "coco" / f"instances_{split}.json",
                                                    _json_bytes(coco_instances(recs)))
        questions, annotations = vqa_files(recs)
        out[f"vqa/{split}_questions.json"] = _dump(root / "vqa" / f"{split}_questions.json", _json_bytes(questions))
        out[f"vqa/{split}_annotations.json"] = _dump(root / "vqa" / f"{split}_annotations.json",
                                                     _json_bytes(annotations))
        out[f"llava/{split}.json"] = _dump(root / "llava" / f"{split}.json", _json_bytes(llava_conversations(recs)))
    instances = _json_bytes(coco_instances(records))
    for dataset in STYLES:
        out[f"{dataset}/instances.json"] = _dump(root / dataset / "instances.json", instances)
        # pickle's memo follows object identity (strings shared or not, e.g. after crossing processes); a JSON
        # round trip rebuilds the refs from their values alone, so the bytes are a function of the content
        refs = json.loads(_json_bytes(refer_refs(records, dataset)))
        out[f"{dataset}/{REFS_FILE[dataset]}"] = _dump(root / dataset / REFS_FILE[dataset],
                                                      pickle.dumps(refs, protocol=2))
    return out


# ----------------------------------------------------------------------------------------------- loaders


class _AnnotationUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load global `{module}.{name}`: annotation pickles may hold only "
                                     "dicts, lists, strings and numbers")


def load_annotation_pickle(path: str | Path) -> Any:
    """Read an annotation pickle (REFER refs) without resolving any global, so no code can run.

    Python 2 byte strings (the original files) are decoded as latin-1, which never fails.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _AnnotationUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise FormatError(f"{path}: not a plain annotation pickle ({e})") from None


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


def _req(obj: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: {where} should be an object with key `{key}`, got {type(obj).__name__}")
    if key not in obj:
        raise FormatError(f"{path}: {where} has no key `{key}`")
    return obj[key]


def _req_list(obj: Any, key: str, path: Path, where: str) -> list:
    value = _req(obj, key, path, where)
    if not isinstance(value, list):
        raise FormatError(f"{path}: `{key}` of {where} should be a list, got {type(value).__name__}")
    return value


def _xyxy(ann: dict, path: Path, where: str) -> tuple[float, float, float, float]:
    bbox = _req(ann, "bbox", path, where)
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise FormatError(f"{path}: `bbox` of {where} should be [x, y, w, h], got {bbox!r}")
    x, y, w, h = bbox
    return (x, y, x + w, y + h)


def _index(items: list, path: Path, what: str) -> dict:
    return {_req(it, "id", path, f"{what} #{i}"): it for i, it in enumerate(items)}


def load_coco_instances(json_path: str | Path, image_root: str | Path) -> list[CocoImage]:
    """A COCO instances file -> images with their objects (category name as shape, bbox as xyxy pixels)."""
    path, image_root = Path(json_path), Path(image_root)
    data = _read_json(path)
    cats = {cid: _req(c, "name", path, f"category {cid}") for cid, c in
            _index(_req_list(data, "categories", path, "the file"), path, "category").items()}
    by_image: dict[int, list] = {}
    for i, a in enumerate(_req_list(data, "annotations", path, "the file")):
        by_image.setdefault(_req(a, "image_id", path, f"annotation #{i}"), []).append((i, a))
    out = []
    for i, im in enumerate(_req_list(data, "images", path, "the file")):
        where = f"image #{i}"
        objects, ann_ids = [], []
        for j, a in by_image.get(_req(im, "id", path, where), []):
            cid = _req(a, "category_id", path, f"annotation #{j}")
            if cid not in cats:
                raise FormatError(f"{path}: annotation #{j} has category_id {cid}, not among the categories")
            objects.append(SceneObject(cats[cid], a.get("colour"), a.get("size"), _xyxy(a, path, f"annotation #{j}")))
            ann_ids.append(_req(a, "id", path, f"annotation #{j}"))
        out.append(CocoImage(im["id"], image_root / _req(im, "file_name", path, where), _req(im, "width", path, where),
                             _req(im, "height", path, where), tuple(objects), tuple(ann_ids)))
    return out


def load_refcoco(root: str | Path, dataset: str = "refcoco", split: str = "val", splitby: str | None = None,
                 image_root: str | Path | None = None) -> list[RefExample]:
    """Referring expressions of ``split`` from the REFER layout: ``{root}/{dataset}/refs({splitby}).p`` plus
    ``{root}/{dataset}/instances.json``; boxes come from the referred annotation's bbox, one record per sentence.

    ``splitby`` defaults to the official one (unc for refcoco/refcoco+, umd for refcocog); ``image_root``
    (where the instances' file names live) defaults to ``{root}/images``.
    """
    root = Path(root)
    splitby = splitby or {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}.get(dataset)
    if splitby is None:
        raise ValueError(f"no default splitby for data set `{dataset}`; pass splitby= (e.g. 'unc', 'umd', 'google')")
    refs_path, inst_path = root / dataset / f"refs({splitby}).p", root / dataset / "instances.json"
    image_root = Path(image_root) if image_root is not None else root / "images"
    refs = load_annotation_pickle(refs_path)
    if not isinstance(refs, list):
        raise FormatError(f"{refs_path}: should hold a list of refs, got {type(refs).__name__}")
    inst = _read_json(inst_path)
    images = _index(_req_list(inst, "images", inst_path, "the file"), inst_path, "image")
    anns = _index(_req_list(inst, "annotations", inst_path, "the file"), inst_path, "annotation")
    out, splits = [], set()
    for i, ref in enumerate(refs):
        where = f"ref #{i}"
        splits.add(_req(ref, "split", refs_path, where))
        if ref["split"] != split:
            continue
        ann_id, image_id = _req(ref, "ann_id", refs_path, where), _req(ref, "image_id", refs_path, where)
        if ann_id not in anns or image_id not in images:
            raise FormatError(f"{refs_path}: {where} points at annotation {ann_id} / image {image_id}, "
                              f"which {inst_path} lacks")
        img = images[image_id]
        box = _xyxy(anns[ann_id], inst_path, f"annotation {ann_id}")
        path = image_root / _req(img, "file_name", inst_path, f"image {image_id}")
        w, h = _req(img, "width", inst_path, f"image {image_id}"), _req(img, "height", inst_path, f"image {image_id}")
        for j, sent in enumerate(_req_list(ref, "sentences", refs_path, where)):
            out.append(RefExample(path, _req(sent, "sent", refs_path, f"{where} sentence #{j}"), box, w, h,
                                  _req(ref, "ref_id", refs_path, where),
                                  _req(sent, "sent_id", refs_path, f"{where} sentence #{j}"), dataset, split))
    if split not in splits:
        raise ValueError(f"{refs_path} has no split `{split}`; it has {sorted(splits)}")
    return out


def load_vqa(questions_json: str | Path, annotations_json: str | Path,
             images: str | Path | Callable[[int], str | Path], pattern: str = "{image_id:06d}.png") -> list[VQAExample]:
    """VQAv2 questions joined with their annotations by question_id.

    ``images`` is a directory (file names from ``pattern``; VQAv2's own is ``COCO_val2014_{image_id:012d}.jpg``)
    or a function from image id to path.
    """
    qpath, apath = Path(questions_json), Path(annotations_json)
    locate = images if callable(images) else (lambda i: Path(images) / pattern.format(image_id=i))
    anns = {}
    for i, a in enumerate(_req_list(_read_json(apath), "annotations", apath, "the file")):
        anns[_req(a, "question_id", apath, f"annotation #{i}")] = (i, a)
    out = []
    for i, q in enumerate(_req_list(_read_json(qpath), "questions", qpath, "the file")):
        qid = _req(q, "question_id", qpath, f"question #{i}")
        if qid not in anns:
            raise FormatError(f"{apath}: no annotation for question_id {qid} of {qpath}")
        j, a = anns[qid]
        out.append(VQAExample(Path(locate(_req(q, "image_id", qpath, f"question #{i}"))),
                              _req(q, "question", qpath, f"question #{i}"),
                              _req(a, "multiple_choice_answer", apath, f"annotation #{j}"),
                              _req(a, "question_type", apath, f"annotation #{j}"), qid))
    return out


def load_vqa_split(root: str | Path, split: str) -> list[VQAExample]:
    """The world's VQA ``split`` through :func:`load_vqa`."""
    root = Path(root)
    return load_vqa(root / "vqa" / f"{split}_questions.json", root / "vqa" / f"{split}_annotations.json",
                    root / "images" / split)


def load_llava(json_path: str | Path, image_root: str | Path) -> list[ConversationExample]:
    """A LLaVA conversation file; ``image`` paths are relative to ``image_root``; turns pair human with gpt."""
    path, image_root = Path(json_path), Path(image_root)
    data = _read_json(path)
    if not isinstance(data, list):
        raise FormatError(f"{path}: should hold a list of conversations, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        where = f"record #{i}"
        conv = _req_list(rec, "conversations", path, where)
        roles = [_req(m, "from", path, f"{where} message #{j}") for j, m in enumerate(conv)]
        if len(conv) % 2 or roles != ["human", "gpt"] * (len(conv) // 2):
            raise FormatError(f"{path}: {where} should alternate human/gpt messages, got {roles}")
        values = [_req(m, "value", path, f"{where} message #{j}") for j, m in enumerate(conv)]
        image = rec.get("image")
        out.append(ConversationExample(str(_req(rec, "id", path, where)), image_root / image if image else None,
                                       tuple(zip(values[::2], values[1::2]))))
    return out


IGNORE_PIXEL = 255  # label of pixels no loss should see (COCO crowd regions)


def load_coco_semantic(json_path: str | Path, image_root: str | Path, label_hw: tuple[int, int] | None = None,
                       stride: int | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """A COCO instances file -> semantic segmentation targets: image paths, label maps ``(N, h, w)`` uint8 at
    ``label_hw``, or at 1/``stride`` of each image's own size (0 background, i + 1 the i-th category by id,
    ``IGNORE_PIXEL`` crowd regions), category names.

    Polygons are filled at the image's own size in annotation order (later ones on top) and the map is then
    resized with nearest-neighbour sampling, so every label size reads the same annotation.
    """
    if (label_hw is None) == (stride is None):
        raise ValueError("give the label size either as label_hw or as stride, not both or neither")
    path, image_root = Path(json_path), Path(image_root)
    data = _read_json(path)
    cats = sorted(_index(_req_list(data, "categories", path, "the file"), path, "category").items())
    if len(cats) >= IGNORE_PIXEL:
        raise FormatError(f"{path}: {len(cats)} categories do not fit uint8 labels")
    label_of = {cid: i + 1 for i, (cid, _) in enumerate(cats)}
    by_image: dict[int, list] = {}
    for i, a in enumerate(_req_list(data, "annotations", path, "the file")):
        by_image.setdefault(_req(a, "image_id", path, f"annotation #{i}"), []).append((i, a))
    paths, maps = [], []
    for i, im in enumerate(_req_list(data, "images", path, "the file")):
        where = f"image #{i}"
        h, w = _req(im, "height", path, where), _req(im, "width", path, where)
        full = np.zeros((h, w), np.uint8)
        for j, a in by_image.get(_req(im, "id", path, where), []):
            seg = a.get("segmentation")
            if a.get("iscrowd") or not isinstance(seg, list):  # RLE crowd masks: the box is left out of the loss
                x1, y1, x2, y2 = (int(round(v)) for v in _xyxy(a, path, f"annotation #{j}"))
                full[max(0, y1):y2, max(0, x1):x2] = IGNORE_PIXEL
                continue
            cid = _req(a, "category_id", path, f"annotation #{j}")
            if cid not in label_of:
                raise FormatError(f"{path}: annotation #{j} has category_id {cid}, not among the categories")
            polys = [np.asarray(p, np.float64).reshape(-1, 2).round().astype(np.int32) for p in seg if len(p) >= 6]
            cv2.fillPoly(full, polys, int(label_of[cid]))
        lh, lw = label_hw or (h // stride, w // stride)
        maps.append(cv2.resize(full, (lw, lh), interpolation=cv2.INTER_NEAREST))
        paths.append(image_root / _req(im, "file_name", path, where))
    return paths, np.stack(maps) if maps else np.zeros((0, *(label_hw or (0, 0))), np.uint8), [c["name"] for _, c in cats]


def scene_objects(root: str | Path, split: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """``{str(image_path): [object boxes, xyxy pixels]}`` of a world split (read from its COCO file)."""
    root = Path(root)
    return {str(im.image_path): [o.box for o in im.objects]
            for im in load_coco_instances(root / "coco" / f"instances_{split}.json", root / "images")}
