"""Open the study's released VLMs: Prismatic run directories, read as the release lays them out.

A release run directory holds ``config.json`` (the model fields under ``"model"``) and
``checkpoints/latest-checkpoint.pt`` = ``{"model": {"projector": state_dict, "llm_backbone": state_dict}}``.
The vision weights are not in it: they come from the backbone's own official file (timm, VMamba, MambaVision,
detectron2, mmdet/mmseg), and the LLM's config and tokenizer from a local Hugging Face directory. The result is this
toolkit's ``VLM``, which then saves and loads in the toolkit's own format (``VLM.save`` / ``VLM.load``).

    vlm = load_prismatic("runs/vmamba-s-in1k-224-s3", llm="/models/vicuna-7b-v1.5",
                         vision_weights="/weights/vssm_small_0229_ckpt_epoch_222.pth")
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from toolkit.connector import PRISMATIC_ARCH
from toolkit.llm import LMConfig
from toolkit.paper import PAPER_CONFIGS, registry_name_for_release
from toolkit.registry import backbone_entry, create_backbone
from toolkit.vlm import VLM, VLMConfig, load_backbone_weights

CHECKPOINT = Path("checkpoints") / "latest-checkpoint.pt"
REQUIRED = ("model_id", "vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy")
RESIZE_STRATEGIES = ("letterbox", "resize-naive", "resize-crop")  # Prismatic's image_resize_strategy values
TEMPLATE = "vicuna_v11"  # the release prompts Vicuna-v1.5 with the Vicuna v1.1 template
PAD_TOKEN = "<PAD>"  # Prismatic's LLaMa-2 backbones add this pad token and pad the vocabulary (resize below)


@dataclass(frozen=True)
class ReleaseConfig:
    """A release run's ``config.json``, resolved to this toolkit's names."""

    model_id: str
    vision_backbone_id: str
    llm_backbone_id: str
    arch_specifier: str
    image_resize_strategy: str
    backbone: str  # our registry name
    connector: str  # mlp{N}x_gelu
    resize: str  # toolkit.geometry strategy: "letterbox" is each release backbone's own (PAPER_CONFIGS[...].resize)
    llm_max_length: int = 2048
    vmamba_feature_stage: int | None = None
    vmamba_feature_layer: int | None = None


def read_release_config(run_dir: str | Path) -> ReleaseConfig:
    """Read and check ``run_dir/config.json``; ValueError / FileNotFoundError naming the file and what is wrong."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a release run directory")
    try:
        full = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    model = full.get("model") if isinstance(full, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f'{path} has no "model" block: the release keeps {", ".join(REQUIRED)} under "model"')
    for key in REQUIRED:
        if not isinstance(model.get(key), str) or not model[key]:
            raise ValueError(f'{path}: the "model" block has no `{key}` (required: {", ".join(REQUIRED)})')
    try:
        backbone = registry_name_for_release(model["vision_backbone_id"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    arch = model["arch_specifier"]
    if arch not in PRISMATIC_ARCH:
        raise ValueError(f"{path}: unknown arch_specifier `{arch}`; known: {', '.join(PRISMATIC_ARCH)}")
    resize = model["image_resize_strategy"]
    if resize not in RESIZE_STRATEGIES:
        raise ValueError(f"{path}: unknown image_resize_strategy `{resize}`; known: {', '.join(RESIZE_STRATEGIES)}")
    if not model["llm_backbone_id"].startswith("vicuna-"):
        raise ValueError(f"{path}: llm_backbone_id `{model['llm_backbone_id']}` is not supported: the release's "
                         f"models use vicuna-v15-7b, prompted with the Vicuna v1.1 template")
    taps = {k: model.get(k, full.get(k)) for k in ("vmamba_feature_stage", "vmamba_feature_layer")}
    given = {k: v for k, v in taps.items() if v is not None}
    if given and backbone_entry(backbone).family != "vmamba":
        raise ValueError(f"{path}: VMamba feature taps ({', '.join(f'{k}={v}' for k, v in given.items())}) given "
                         f"for the non-VMamba backbone `{model['vision_backbone_id']}`")
    return ReleaseConfig(
        model["model_id"], model["vision_backbone_id"], model["llm_backbone_id"], arch, resize, backbone,
        PRISMATIC_ARCH[arch], PAPER_CONFIGS[backbone].resize if resize == "letterbox" else resize,
        int(model.get("llm_max_length", 2048)), **taps)


def load_prismatic(run_dir: str | Path, llm: str | Path, vision_weights: str | Path,
                   backbone_overrides: dict | None = None, map_location: str = "cpu") -> VLM:
    """A release run directory -> this toolkit's VLM, connector and LLM weights loaded from its checkpoint.

    ``llm``: local Hugging Face directory of the release's LLM (``AutoModelForCausalLM`` + ``AutoTokenizer``, read
    with ``local_files_only``); its weights are replaced by the checkpoint's. ``vision_weights``: the backbone's
    official pretrained file (``Backbone.load_official``). ``backbone_overrides`` change fields of the registered
    backbone's config (tests shrink a backbone while keeping the official key names). ``map_location``: where the
    checkpoint's tensors are read to. Preprocessing is the release's: its resize (``PAPER_CONFIGS[...].resize``) and,
    where the registered backbone normalises differently (ViT-S: mean = std = 0.5), its normalisation. The tap is
    the registered backbone's (``PAPER_CONFIGS[...].tap``); ``vmamba_feature_stage`` / ``vmamba_feature_layer`` are
    read and checked to belong to a VMamba backbone, not mapped onto another tap.
    """
    run_dir = Path(run_dir)
    rc = read_release_config(run_dir)
    projector_sd, llm_sd = read_release_checkpoint(run_dir / CHECKPOINT, map_location)
    llm_dir = _local_llm_dir(llm)
    overrides = dict(backbone_overrides or {})
    backbone = create_backbone(rc.backbone, **overrides)
    release = PAPER_CONFIGS[rc.backbone]
    fix = {k: v for k, v in (("mean", release.mean), ("std", release.std))
           if k not in overrides and tuple(getattr(backbone.data_config, k)) != tuple(v)}
    if fix:  # the registered default normalises otherwise than the release (ViT-S): rebuild with the release's
        overrides.update(fix)
        backbone = create_backbone(rc.backbone, **overrides)
    load_backbone_weights(backbone, vision_weights)
    lm, tok = _load_llm(llm_dir, llm_sd, rc.llm_max_length)
    cfg = VLMConfig(backbone=rc.backbone, connector=rc.connector, lm=LMConfig(name_or_path=str(llm_dir),
                    template=TEMPLATE), image_resize_strategy=rc.resize, backbone_overrides=overrides,
                    backbone_weights=str(Path(vision_weights).resolve()),
                    # trained on LLaVA's RefCOCO turns, whose boxes are normalised by the original image size
                    box_frame="original")
    vlm = VLM(cfg, backbone, lm, tok)
    ckpt = run_dir / CHECKPOINT
    _load_projector(vlm.connector, projector_sd, ckpt, rc.arch_specifier)
    _load_llm_backbone(vlm.lm, llm_sd, ckpt, llm_dir)
    return vlm.eval()


def read_release_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[dict, dict]:
    """``checkpoints/latest-checkpoint.pt`` -> (projector state dict, llm_backbone state dict), read with
    ``weights_only=True``; FileNotFoundError / ValueError naming the file and what is missing."""
    from toolkit.checkpoints import load_state_dict_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a release run directory holds its weights in {CHECKPOINT}")
    obj = load_state_dict_file(path, map_location)  # ValueError for a truncated, unsafe or foreign file
    model = obj.get("model")
    if not isinstance(model, dict):
        raise ValueError(f'{path} holds no "model" dict (top-level keys: {sorted(map(str, obj))[:10]})')
    for part in ("projector", "llm_backbone"):
        if not isinstance(model.get(part), dict):
            raise ValueError(f'{path}: "model" holds no "{part}" state dict (it holds: {sorted(map(str, model))})')
    return model["projector"], model["llm_backbone"]


def _local_llm_dir(llm: str | Path) -> Path:
    d = Path(llm).expanduser()
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"LLM directory not found locally: {d} (give a local Hugging Face directory with "
                                f"config.json, tokenizer and weights; nothing is downloaded)")
    return d


def _load_llm(d: Path, llm_sd: dict, max_length: int):
    """(model, tokenizer) from the local directory, the vocabulary grown as the release's was (see PAD_TOKEN)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"LLM directory {d} could not be loaded locally: {e}") from None
    tok.model_max_length = max_length
    emb = next(n for n, p in lm.named_parameters() if p is lm.get_input_embeddings().weight)
    rows = llm_sd.get(f"llm.{emb}")
    if rows is not None and rows.shape[0] > lm.get_input_embeddings().weight.shape[0]:
        # Prismatic's LLaMa-2 backbone adds a <PAD> token and resizes the embeddings (padded to a multiple of 64)
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
        if len(tok) <= rows.shape[0]:
            lm.resize_token_embeddings(rows.shape[0])
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    lm.config.pad_token_id = tok.pad_token_id
    return lm, tok


def _mismatch(missing, unexpected, bad, limit: int = 8) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad)):
        if keys:
            more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {label} key(s): {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def _load_projector(connector: nn.Module, sd: dict, path: Path, arch: str) -> None:
    """The release's projector keys are ours (``projector.{0,2,4}.*``), except that a linear projector is stored as
    ``projector.{weight,bias}`` where ours keeps its one layer in a Sequential (``projector.0.*``)."""
    own = connector.state_dict()
    linear = len(connector.projector) == 1
    names = {(k.replace("projector.0.", "projector.", 1) if linear else k): k for k in own}  # file key -> ours
    missing = [f for f in names if f not in sd]
    unexpected = [k for k in sd if k not in names]
    bad = [f"{f}: file {tuple(sd[f].shape)} vs model {tuple(own[o].shape)}"
           for f, o in names.items() if f in sd and tuple(sd[f].shape) != tuple(own[o].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{path}: the projector does not fit arch_specifier `{arch}`: "
                         f"{_mismatch(missing, unexpected, bad)}")
    connector.load_state_dict({o: sd[f] for f, o in names.items()})


def _load_llm_backbone(lm: nn.Module, sd: dict, path: Path, llm_dir: Path) -> None:
    """The release's ``llm_backbone`` (the wrapper's keys: ``llm.`` + the HF model's) into ``lm``, strictly."""
    own = lm.state_dict()
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    mine = {k[4:]: v for k, v in sd.items() if k.startswith("llm.")}
    missing = [f"llm.{k}" for k in own if k not in mine and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in sd if not k.startswith("llm.") or k[4:] not in own]
    bad = [f"llm.{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in mine.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{path}: llm_backbone does not fit the LLM in {llm_dir}: "
                         f"{_mismatch(missing, unexpected, bad)}")
    with torch.no_grad():
        lm.load_state_dict(mine, strict=False)
    if tied:
        lm.tie_weights()
