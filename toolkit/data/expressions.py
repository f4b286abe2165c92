"""The scene world's language: vocabulary, structured queries, the resolver, referring expressions and VQA.

Every referring expression is rendered from a structured :class:`Query`, parsed back from its *text* by
:func:`parse_expression`, and kept only when :func:`resolve` finds exactly its target: the check runs on the
emitted string, so a rendering bug cannot slip an ambiguous or wrong expression into the data.

Geometry (all on the tight boxes of the visible masks, ``margin = MARGIN * image_size``):

- ``holds(a, b, rel)``: a is "left"/"right"/"above"/"below" of b, judged on the offset between box centres
  along rel's axis (``major``, signed) and across it (``minor``). *Strict* (what targets and yes/no questions
  must satisfy): ``major >= margin`` and ``major >= 1.5 * |minor|``, so at most one relation holds. *Loose* (a
  possible reading, what the resolver accepts): ``major > 0`` and ``major >= |minor| / 1.5``, so a diagonal
  neighbour reads as both "left" and "above". An expression is emitted only when no other object could
  plausibly be meant.
- ``extreme`` ("the leftmost red square", "the top circle"): among the objects matching the attributes, every
  one whose centre lies within ``margin`` of the extreme centre matches; it is unique only with a clear gap.

The vocabulary is small and regular on purpose: it trains a tokenizer from scratch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES = ("small", "medium", "large")
STYLES = ("refcoco", "refcoco+", "refcocog")
ATTRIBUTES = ("size", "colour", "shape")
QUESTION_TYPES = ("count", "color", "shape", "exists", "relation")
VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer suffix
# Words that place an object; refcoco+ expressions never contain any of them.
LOCATION_WORDS = frozenset({"left", "right", "top", "bottom", "upper", "lower", "middle", "center", "centre",
                            "leftmost", "rightmost", "topmost", "bottommost", "above", "below"})
MARGIN = 0.1  # fraction of the image side that separates "clearly" from "too close to call"

_PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
_DIRECTION = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}  # (axis, sign) of the offset
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_REL_TEXT = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_PREFIX_TEXT = {"left": "leftmost", "right": "rightmost", "top": "top", "bottom": "bottom"}
_SUFFIX_TEXT = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_EXTREME_OF = {text: ext for table in (_PREFIX_TEXT, _SUFFIX_TEXT) for ext, text in table.items()}


@dataclass(frozen=True)
class SceneObject:
    """One object as annotated: ``box`` is the tight xyxy box of its visible mask, in pixels (x2, y2 exclusive)."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass(frozen=True)
