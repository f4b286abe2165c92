"""The registry of explanation maps: every way of asking "where did the model look?" as one registered function.

A map type is ``fn(ctx: MapContext, **options) -> (h, w)`` on the tap grid, registered with ``@register_map(name,
Option(...), ..., available=...)``; ``compute_map`` checks the options against what is declared and the map type's
``available`` check (None, or the reason it has no map for a model) before it runs. Adding a map type is one such
function (here, or in any module imported before use); the batch command and the tests pick it up from
``MAP_TYPES``.

Signs: attention, scan paths (their magnitude) and saliency are non-negative by construction; integrated gradients
keeps the signed per-token sum in ``toolkit.interpret.attribution`` and its map is the positive part; similarity is a
signed cosine, kept as it is (a negative value means "unlike the word", not "important the other way"). The scores of
``toolkit.interpret.scores`` count positive mass only, so negative cells weigh nothing anywhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from toolkit.interpret.attention import answer_tokens, lm_attention_rollout, lm_image_attention, skip_summary
from toolkit.interpret.attribution import pixel_saliency, token_integrated_gradients
from toolkit.interpret.context import Capture, MapContext, build_context, probe, query_point
from toolkit.interpret.scan_paths import cell_of, scan_directions, scan_paths_from_inputs
from toolkit.interpret.similarity import text_image_similarity
from toolkit.llm import token_embeddings
from toolkit.vlm import VLM


class MapUnavailable(ValueError):
    """The map type has no map for this model (the message says why)."""


@dataclass(frozen=True)
class Option:
    """A map type's option. ``choices``: the allowed values; a type among them admits any value of that type (e.g.
    ``("mean", int)``); a callable gives them for a model. ``compute_map`` checks against them. ``menu``: where a
    type is admitted, the values of it a front end lists for one context (value -> label), e.g. the expression's
    token indices; other values of the type stay allowed."""

    name: str
    default: object
    choices: tuple | Callable[[VLM], tuple]
    help: str = ""
    menu: Callable[[MapContext], dict] | None = None

    def allowed(self, vlm: VLM) -> tuple:
        return self.choices(vlm) if callable(self.choices) else self.choices


@dataclass(frozen=True)
class MapType:
    """A registered map type: its function, declared options and availability check."""

    name: str
    fn: Callable[..., torch.Tensor]
    options: dict[str, Option]
    check: Callable[[Capture], str | None]  # None: available; else why not

    def check_names(self, names) -> None:
        """Raise ValueError naming the declared options when ``names`` holds one that is not."""
        unknown = set(names) - set(self.options)
        if unknown:
            raise ValueError(f"map type `{self.name}` has no option {sorted(unknown)}; it has "
                             f"{sorted(self.options) or 'none'}")

    def check_options(self, vlm: VLM, options: dict) -> None:
        """Raise ValueError for an undeclared option or a value outside its choices for ``vlm``."""
        self.check_names(options)
        for key, value in options.items():
            choices = self.options[key].allowed(vlm)
            if not admits(choices, value):
                shown = ", ".join(c.__name__ if isinstance(c, type) else repr(c) for c in choices)
                raise ValueError(f"`{self.name}` option {key}={value!r} is not one of: {shown}")

    def available(self, vlm_or_ctx: VLM | Capture) -> str | None:
        """None when the map exists for this model, else the reason. A VLM is probed with one backbone pass over a
        blank image (what it captures does not depend on the image); a context answers from its own capture."""
        return self.check(vlm_or_ctx if isinstance(vlm_or_ctx, Capture) else probe(vlm_or_ctx))


MAP_TYPES: dict[str, MapType] = {}


def register_map(name: str, *options: Option, available: Callable[[Capture], str | None] = lambda cap: None):
    """Decorator: register ``fn(ctx, **options) -> (h, w)`` as map type ``name`` with its declared options."""
    def wrap(fn):
        if name in MAP_TYPES:
            raise ValueError(f"map type `{name}` is already registered")
        MAP_TYPES[name] = MapType(name, fn, {o.name: o for o in options}, available)
        return fn
    return wrap


def map_type(name: str) -> MapType:
    try:
        return MAP_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown map type `{name}`; known: {', '.join(MAP_TYPES)}") from None


def map_options(name: str, vlm: VLM) -> dict[str, Option]:
    """The options of map type ``name`` with their choices resolved for ``vlm``."""
    return {k: Option(o.name, o.default, o.allowed(vlm), o.help, o.menu) for k, o in map_type(name).options.items()}


def admits(choices: tuple, value) -> bool:
    """Whether ``value`` is among ``choices`` (an Option's resolved choices); 0 and False are told apart."""
    for c in choices:
        if isinstance(c, type):
            if isinstance(value, c) and not (c is not bool and isinstance(value, bool)):
                return True
        elif type(value) is type(c) and value == c:  # so that 0 is not taken for False
            return True
    return False


def compute_map(name: str, vlm_or_ctx: VLM | MapContext, image=None, expression: str | None = None,
                **options) -> torch.Tensor:
    """Map ``name`` as a float ``(h, w)`` tensor on the tap grid (CPU), for a context, or for a VLM with ``image``
    and ``expression`` (a context is built for the one call). Options left out take their defaults; an unknown
    option or a value outside its choices raises ValueError (before anything runs), a map the model does not have
    ``MapUnavailable``."""
    mt = map_type(name)
    vlm = vlm_or_ctx.vlm if isinstance(vlm_or_ctx, MapContext) else vlm_or_ctx
    mt.check_options(vlm, options)
    ctx = vlm_or_ctx if isinstance(vlm_or_ctx, MapContext) else build_context(vlm, image, expression)
    why = mt.check(ctx)
    if why is not None:
        raise MapUnavailable(f"`{name}` is not available for {ctx.vlm.cfg.backbone}: {why}")
    kw = {k: o.default for k, o in mt.options.items()} | options
    return mt.fn(ctx, **kw).detach().float().cpu()


@dataclass(frozen=True)
class MapSpec:
    """A map type with some options set, as text: ``"lm_attention:token=2:layer=0"`` (``parse_map_spec``); its
    ``label`` names its maps and scores in a batch analysis."""

    name: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ":".join([self.name, *(f"{k}={_spec_text(v)}" for k, v in self.options.items())])


def split_map_specs(text: str) -> list[str]:
    """``"a,b:query=(1,2)"`` -> ``["a", "b:query=(1,2)"]``: commas inside a cell's parentheses do not split."""
    return [m.strip() for m in re.split(r",(?![^(]*\))", text) if m.strip()]


def parse_map_spec(text: str) -> MapSpec:
    """``"name[:option=value]..."`` -> MapSpec. Values: integers, ``true``/``false``, a cell ``(row,col)``, else the
    text. An unknown map type or option raises ValueError; values are checked against a model by ``check_options``."""
    name, *parts = [p.strip() for p in text.split(":")]
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"map `{text}`: `{part}` is not option=value")
        options[key.strip()] = _spec_value(value.strip())
    mt = map_type(name)
    mt.check_names(options)
    return MapSpec(mt.name, options)


