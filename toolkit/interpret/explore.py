"""One image and expression explored across backbones: a map type's options as menus, its map for every backbone,
and the whole comparison as JSON. The Gradio app and the notebook widgets both stand on these.

A front end shows one map type for every selected backbone side by side, with one set of options. ``option_controls``
turns the map type's declared options (``toolkit.interpret.maps``) into menus over all of them: the union of each
backbone's choices and, where an option admits a whole type, the values its ``menu`` lists (other values of the
type can still be typed). A query patch is shared as a point of the ORIGINAL image (``PixelPoint``): backbones differ
in grid and input frame, so each looks from its own cell that holds the point; ``click_query`` turns a click on the
image into the query menu's entry for the cell under it. ``gallery_maps`` computes the map for every backbone, or
says why one has none; ``analysis_json`` exports answers, boxes, IoU and the maps (nested lists on their grid, with
the geometry that places the grid on the image).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch

from toolkit.interpret.analysis import Analysis
from toolkit.interpret.context import MapContext
from toolkit.interpret.inputs import format_pixel_box
from toolkit.interpret.maps import MAP_TYPES, admits, compute_map, map_options, map_type


class PixelPoint(NamedTuple):
    """A point of the original image, in pixels: where a query patch is, whatever a backbone's grid."""

    x: float
    y: float


@dataclass(frozen=True)
class Control:
    """One option of a map type as a menu over several backbones."""

    name: str
    help: str
    choices: tuple[tuple[str, object], ...]  # (label, value), in menu order; the default among them
    default: object
    free: tuple[type, ...]  # types whose values outside the menu are admitted (typed in)

    def texts(self) -> list[tuple[str, str]]:
        """(label, text) pairs for a menu whose values must be strings; ``parse`` reads a text back."""
        return [(label, option_text(v)) for label, v in self.choices]

    def parse(self, value, image_size: tuple[int, int]) -> object:
        """A menu value or its text -> the option's value (None: the default). Text outside the menu is read as a
        value of a ``free`` type: an integer, or for a query a point ``"x, y"`` inside the ``image_size = (W, H)``
        image."""
        if value is None:  # a cleared menu
            return self.default
        if not isinstance(value, str):
            return value
        for _, v in self.choices:
            if option_text(v) == value.strip():
                return v
        if int in self.free and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if tuple in self.free:
            nums = [p for p in re.split(r"[\s,;()]+", value) if p]
            try:
                x, y = (float(p) for p in nums)
            except ValueError:
                pass
            else:
                w, h = image_size
                if not (0 <= x <= w and 0 <= y <= h):
                    raise ValueError(f"the query point ({x:g}, {y:g}) is outside the {w}x{h} image")
                return PixelPoint(x, y)
        wanted = ", ".join([lab for lab, _ in self.choices][:8]) + (", ..." if len(self.choices) > 8 else "")
        extra = {int: " or an integer", tuple: " or a point `x, y` in pixels"}
        raise ValueError(f"`{self.name}` {value!r} is not one of: {wanted}" + "".join(extra.get(t, "")
                                                                                    for t in self.free))


def option_text(value) -> str:
    """The text a menu shows for an option value (``Control.parse`` reads it back)."""
    if isinstance(value, PixelPoint):
        return f"{value.x:g}, {value.y:g}"
    return str(value)


def context_of(source: MapContext | Analysis) -> MapContext:
    if isinstance(source, MapContext):
        return source
    if source.context is None:
        raise ValueError("this Analysis holds no context: make it with toolkit.interpret.analyze or compare")
    return source.context


def pixel_cell(ctx: MapContext, point: PixelPoint) -> tuple[int, int]:
    """The (row, col) of ``ctx``'s tap grid that holds ``point`` (original pixels; clamped into the input frame,
    so that a point a crop cut off takes the nearest cell)."""
    return ctx.geometry.cell_at(point.x, point.y, ctx.grid, clamp=True)


