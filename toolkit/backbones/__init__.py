"""Backbone families. Each import registers that family's variants in ``toolkit.registry``."""
from toolkit.backbones.base import Backbone, CheckpointMismatchError, DataConfig, LoadReport
from toolkit.backbones import vit, vmamba  # noqa: F401  (registration)
from toolkit.backbones import maxvit, mambavision  # noqa: F401
from toolkit.backbones import vitdet  # noqa: F401
from toolkit.backbones import vit_adapter  # noqa: F401

__all__ = ["Backbone", "CheckpointMismatchError", "DataConfig", "LoadReport"]