def _spec_text(value: object) -> str:  # what _spec_value reads back
    if isinstance(value, tuple):
        return f"({value[0]},{value[1]})"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _spec_value(text: str) -> object:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    cell = re.fullmatch(r"\(\s*(\d+)\s*[,\s]\s*(\d+)\s*\)", text)
    return (int(cell[1]), int(cell[2])) if cell else text


def _point(ctx: MapContext, query) -> tuple[float, float]:
    """Where a backbone map looks from, as (y, x) in [0, 1] of the input frame: the context's point for
    ``"box-centre"``, else the centre of cell (row, col) of the tap grid (placed on a scan block's own grid by
    ``cell_of``)."""
    return ctx.point if query == "box-centre" else query_point(tuple(query), ctx.grid, ctx.grounding, ctx.geometry)


# -- the map types ----------------------------------------------------------------------------------------------

def _token_menu(ctx: MapContext) -> dict:
    tokens, _ = token_embeddings(ctx.vlm.lm, ctx.vlm.tokenizer, ctx.expression)
    return {i: f"{i}: {t}" for i, t in enumerate(tokens)}


def _cell_menu(ctx: MapContext) -> dict:
    h, w = ctx.grid
    return {(r, c): f"patch ({r}, {c})" for r in range(h) for c in range(w)}