def cell_centre(ctx: MapContext, cell: tuple[int, int]) -> PixelPoint | None:
    """The centre of ``cell``'s part of the original image; None for a cell in the letterbox padding."""
    (r, c), (xs, ys) = cell, ctx.geometry.cell_edges(ctx.grid)
    if xs[c + 1] <= xs[c] or ys[r + 1] <= ys[r]:
        return None
    return PixelPoint(round(float(xs[c] + xs[c + 1]) / 2, 1), round(float(ys[r] + ys[r + 1]) / 2, 1))


def is_query(control_or_choices) -> bool:
    """Whether an option is a query patch (its choices admit a (row, col) tuple)."""
    choices = control_or_choices.free if isinstance(control_or_choices, Control) else control_or_choices
    return tuple in choices


def option_controls(name: str, sources: Mapping[str, MapContext | Analysis]) -> list[Control]:
    """Menus for map type ``name``'s options over every backbone of ``sources`` (contexts or analyses), in the
    declared order. A query's menu lists the patches of the first backbone's grid that lie on the image, as points."""
    ctxs = [context_of(s) for s in sources.values()]
    if not ctxs:
        raise ValueError("no backbone selected: choose at least one")
    first, out = ctxs[0], []
    for key, opt in map_type(name).options.items():
        menu: dict[str, tuple[str, object]] = {}
        free: list[type] = []
        for ctx in ctxs:
            for c in map_options(name, ctx.vlm)[key].choices:
                if isinstance(c, type):
                    free += [c] if c not in free else []
                else:
                    menu.setdefault(option_text(c), (str(c), c))
        if free and opt.menu is not None:
            for v, label in opt.menu(first).items():
                if isinstance(v, tuple):  # a cell of the first backbone's grid: shared as its point on the image
                    v = cell_centre(first, v)
                    if v is None:
                        continue
                    label = f"{label} of {first.vlm.cfg.backbone} (x {v.x:g}, y {v.y:g})"
                menu.setdefault(option_text(v), (label, v))
        menu.setdefault(option_text(opt.default), (str(opt.default), opt.default))
        out.append(Control(key, opt.help, tuple(menu.values()), opt.default, tuple(free)))
    return out


def query_option(name: str) -> str | None:
    """The name of map type ``name``'s query-patch option; None for a map type that looks from no patch."""
    return next((k for k, o in map_type(name).options.items() if isinstance(o.choices, tuple) and is_query(o.choices)),
                None)


def click_query(name: str, sources: Mapping[str, MapContext | Analysis], point: PixelPoint) -> tuple[str, PixelPoint]:
    """What a click at ``point`` of the original image chooses for map type ``name``: its query option, and the
    menu value (``option_controls``) of the first backbone's cell that holds the point, so that a menu shows that
    cell and every backbone looks from its centre. ValueError when the map type looks from no patch, or when the
    first backbone never saw the point (off the image, or cut off by a crop)."""
    key = query_option(name)
    if key is None:
        having = ", ".join(n for n in MAP_TYPES if query_option(n))
        raise ValueError(f"`{name}` looks from no patch: a click chooses the query patch of {having}")
    if not sources:
        raise ValueError("nothing analysed yet: run the models first")
    first = context_of(next(iter(sources.values())))
    cell = first.geometry.cell_at(point.x, point.y, first.grid)
    centre = None if cell is None else cell_centre(first, cell)
    if centre is None:
        w, h = first.image.size
        raise ValueError(f"the point ({point.x:g}, {point.y:g}) is not on the part of the {w}x{h} image that "
                         f"{first.vlm.cfg.backbone} sees")
    return key, centre


def parse_options(name: str, sources: Mapping[str, MapContext | Analysis], values: Mapping[str, object]) -> dict:
    """Menu values or their texts (option name -> value) -> option values; options left out take their defaults."""
    map_type(name).check_names(values)
    controls = {c.name: c for c in option_controls(name, sources)}
    size = context_of(next(iter(sources.values()))).image.size
    return {k: c.parse(values[k], size) if k in values else c.default for k, c in controls.items()}


@dataclass(frozen=True)
class Gallery:
    """One map type for several backbones with one set of options."""

    name: str
    options: dict  # as given: a query is a PixelPoint or "box-centre"
    maps: dict[str, torch.Tensor]  # backbone -> (h, w) on its tap grid
    unavailable: dict[str, str]  # backbone -> why it has no map (no such map, or an option that does not apply)
    queries: dict[str, tuple[int, int]]  # backbone -> the cell its map looks from, for map types with a query


