"""Thin torch Datasets over the records the real-format loaders return (prompts are built by the VLM code)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from toolkit.data.formats import RefExample, VQAExample


def _open(path: Path, transform: Callable | None):
    image = Image.open(path).convert("RGB")
    return transform(image) if transform is not None else image


def classification_dataset(root: str | Path, split: str = "train", transform: Callable | None = None):
    """torchvision ImageFolder over ``{root}/classification/{split}`` (labels are "colour_shape" folders)."""
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(Path(root) / "classification" / split), transform=transform)


class GroundingDataset(Dataset):
    """RefExample records -> dicts with ``image`` (PIL, or whatever ``transform`` makes of it), ``expression``,
    ``box_xyxy`` (pixels of the original image), ``box_norm`` (normalised by the original size) and metadata."""

    def __init__(self, records: Sequence[RefExample], transform: Callable | None = None):
        self.records, self.transform = list(records), transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return {"image": _open(r.image_path, self.transform), "expression": r.expression,
                "box_xyxy": torch.tensor(r.box_xyxy, dtype=torch.float32),
                "box_norm": torch.tensor(r.box_norm, dtype=torch.float32),
                "image_size": (r.image_width, r.image_height), "dataset": r.dataset, "ref_id": r.ref_id}


class VQADataset(Dataset):
    """VQAExample records -> dicts with ``image``, ``question``, ``answer``, ``question_type``, ``question_id``."""

    def __init__(self, records: Sequence[VQAExample], transform: Callable | None = None):
        self.records, self.transform = list(records), transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return {"image": _open(r.image_path, self.transform), "question": r.question, "answer": r.answer,
                "question_type": r.question_type, "question_id": r.question_id}