@register_map("similarity",
              Option("token", "mean", ("mean", int), "an expression token's index, or the mean over them",
                     _token_menu),
              Option("contextual", False, (False, True), "LM last-layer states instead of input embeddings"))
def _similarity(ctx: MapContext, token, contextual) -> torch.Tensor:
    """Cosine similarity of the expression's tokens with the visual tokens in the LM's space (signed)."""
    sim = text_image_similarity(ctx.vlm, ctx.tokens, ctx.expression, ctx.grid, contextual=contextual)
    if token == "mean":
        return sim.mean
    if not -len(sim.tokens) <= token < len(sim.tokens):
        raise ValueError(f"token {token} is outside the expression's {len(sim.tokens)} tokens {sim.tokens}")
    return sim.maps[token]


def _lm_layers(vlm: VLM) -> tuple:
    return ("mean", "rollout", *range(vlm.lm.config.num_hidden_layers))


def _lm_heads(vlm: VLM) -> tuple:
    return ("mean", *range(vlm.lm.config.num_attention_heads))


def _answer_token_menu(ctx: MapContext) -> dict:
    tokens = answer_tokens(ctx.vlm, ctx.tokens, ctx.prompt, ctx.answer)
    return {i: f"{i}: {t}" for i, t in enumerate(tokens)}


@register_map("lm_attention",
              Option("layer", "mean", _lm_layers, "an LM layer, the mean over layers, or the rollout over them"),
              Option("head", "mean", _lm_heads, "a head, or the mean over heads (rollout: the mean only)"),
              Option("source", "answer", ("answer", "prompt"),
                     "rows that predict the answer's tokens, or the last prompt token alone"),
              Option("token", "all", ("all", int),
                     "the row that wrote one of the answer's tokens (EOS last), or all of them (source 'answer')",
                     _answer_token_menu))
def _lm_attention(ctx: MapContext, layer, head, source, token) -> torch.Tensor:
    """Attention of the LM from the answer (all its tokens, or the one that wrote a token) onto the image tokens
    (one layer and head, their mean, or rollout)."""
    rows = dict(source=source, token=token)
    if layer == "rollout":
        if head != "mean":
            raise ValueError("the LM attention rollout averages the heads: use head='mean'")
        return lm_attention_rollout(ctx.vlm, ctx.tokens, ctx.prompt, ctx.answer, ctx.grid, **rows)
    att = lm_image_attention(ctx.vlm, ctx.tokens, ctx.prompt, ctx.answer, ctx.grid, **rows,
                             layers=None if layer == "mean" else [layer], heads=None if head == "mean" else [head])
    return att.mean()


def _attention_check(cap: Capture) -> str | None:
    if cap.attention.layers:
        return None
    if not cap.attention.skipped:
        return "the backbone has no attention modules"
    return skip_summary(cap.attention.skipped)


@register_map("backbone_attention",
              Option("module", "rollout", lambda vlm: ("rollout", *(n for n, _ in vlm.backbone.attention_modules())),
                     "a captured attention module, or the rollout over all captured ones"),
              Option("query", "box-centre", ("box-centre", tuple), "(row, col) on the tap grid", _cell_menu),
              available=_attention_check)