class Query:
    """A structured referring expression: attributes (None = unconstrained), optionally an extreme position
    among the matching objects (refcoco) or a relation to a uniquely described anchor (refcocog)."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None
    extreme: str | None = None  # "left" | "right" | "top" | "bottom"
    relation: str | None = None  # "left" | "right" | "above" | "below"
    anchor: Query | None = None

    def matches(self, obj: SceneObject) -> bool:
        return all(getattr(self, a) in (None, getattr(obj, a)) for a in ATTRIBUTES)

    def noun_phrase(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape or "object") if w)


def holds(a: SceneObject, b: SceneObject, rel: str, image_size: int, strict: bool = True) -> bool:
    """Whether ``a`` is ``rel`` ("left", "right", "above", "below") of ``b`` (see the module docstring)."""
    axis, sign = _DIRECTION[rel]
    d = (a.centre[0] - b.centre[0], a.centre[1] - b.centre[1])
    major, minor = sign * d[axis], abs(d[1 - axis])
    if strict:
        return major >= MARGIN * image_size and major >= 1.5 * minor
    return major > 0 and major >= minor / 1.5


def relation(a: SceneObject, b: SceneObject, image_size: int) -> str | None:
    """The strict relation of ``a`` to ``b``, or None when none is clear (at most one can hold)."""
    return next((rel for rel in _DIRECTION if holds(a, b, rel, image_size)), None)


def resolve(query: Query, objects: Sequence[SceneObject], image_size: int) -> set[int]:
    """Indices of the objects ``query`` can mean. A relational query whose anchor is not unique means nothing."""
    cand = {i for i, o in enumerate(objects) if query.matches(o)}
    if query.relation is not None:
        anchors = resolve(query.anchor, objects, image_size)
        if len(anchors) != 1:
            return set()
        (a,) = anchors
        cand = {i for i in cand if i != a and holds(objects[i], objects[a], query.relation, image_size, strict=False)}
    if query.extreme is not None and cand:
        axis, sign = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}[query.extreme]
        key = {i: sign * objects[i].centre[axis] for i in cand}
        best = min(key.values())
        cand = {i for i in cand if key[i] < best + MARGIN * image_size}
    return cand


def render_expression(query: Query, form: int = 0) -> str:
    """Text of ``query``; ``form`` picks among equivalent surface forms (article, prefix/suffix, "that is")."""
    np_ = query.noun_phrase()
    if query.extreme is not None:
        return f"the {_PREFIX_TEXT[query.extreme]} {np_}" if form % 2 == 0 else \
            f"{'the ' if form % 4 == 1 else ''}{np_} {_SUFFIX_TEXT[query.extreme]}"
    if query.relation is not None:
        link = "that is " if form % 2 else ""
        return f"the {np_} {link}{_REL_TEXT[query.relation]} the {query.anchor.noun_phrase()}"
    return f"the {np_}" if form % 2 == 0 else np_


def _np_regex(tag: str) -> str:
    return (rf"(?:(?P<{tag}size>{'|'.join(SIZES)}) )?(?:(?P<{tag}colour>{'|'.join(COLOURS)}) )?"
            rf"(?P<{tag}shape>{'|'.join(SHAPES)}|object)")


_EXPR_RE = re.compile(
    rf"(?:the )?(?:(?P<prefix>{'|'.join(_PREFIX_TEXT.values())}) )?{_np_regex('t')}"
    rf"(?: (?P<suffix>{'|'.join(_SUFFIX_TEXT.values())}))?"
    rf"(?: (?:that is )?(?P<rel>{'|'.join(_REL_TEXT.values())}) the {_np_regex('a')})?")


def parse_expression(text: str) -> Query:
    """Inverse of :func:`render_expression` for every form it writes; ValueError on anything else."""
    m = _EXPR_RE.fullmatch(" ".join(text.lower().split()))
    if m is None or (m["prefix"] and m["suffix"]):
        raise ValueError(f"not a scene-world referring expression: {text!r}")

    def attrs(tag: str) -> dict:
        return dict(size=m[tag + "size"], colour=m[tag + "colour"],
                    shape=None if m[tag + "shape"] == "object" else m[tag + "shape"])

    extreme = _EXTREME_OF.get(m["prefix"] or m["suffix"])
    if m["rel"] is None:
        return Query(**attrs("t"), extreme=extreme)
    rel = next(k for k, v in _REL_TEXT.items() if v == m["rel"])
    return Query(**attrs("t"), extreme=extreme, relation=rel, anchor=Query(**attrs("a")))


def _appearance_queries(obj: SceneObject) -> list[Query]:
    """Queries built from the non-empty subsets of the object's own attributes."""
    return [Query(**{a: getattr(obj, a) for a in subset}) for k in (1, 2, 3) for subset in combinations(ATTRIBUTES, k)]


def _unique_description(objects: Sequence[SceneObject], i: int, image_size: int,
                        subsets: Sequence[Sequence[str]]) -> Query | None:
    """The first attribute subset (in the order given) that picks out object ``i`` alone."""
    for subset in subsets:
        q = Query(**{a: getattr(objects[i], a) for a in subset})
        if resolve(q, objects, image_size) == {i}:
            return q
    return None


def candidate_queries(objects: Sequence[SceneObject], target: int, image_size: int,
                      style: str) -> list[tuple[Query, float]]:
    """Every query of ``style`` that resolves to ``target`` alone, with a sampling weight.

    refcoco prefers location words and uses them only where the attributes alone match several objects;
    refcoco+ is appearance only; refcocog relates the target to a uniquely described, clearly placed anchor.
    """
    t = objects[target]
    unique = [q for q in _appearance_queries(t) if resolve(q, objects, image_size) == {target}]
    if style == "refcoco+":
        return [(q, 1.0) for q in unique]
    if style == "refcoco":
        out = [(q, 1.0) for q in unique]
        for base in [Query()] + _appearance_queries(t):
            if sum(base.matches(o) for o in objects) < 2:
                continue
            for ext in _PREFIX_TEXT:
                q = replace(base, extreme=ext)
                if resolve(q, objects, image_size) == {target}:
                    out.append((q, 3.0))
        return out
    if style != "refcocog":
        raise ValueError(f"unknown style `{style}`; choose one of {STYLES}")
    out = []
    for a in range(len(objects)):
        rel = relation(t, objects[a], image_size) if a != target else None
        anchor = rel and _unique_description(objects, a, image_size, [("colour", "shape"), ("shape",), ("colour",),
                                                                       ("size", "colour", "shape")])
        if not anchor:
            continue
        for base in _appearance_queries(t):
            q = replace(base, relation=rel, anchor=anchor)
            if resolve(q, objects, image_size) == {target}:
                n_attrs = sum(getattr(base, x) is not None for x in ATTRIBUTES)
                needed = resolve(base, objects, image_size) != {target}  # the relation does the work
                out.append((q, (1.0 + n_attrs) * (2.0 if needed else 1.0)))
    return out