def gallery_maps(sources: Mapping[str, MapContext | Analysis], name: str, **options) -> Gallery:
    """Map type ``name`` for every backbone of ``sources`` (contexts or analyses: nothing is encoded or generated
    again). A query given as a ``PixelPoint`` becomes each backbone's own cell. A backbone without the map, or for
    which an option's value does not apply (another family's module, a token past the expression's end), gets its
    reason in ``unavailable`` instead of raising; an option the map type does not declare raises ValueError."""
    mt = map_type(name)
    mt.check_names(options)
    maps, unavailable, queries = {}, {}, {}
    for backbone, source in sources.items():
        ctx = context_of(source)
        why = mt.available(ctx)
        declared = map_options(name, ctx.vlm)
        kw = {}
        for key, opt in declared.items():
            value = options.get(key, opt.default)
            if is_query(opt.choices):
                value = pixel_cell(ctx, value) if isinstance(value, PixelPoint) else value
                queries[backbone] = ctx.query if value == "box-centre" else tuple(value)
            if why is None and not admits(opt.choices, value):
                why = f"{key} {option_text(value)!r} does not apply to {backbone}"
            kw[key] = value
        if why is None:
            try:
                maps[backbone] = compute_map(name, ctx, **kw)
            except ValueError as e:  # MapUnavailable included: a module without a map, a token out of range
                why = str(e)
        if why is not None:
            unavailable[backbone] = why
            queries.pop(backbone, None)
    return Gallery(name, dict(options), maps, unavailable, queries)


def _values(m: torch.Tensor) -> list[list[float | None]]:
    return [[round(v, 6) if math.isfinite(v) else None for v in row] for row in m.double().tolist()]


def _option_json(value):
    return dict(x=value.x, y=value.y) if isinstance(value, PixelPoint) else value


def analysis_json(analyses: Mapping[str, Analysis], gallery: Gallery | None = None) -> dict:
    """Answers, boxes (original pixels), IoU and maps of ``compare``'s analyses, and the map gallery when given,
    as plain JSON types. Every map is ``values`` ((h, w) nested lists on ``grid``) with the ``geometry`` that places
    its grid on the original image (``toolkit.geometry.Geometry``: input = original * s + o)."""
    if not analyses:
        raise ValueError("nothing to export: no analyses given")
    first = next(iter(analyses.values()))
    out = dict(expression=first.expression, image=dict(width=first.image.width, height=first.image.height),
               gt_box=None if first.gt_box is None else list(first.gt_box), backbones={})
    for name, a in analyses.items():
        g = a.grounding
        bb = a.backbone_map()
        out["backbones"][name] = dict(
            answer=g.answer, valid=g.valid, box=None if g.box_pixels is None else [round(v, 2) for v in g.box_pixels],
            box_text=format_pixel_box(g.box_pixels), iou=a.iou, grid=list(a.grid),
            geometry=dataclasses.asdict(a.geometry), query=list(a.query),
            maps=dict(similarity=dict(values=_values(a.similarity.mean), tokens=list(a.similarity.tokens)),
                      lm_attention=dict(values=_values(a.lm_attention.mean())),
                      backbone=dict(name=bb[0], values=_values(bb[1])) if bb is not None
                      else dict(unavailable=a.no_map_reason())))
    if gallery is not None:
        out["gallery"] = dict(map_type=gallery.name, options={k: _option_json(v) for k, v in gallery.options.items()},
                              maps={})
        for name in analyses:
            if name in gallery.maps:
                entry = dict(grid=list(gallery.maps[name].shape), values=_values(gallery.maps[name]))
                if name in gallery.queries:
                    entry["query"] = list(gallery.queries[name])
            else:
                entry = dict(unavailable=gallery.unavailable.get(name, "not computed"))
            out["gallery"]["maps"][name] = entry
    return out


def describe_options(options: Mapping[str, object]) -> str:
    """``key=value, ...`` as a title shows them."""
    return ", ".join(f"{k}={option_text(v)}" for k, v in options.items())
