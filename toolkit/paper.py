"""The study's eight configurations (Kuo & Cascante-Bonilla, 2026), as its public release ships them.

Every release checkpoint pairs one frozen backbone with the 2-layer GELU connector and Vicuna-v1.5-7B, and was
trained with ``image_resize_strategy="letterbox"``; that word meant a different transform per family, which
``resize`` spells out in this toolkit's geometry names: Prismatic's centred letterbox for the classification
backbones, and "shrink to fit, never enlarge, pad right/bottom" (``shrink-and-pad``) for the dense ones.
Scores are the paper's weighted VQA / localisation / overall numbers.

``paper_table()`` builds each registered backbone (random weights: nothing is downloaded) and puts the token
count of its ``grid()`` at the paper's input beside the paper's count.
"""
from __future__ import annotations

from dataclasses import dataclass

from toolkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD

HALF = (0.5, 0.5, 0.5)  # timm's augreg ViTs normalise with mean = std = 0.5
CONNECTOR = "no-align+gelu-mlp"  # Prismatic's 2-layer GELU MLP, single fine-tuning stage
LLM = "vicuna-v15-7b"


@dataclass(frozen=True)
class PaperConfig:
    id: str
    family: str
    size: str
    pretraining: str
    input_hw: tuple[int, int]  # (H, W) the backbone receives
    resize: str  # toolkit.geometry strategy that reproduces the release's transform
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tap: str
    tokens: int  # visual tokens as the paper lists them
    params_m: int  # the release's parameter column, millions
    vqa: float
    loc: float
    overall: float
    tokens_built: int | None = None  # what the released network produces, where the listed count is nominal
    note: str = ""
    release_backbone_id: str = ""  # the release's ``vision_backbone_id`` (in its run directories' config.json)


_IN = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
_DENSE_VMAMBA = "VMamba-S (s2l15), stage 3 after its trained outnorm2 (last block of 15)"
PAPER_CONFIGS: dict[str, PaperConfig] = {c.id: c for c in (
    PaperConfig("vit-s-in1k-224", "vit", "ViT-S/16 (timm vit_small_patch16_224.augreg_in1k)", "IN1K cls", (224, 224),
                "letterbox", HALF, HALF, "second-to-last block, CLS dropped", 196, 22, 57.25, 17.82, 51.95,
                release_backbone_id="in1k-vit-s"),
    PaperConfig("maxvit-t-in1k-224-s3", "maxvit", "MaxViT-T (timm maxvit_tiny_tf_224.in1k)", "IN1K cls", (224, 224),
                "letterbox", **_IN, tap="stage 3 output", tokens=196, params_m=31, vqa=58.75, loc=15.79,
                overall=52.98, release_backbone_id="in1k-224px-maxvit-t-s3"),
    PaperConfig("mambavision-b-in1k-224-s3", "mambavision", "MambaVision-B", "IN1K cls", (224, 224), "letterbox",
                **_IN, tap="stage 3 output", tokens=196, params_m=98, vqa=56.53, loc=31.17, overall=53.12,
                release_backbone_id="mambavision-b-s3"),
    PaperConfig("vmamba-s-in1k-224-s3", "vmamba", "VMamba-S (s2l15)", "IN1K cls", (224, 224), "letterbox", **_IN,
                tap="stage 3, last block, LayerNorm without affine (untrained outnorm2)", tokens=196, params_m=50,
                vqa=62.39, loc=39.17, overall=59.27, release_backbone_id="vmamba-small-s2l15"),
    PaperConfig("vitdet-b-coco-1024", "vitdet", "ViTDet-B (detectron2 Mask R-CNN)", "IN1K (MAE) -> COCO det",
                (1024, 1024), "shrink-and-pad", **_IN, tap="last block (last_feat), no norm", tokens=4096,
                params_m=111, vqa=63.00, loc=43.74, overall=60.42,
                note="111M is the release's figure; the ViT alone has about 86M",
                release_backbone_id="vitdet-b-maskrcnn"),
    PaperConfig("vmamba-s-coco-1333x800", "vmamba", "VMamba-S (Mask R-CNN 1x)", "IN1K -> COCO det", (800, 1333),
                "shrink-and-pad", **_IN, tap=_DENSE_VMAMBA, tokens=4150, params_m=50, vqa=62.78, loc=47.94,
                overall=60.78, tokens_built=4200,
                note="4150 = (800//16)*(1333//16) is the release's nominal count; the padded stride-2 convolutions "
                     "give ceil(1333/16) = 84 columns, so the network emits 50 x 84 = 4200 tokens",
                release_backbone_id="vmamba-small-s2l15-det-maskrcnn-1x"),
    PaperConfig("vit-adapter-deit-b-ade20k-512", "vit-adapter", "ViT-Adapter DeiT-B (UperNet)",
                "IN1K -> ADE20K seg", (512, 512), "shrink-and-pad", **_IN,
                tap="adapter pyramid level at stride 16 (inferred from 1024 tokens)", tokens=1024, params_m=134,
                vqa=60.69, loc=33.77, overall=57.07,
                note="134M is the whole UperNet segmentor's figure; the ViT-Adapter backbone alone has 99.5M",
                release_backbone_id="vit-adapter-upernet-deit-b-ade20k-512"),
    PaperConfig("vmamba-s-ade20k-512", "vmamba", "VMamba-S (UperNet 160k)", "IN1K -> ADE20K seg", (512, 512),
                "shrink-and-pad", **_IN, tap=_DENSE_VMAMBA, tokens=1024, params_m=50, vqa=63.21, loc=44.98,
                overall=60.76, release_backbone_id="vmamba-small-s2l15-seg-ade20k"),
)}

# The release's vision backbone id -> our registry name (which is also the release's model id).
RELEASE_BACKBONES: dict[str, str] = {c.release_backbone_id: c.id for c in PAPER_CONFIGS.values()}


def registry_name_for_release(vision_backbone_id: str) -> str:
    """The registered backbone that reproduces the release's ``vision_backbone_id``; ValueError listing the known."""
    try:
        return RELEASE_BACKBONES[vision_backbone_id]
    except KeyError:
        raise ValueError(f"unknown vision_backbone_id `{vision_backbone_id}`: the release's are "
                         f"{', '.join(RELEASE_BACKBONES)}") from None


def paper_table() -> list[dict[str, object]]:
    """One row per configuration: the paper's numbers beside what this toolkit's registered backbone builds.

    ``tokens_built``/``params_built_m``/``preprocessing_matches`` read "not built" for ids with no registered backbone.
    """
    from toolkit.registry import create_backbone, list_backbones

    registered = set(list_backbones())
    rows = []
    for c in PAPER_CONFIGS.values():
        row: dict[str, object] = dict(
            id=c.id, family=c.family, size=c.size, pretraining=c.pretraining, input=f"{c.input_hw[1]}x{c.input_hw[0]}",
            resize=c.resize, tap=c.tap, tokens_paper=c.tokens, params_paper_m=c.params_m, vqa=c.vqa, loc=c.loc,
            overall=c.overall, tokens_built="not built", params_built_m="not built", preprocessing_matches="not built",
            note=c.note)
        if c.id in registered:
            bb = create_backbone(c.id)
            dc = bb.data_config
            row.update(tokens_built=bb.num_tokens(c.input_hw),
                       params_built_m=round(sum(p.numel() for p in bb.parameters()) / 1e6, 1),
                       preprocessing_matches=(dc.img_size, dc.resize, tuple(dc.mean), tuple(dc.std))
                       == (c.input_hw, c.resize, c.mean, c.std))
        rows.append(row)
    return rows