def _backbone_attention(ctx: MapContext, module, query) -> torch.Tensor:
    """Backbone self-attention from the query patch (heads averaged, prefix tokens dropped), as the model ran it."""
    maps = ctx.attention.query_maps(cell_of(_point(ctx, query), ctx.grid), rollout=module == "rollout")
    if module not in maps:
        raise MapUnavailable(f"attention module {module} has no map on the grid: "
                             f"{ctx.attention.skipped.get(module, 'not captured')}")
    return maps[module]


def _tap_scan(cap: Capture) -> str | None:
    names = [n for n, _ in cap.vlm.backbone.scan_modules()]
    return names[-1] if names else None


def _scan_paths(cap: Capture, module: str, point: tuple[float, float]):
    """``scan_paths_from_inputs`` for one captured module: (paths, skipped)."""
    return scan_paths_from_inputs(cap.vlm.backbone, {module: cap.scan_inputs[module]}, point,
                                  tuple(cap.pixels.shape[-2:]))


def _scan_check(cap: Capture) -> str | None:
    tap = _tap_scan(cap)
    if tap is None:
        return "the backbone has no scan modules"
    return _scan_paths(cap, tap, (0.5, 0.5))[1].get(tap)


def _directions(vlm: VLM) -> tuple:
    return ("merged", *range(max(scan_directions(vlm.backbone).values(), default=0)))


@register_map("scan_path",
              Option("direction", "merged", _directions,
                     "one scan direction (SS2D has four, a 1-D scan one), or their sum"),
              Option("module", "tap", lambda vlm: ("tap", *(n for n, _ in vlm.backbone.scan_modules())),
                     "a scan module, or the tap's (the last before the visual tokens)"),
              Option("query", "box-centre", ("box-centre", tuple), "(row, col) on the tap grid", _cell_menu),
              available=_scan_check)
def _scan_path(ctx: MapContext, direction, module, query) -> torch.Tensor:
    """Magnitude of a scan block's implicit attention from the query patch (SS2D's, or a 1-D scan's through the
    windows it runs over), resampled onto the tap grid."""
    module = _tap_scan(ctx) if module == "tap" else module
    paths, skipped = _scan_paths(ctx, module, _point(ctx, query))
    if module in skipped:
        raise MapUnavailable(f"scan module {module}: {skipped[module]}")
    path = paths[module]
    if direction != "merged" and direction >= len(path.per_direction):
        raise MapUnavailable(f"scan module {module} runs {len(path.per_direction)} direction(s): no direction "
                             f"{direction}")
    m = (path.merged if direction == "merged" else path.per_direction[direction]).abs()  # (h_s, w_s)
    # an earlier block scans a finer grid: average it onto the tap grid so that every map shares one grid
    return m if path.grid == ctx.grid else F.adaptive_avg_pool2d(m[None, None], ctx.grid)[0, 0]


@register_map("integrated_gradients",
              Option("baseline", "zeros", ("zeros", "mean"), "all-zero visual tokens, or the image's mean token"),
              Option("n_steps", 16, (int,), "interpolation steps (one LM batch)",
                     lambda ctx: {n: str(n) for n in (4, 8, 16, 32, 64)}))
def _integrated_gradients(ctx: MapContext, baseline, n_steps) -> torch.Tensor:
    """Integrated Gradients of the answer's log-probability over the visual tokens: positive part of the per-token
    sum over channels."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")
    ig = token_integrated_gradients(ctx.vlm, ctx.tokens, ctx.prompt, ctx.answer, baseline=baseline, n_steps=n_steps)
    return ig.per_token.clamp(min=0).reshape(ctx.grid)


@register_map("saliency")
def _saliency(ctx: MapContext) -> torch.Tensor:
    """|d logit / d pixel| of the answer's first token (pixel_saliency), averaged over each tap cell."""
    return F.adaptive_avg_pool2d(pixel_saliency(ctx.vlm, ctx.pixels, ctx.prompt, ctx.answer)[None, None],
                                 ctx.grid)[0, 0]
