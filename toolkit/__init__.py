"""Vision-backbone toolkit for VLMs: build, train, load and inspect LLaVA-style models with any backbone family."""
from toolkit.registry import backbone_entry, create_backbone, list_backbones, register_backbone

# Importing any toolkit module, toolkit.registry included, runs this file first: every family is registered before
# any lookup. registry.py imports no family and the families import the registry, so the import graph has no cycle.
import toolkit.backbones  # noqa: F401

__all__ = ["backbone_entry", "create_backbone", "list_backbones", "register_backbone"]
