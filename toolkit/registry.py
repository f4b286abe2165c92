"""The one extension point: backbones are registered by name and built by name.

Adding a backbone family = one file under ``toolkit/backbones/`` that decorates its variant
functions with ``@register_backbone`` and one import line in ``toolkit/backbones/__init__.py``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    fn: Callable[..., nn.Module]
    family: str
    tags: tuple[str, ...] = field(default=())


_BACKBONES: dict[str, BackboneEntry] = {}


def register_backbone(name: str | None = None, *, family: str, tags: tuple[str, ...] = ()) -> Callable:
    """Decorator: register a variant function ``fn(**overrides) -> Backbone`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__.replace("_", "-")
        if key in _BACKBONES:
            raise ValueError(f"backbone `{key}` is registered twice ({_BACKBONES[key].fn.__module__} and {fn.__module__})")
        _BACKBONES[key] = BackboneEntry(key, fn, family, tuple(tags))
        return fn

    return deco


def _ensure_loaded() -> None:
    import toolkit.backbones  # noqa: F401  (registers every family on import)


def list_backbones(pattern: str = "*", *, family: str | None = None, tag: str | None = None) -> list[str]:
    """Registered backbone names matching a glob ``pattern``, optionally one ``family`` or ``tag``."""
    _ensure_loaded()
    return sorted(
        n for n, e in _BACKBONES.items()
        if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family) and (tag is None or tag in e.tags)
    )


def backbone_entry(name: str) -> BackboneEntry:
    _ensure_loaded()
    try:
        return _BACKBONES[name]
    except KeyError:
        close = [n for n in _BACKBONES if name.split("-")[0] in n][:8]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise KeyError(f"backbone `{name}` is not registered; see `toolkit.list_backbones()`.{hint}") from None


def create_backbone(name: str, **overrides: Any) -> nn.Module:
    """Build a registered backbone; ``overrides`` change fields of its config (e.g. ``img_size=64``)."""
    return backbone_entry(name).fn(**overrides)
