"""Vision-backbone toolkit for VLMs: build, train, load and inspect LLaVA-style models with any backbone family."""
from toolkit.registry import backbone_entry, create_backbone, list_backbones, register_backbone

__all__ = ["backbone_entry", "create_backbone", "list_backbones", "register_backbone"]
