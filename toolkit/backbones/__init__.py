"""Backbone families: every module in this folder is imported here, which registers its variants in
``toolkit.registry``; a new family file needs no import line anywhere."""
from __future__ import annotations

import importlib
import pkgutil

from toolkit.backbones.base import Backbone, CheckpointMismatchError, DataConfig, LoadReport


def import_families() -> list[str]:
    """Import every module of this package but ``base`` and ``_private`` ones; returns their module names.

    Importing again is a no-op for modules already imported, so a folder added to ``__path__`` later (a test does
    this) is picked up by calling this again.
    """
    names = [m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_")]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


import_families()

__all__ = ["Backbone", "CheckpointMismatchError", "DataConfig", "LoadReport", "import_families"]
