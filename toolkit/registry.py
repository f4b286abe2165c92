"""The one extension point: backbones are registered by name and built by name.

Adding a backbone family = one file under ``toolkit/backbones/``: a ``Backbone`` subclass that sets ``family`` and
variant functions decorated with ``@register_backbone``. The package imports every file there (toolkit/__init__.py),
so this module never imports a family: families import it, and the import graph has no cycle.
"""
from __future__ import annotations

import fnmatch
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only: importing the backbones package here would make the import graph cycle
    from toolkit.backbones.base import Backbone


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    fn: Callable[..., Backbone]
    cls: type[Backbone]  # the Backbone subclass ``fn`` returns (its return annotation)
    family: str
    tags: tuple[str, ...] = field(default=())


_BACKBONES: dict[str, BackboneEntry] = {}


def register_backbone(fn: Callable[..., Any] | None = None, /, *, tags: tuple[str, ...] = ()) -> Any:
    """Decorator, bare or with ``tags``: register a variant function ``fn(**overrides) -> SomeBackbone``.

    The name is the function's (timm's habit), ``_`` read as ``-``: ``vit_s_in1k_224`` -> ``vit-s-in1k-224``; the
    family is the ``family`` of the class in its return annotation. Both are checked here, at import time, so
    a mistake fails where it is made, not at the first ``create_backbone``.
    """
    if isinstance(tags, str):
        raise TypeError(f"tags must be a tuple of strings, got the string {tags!r}; write tags=({tags!r},)")
    if fn is None:
        return lambda f: _register(f, tuple(tags))
    if not callable(fn):
        raise TypeError(f"@register_backbone takes no name ({fn!r}): the name is the function's, `_` read as `-`; "
                        "write @register_backbone or @register_backbone(tags=(...))")
    return _register(fn, tuple(tags))


def _register(fn: Callable[..., Any], tags: tuple[str, ...]) -> Callable[..., Any]:
    name = fn.__name__.replace("_", "-")
    cls = _returned_class(fn)
    family = getattr(cls, "family", None)
    if not isinstance(family, str) or not family:
        raise TypeError(f"{cls.__qualname__}, returned by {fn.__module__}.{fn.__qualname__}, sets no `family`; "
                        "add a class attribute such as family = \"my-family\"")
    if name in _BACKBONES:
        first = _BACKBONES[name].fn.__module__
        raise ValueError(f"backbone `{name}` is registered twice ({first} and {fn.__module__})")
    _BACKBONES[name] = BackboneEntry(name, fn, cls, family, tags)
    return fn


def _returned_class(fn: Callable[..., Any]) -> type:
    where = f"{fn.__module__}.{fn.__qualname__}"
    if "return" not in getattr(fn, "__annotations__", {}):
        raise TypeError(f"{where} needs a return annotation naming its Backbone class (`-> MyBackbone`): "
                        "the registry reads the family from it")
    try:  # with `from __future__ import annotations` the annotation is a string until resolved
        cls = typing.get_type_hints(fn)["return"]
    except Exception as e:
        raise TypeError(f"{where}: cannot resolve its return annotation {fn.__annotations__['return']!r} ({e}); "
                        "define the class above the function, in the module's namespace") from e
    if not isinstance(cls, type):
        raise TypeError(f"{where} must be annotated with one Backbone class, not {cls!r}")
    return cls


def list_backbones(pattern: str = "*", *, family: str | None = None, tag: str | None = None) -> list[str]:
    """Registered backbone names matching a glob ``pattern``, optionally one ``family`` or ``tag``."""
    return sorted(
        n for n, e in _BACKBONES.items()
        if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family) and (tag is None or tag in e.tags)
    )


def backbone_entry(name: str) -> BackboneEntry:
    try:
        return _BACKBONES[name]
    except KeyError:
        close = [n for n in _BACKBONES if name.split("-")[0] in n][:8]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise KeyError(f"backbone `{name}` is not registered; see `toolkit.list_backbones()`.{hint}") from None


def create_backbone(name: str, **overrides: Any) -> Backbone:
    """Build a registered backbone; ``overrides`` change fields of its config (e.g. ``img_size=64``)."""
    return backbone_entry(name).fn(**overrides)