def generate_refs(objects: Sequence[SceneObject], image_size: int, style: str, rng: np.random.Generator,
                  max_refs: int = 2, max_sentences: int = 2) -> list[tuple[int, list[str]]]:
    """Up to ``max_refs`` referred objects, each with up to ``max_sentences`` distinct checked expressions."""
    refs = []
    for target in rng.permutation(len(objects)).tolist():
        options = candidate_queries(objects, target, image_size, style)
        if not options:
            continue
        w = np.array([o[1] for o in options])
        picks = rng.choice(len(options), size=min(max_sentences, len(options)), replace=False, p=w / w.sum())
        sentences = []
        for p in picks.tolist():
            text = render_expression(options[p][0], int(rng.integers(4)))
            if resolve(parse_expression(text), objects, image_size) != {target}:
                raise RuntimeError(f"generated expression {text!r} does not resolve to its target alone")
            if text not in sentences:
                sentences.append(text)
        refs.append((target, sentences))
        if len(refs) == max_refs:
            break
    return refs


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    question_type: str


def generate_vqa(objects: Sequence[SceneObject], image_size: int, rng: np.random.Generator) -> list[QA]:
    """At most one question of each type, with single-word answers computed from the structured scene.

    "exists" and "relation" are yes/no with a fair coin: a "no" relation asks the opposite of a strict one.
    """
    out = []
    o = objects[int(rng.integers(len(objects)))]
    colour = o.colour if rng.random() < 0.75 else str(rng.choice(COLOURS))
    shape = o.shape if rng.random() < 0.75 else str(rng.choice(SHAPES))
    q, test = [(f"How many {colour} objects are there?", lambda x: x.colour == colour),
               (f"How many {_PLURAL[shape]} are there?", lambda x: x.shape == shape),
               (f"How many {colour} {_PLURAL[shape]} are there?", lambda x: x.colour == colour and x.shape == shape),
               ("How many objects are there?", lambda x: True)][int(rng.integers(4))]
    out.append(QA(q, str(sum(test(x) for x in objects)), "count"))

    for qtype, subsets, ask in (("color", [("shape",), ("size", "shape")], "What color is"),
                                ("shape", [("colour",), ("size", "colour")], "What shape is")):
        described = [(i, d) for i in range(len(objects))
                     if (d := _unique_description(objects, i, image_size, subsets)) is not None]
        if described:
            i, d = described[int(rng.integers(len(described)))]
            out.append(QA(f"{ask} the {d.noun_phrase()}?", getattr(objects[i], "colour" if qtype == "color"
                                                                             else "shape"), qtype))

    present = {(x.colour, x.shape) for x in objects}
    if rng.random() < 0.5:
        c, s = o.colour, o.shape
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
    out.append(QA(f"Is there a {c} {s}?", "yes" if (c, s) in present else "no", "exists"))

    subsets = [("colour", "shape"), ("size", "colour", "shape")]
    pairs = [(i, j, r) for i in range(len(objects)) for j in range(len(objects))
             if i != j and (r := relation(objects[i], objects[j], image_size)) is not None]
    pairs = [(i, j, r, di, dj) for i, j, r in pairs
             if (di := _unique_description(objects, i, image_size, subsets))
             and (dj := _unique_description(objects, j, image_size, subsets))]
    if pairs:
        i, j, r, di, dj = pairs[int(rng.integers(len(pairs)))]
        yes = rng.random() < 0.5
        asked = r if yes else _OPPOSITE[r]
        out.append(QA(f"Is the {di.noun_phrase()} {_REL_TEXT[asked]} the {dj.noun_phrase()}?",
                      "yes" if yes else "no", "relation"))
    return out
