"""The VLM: frozen vision backbone -> MLP connector -> causal LM (LLaVA / Prismatic composition).

Sequence layout (Prismatic): ``[BOS] [N image embeddings] [prompt tokens] [answer tokens] [EOS]``;
only the answer and EOS carry loss. Nothing here branches on the backbone family.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from toolkit.backbones.base import CHANNELS_LAST
from toolkit.boxes import GROUNDING_PROMPT, denormalize_box, parse_box
from toolkit.connector import MLPConnector
from toolkit.geometry import Geometry, apply_geometry, mean_fill, normalize
from toolkit.llm import IGNORE_INDEX, TEMPLATES, LMConfig, answer_logits, build_lm, lm_hidden_size
from toolkit.registry import create_backbone

MAX_EXPRESSION_CHARS = 500


@dataclass
class VLMConfig:
    backbone: str
    connector: str = "mlp2x_gelu"
    lm: LMConfig = field(default_factory=LMConfig)
    image_resize_strategy: str | None = None  # None: the backbone's default (letterbox for all registered ones)
    # "input": boxes are normalised in the model's input frame (geometrically exact);
    # "original": by the original image size, as the RefCOCO harness does (wrong under letterbox for non-square images).
    box_frame: str = "input"
    backbone_overrides: dict = field(default_factory=dict)
    # path of the backbone's pretrained file; config.json keeps it relative to the VLM's directory (see VLM.save)
    backbone_weights: str | None = None
    image_pos: str = "none"  # "sincos2d": a 2-D position code on the projected tokens (see MLPConnector)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        d = dict(d)
        d["lm"] = LMConfig(**d.get("lm", {}))
        return cls(**d)


@dataclass(frozen=True)
class Batch:
    """An assembled batch. ``image_mask`` marks the image-token positions (B, T)."""

    inputs_embeds: torch.Tensor  # (B, T, d)
    attention_mask: torch.Tensor  # (B, T); (B, 1, T, T) bool, True = may attend, for isolated turns
    labels: torch.Tensor | None  # (B, T)
    image_mask: torch.Tensor  # (B, T) bool
    input_ids: torch.Tensor  # (B, T), pad id at image positions
    position_ids: torch.Tensor | None = None  # (B, T) for isolated turns; None: 0..T-1


@dataclass(frozen=True)
class Grounding:
    """A grounding answer: text, whether it parsed, the box normalised in the answer's frame and in original pixels."""

    answer: str
    valid: bool
    box_norm: tuple[float, float, float, float] | None
    box_pixels: tuple[float, float, float, float] | None
    geometry: Geometry


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, backbone: nn.Module, lm: nn.Module, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone.eval().requires_grad_(False).to(memory_format=CHANNELS_LAST)
        self.lm = lm
        self.tokenizer = tokenizer
        self.connector = MLPConnector(cfg.connector, backbone.embed_dim, lm_hidden_size(lm), cfg.image_pos,
                                      tuple(backbone.grid()))
        self.template = TEMPLATES[cfg.lm.template]
        self.resize = cfg.image_resize_strategy or backbone.data_config.resize

    @classmethod
    def build(cls, cfg: VLMConfig, tokenizer=None) -> "VLM":
        backbone = create_backbone(cfg.backbone, **cfg.backbone_overrides)
        if cfg.backbone_weights:
            load_backbone_weights(backbone, cfg.backbone_weights)
        lm, tok = build_lm(cfg.lm, tokenizer)
        return cls(cfg, backbone, lm, tok)

    @classmethod
    def from_prismatic(cls, run_dir: str | Path, llm: str | Path, vision_weights: str | Path,
                       backbone_overrides: dict | None = None, map_location: str = "cpu") -> "VLM":
        """Open a release (Prismatic) run directory: see ``toolkit.prismatic.load_prismatic``."""
        from toolkit.prismatic import load_prismatic

        return load_prismatic(run_dir, llm, vision_weights, backbone_overrides, map_location)

    def train(self, mode: bool = True) -> "VLM":
        super().train(mode)
        self.backbone.eval()  # frozen: never in train mode (drop path, dropout)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.connector.parameters()).device

    # -- images ---------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
        """PIL image -> normalised ``(3, H, W)`` model input and the geometry that maps boxes back."""
        dc = self.backbone.data_config
        img, geom = apply_geometry(image, dc.img_size, self.resize, fill=mean_fill(dc.mean))
        return normalize(pil_to_tensor(img.convert("RGB")), dc.mean, dc.std), geom

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> visual tokens ``(B, N, C_vis)`` from the frozen backbone."""
        return self.backbone(pixels.to(self.device).contiguous(memory_format=CHANNELS_LAST))

    # -- sequences ------------------------------------------------------------------------------
    def assemble(self, visual_tokens: torch.Tensor, prompts: Sequence[str], answers: Sequence[str] | None = None,
                 padding_side: str = "right") -> Batch:
        """Splice projected visual tokens ``(B, N, C_vis)`` into templated prompts (and answers, for training)."""
        return self.assemble_turns(visual_tokens, [[(p, None if answers is None else answers[i])]
                                                   for i, p in enumerate(prompts)], padding_side)

    def assemble_turns(self, visual_tokens: torch.Tensor, conversations: Sequence[Sequence[tuple[str, str | None]]],
                       padding_side: str = "right", isolate: bool = False) -> Batch:
        """One row per image: ``conversations[b]`` lists the turns ``(prompt, answer)`` about image b, written one
        after another as LLaVA's multi-turn data is (each answer closed by EOS, the next prompt right after). An answer
        of None (last turn only) ends the row at the prompt, for generation; answers carry the labels.

        ``isolate``: each turn attends only to BOS, the image and itself, and its positions restart right after the
        image, so a row of K turns computes exactly what K single-turn rows would, with the image tokens run once.
        (Written as one conversation, later turns can copy an earlier answer about the same object, a shortcut that
        single-turn evaluation does not offer.)"""
        tok = self.tokenizer
        n_img = visual_tokens.shape[1]
        pad = tok.pad_token_id
        has_answers = any(a is not None for conv in conversations for _, a in conv)
        rows, label_rows, img_rows, seg_rows, pos_rows = [], [], [], [], []
        for conv in conversations:
            head = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + [pad] * n_img
            ids, labels, segs, pos = list(head), [IGNORE_INDEX] * len(head), [0] * len(head), list(range(len(head)))
            for k, (p, a) in enumerate(conv, start=1):
                p_ids = tok(self.template.prompt(p), add_special_tokens=False).input_ids
                a_ids = [] if a is None else tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
                ids += p_ids + a_ids
                labels += [IGNORE_INDEX] * len(p_ids) + a_ids
                segs += [k] * (len(p_ids) + len(a_ids))
                pos += range(len(head), len(head) + len(p_ids) + len(a_ids))
            rows.append(ids)
            label_rows.append(labels)
            seg_rows.append(segs)
            pos_rows.append(pos)
            img_rows.append([False] * (len(head) - n_img) + [True] * n_img + [False] * (len(ids) - len(head)))
        t = max(map(len, rows))

        def padded(row, value):
            fill = [value] * (t - len(row))
            return fill + row if padding_side == "left" else row + fill

        dev = self.device
        input_ids = torch.tensor([padded(r, pad) for r in rows], device=dev)
        attn = torch.tensor([padded([1] * len(r), 0) for r in rows], device=dev)
        image_mask = torch.tensor([padded(r, False) for r in img_rows], device=dev)
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, T, d)
        vis = self.connector(visual_tokens.to(dev, embeds.dtype))  # (B, N, d)
        embeds = embeds.masked_scatter(image_mask[..., None], vis.to(embeds.dtype))  # autocast: vis may be bf16
        labels = torch.tensor([padded(r, IGNORE_INDEX) for r in label_rows], device=dev) if has_answers else None
        if not isolate or all(len(conv) <= 1 for conv in conversations):  # one turn per row: plain causal is isolated
            return Batch(embeds, attn, labels, image_mask, input_ids)
        seg = torch.tensor([padded(r, -1) for r in seg_rows], device=dev)  # (B, T): 0 BOS + image, k turn k, -1 pad
        pos = torch.tensor([padded(r, 0) for r in pos_rows], device=dev)
        q, k = seg[:, :, None], seg[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        allowed = causal & ((q == k) | (k == 0)) & (k >= 0) | torch.eye(t, dtype=torch.bool, device=dev)
        return Batch(embeds, allowed[:, None], labels, image_mask, input_ids, pos)

    def forward(self, visual_tokens: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Next-token loss on the answers, given precomputed visual tokens ``(B, N, C_vis)``."""
        return self.turns_loss(visual_tokens, [[(p, a)] for p, a in zip(prompts, answers)])

    def turns_loss(self, visual_tokens: torch.Tensor, conversations: Sequence[Sequence[tuple[str, str]]],
                   isolate: bool = False, reduction: str = "mean", unit: str = "token") -> torch.Tensor:
        """Next-token loss on every answer of ``conversations[b]``, the turns about image b (see ``assemble_turns``),
        averaged over the answer tokens (``unit="turn"``: each answer's mean token loss, averaged over the answers;
        ``reduction="sum"``: summed instead of averaged, for losses split over micro-batches)."""
        b = self.assemble_turns(visual_tokens, conversations, isolate=isolate)
        logits, targets = answer_logits(self.lm, b.inputs_embeds, b.attention_mask, b.labels, b.position_ids)
        if unit == "token":
            return F.cross_entropy(logits, targets, reduction=reduction)
        # the supervised tokens come in row order, each row's answers in turn order
        counts = torch.tensor(self.answer_token_counts([a for conv in conversations for _, a in conv]),
                              device=logits.device)
        weights = (1.0 / counts).repeat_interleave(counts)  # (K,): each answer's tokens sum to 1
        loss = (F.cross_entropy(logits, targets, reduction="none") * weights).sum()
        return loss if reduction == "sum" else loss / len(counts)

    def answer_token_counts(self, answers: Sequence[str]) -> list[int]:
        """Supervised tokens of each answer as ``assemble_turns`` writes them (its tokens and its EOS)."""
        return [len(ids) + 1 for ids in self.tokenizer(list(answers), add_special_tokens=False).input_ids]

    def answer_token_count(self, answers: Sequence[str]) -> int:
        return sum(self.answer_token_counts(answers))

    @torch.no_grad()
    def generate(self, visual_tokens: torch.Tensor, prompts: Sequence[str], max_new_tokens: int = 24) -> list[str]:
        """Greedy answers for a batch of precomputed visual tokens ``(B, N, C_vis)``."""
        b = self.assemble(visual_tokens, prompts, padding_side="left")
        out = self.lm.generate(
            inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # -- user-facing ----------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int = 24) -> list[str]:
        pixels = torch.stack([self.preprocess(im)[0] for im in images])
        return self.generate(self.encode_images(pixels), prompts, max_new_tokens)

    @torch.no_grad()
    def ground(self, image: Image.Image, expression: str) -> Grounding:
        """Box for a referring expression; an answer that is not a box comes back with ``valid=False``."""
        expression = validate_expression(expression)
        pixels, geom = self.preprocess(image)
        (answer,) = self.generate(self.encode_images(pixels[None]), [GROUNDING_PROMPT.format(expression=expression)])
        return self.read_box(answer, geom)

    def read_box(self, answer: str, geom: Geometry) -> Grounding:
        """Parse a box answer and map it onto the original image's pixels through the configured ``box_frame``."""
        box = parse_box(answer)
        if box is None:
            return Grounding(answer, False, None, None, geom)
        if self.cfg.box_frame == "original":
            pix = denormalize_box(box, geom.orig_w, geom.orig_h)
        else:
            pix = geom.norm_input_to_original(box)
        return Grounding(answer, True, box, pix, geom)

    # -- persistence ----------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Connector and LM weights (the backbone is frozen and saved once, apart)."""
        sd = {f"connector.{k}": v for k, v in self.connector.state_dict().items()}
        sd.update({f"lm.{k}": v for k, v in self.lm.state_dict().items()})
        return sd

    def save(self, run_dir: str | Path, trainable: dict[str, torch.Tensor] | None = None) -> None:
        """Write the VLM; ``trainable`` (keys as ``trainable_state_dict``'s) stands in for the module's own weights,
        e.g. the full weights gathered from FSDP shards."""
        from toolkit.checkpoints import save_safetensors

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        sd = dict(trainable) if trainable is not None else self.trainable_state_dict()
        # Tied input/output embeddings share storage; safetensors refuses shared tensors, so drop the alias.
        if getattr(self.lm.config, "tie_word_embeddings", False):
            sd.pop("lm.lm_head.weight", None)
        save_safetensors(sd, run_dir / "model.safetensors")
        self.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
        self.lm.config.save_pretrained(str(run_dir / "lm_config"))
        cfg = self.cfg.to_dict()
        if cfg["backbone_weights"]:
            cfg["backbone_weights"] = _stored_path(cfg["backbone_weights"], run_dir)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, run_dir: str | Path, map_location: str = "cpu") -> "VLM":
        """Rebuild from ``run_dir`` (config.json, tokenizer/, lm_config/, model.safetensors); clear errors if incomplete."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        run_dir = Path(run_dir)
        for part in ("config.json", "model.safetensors", "tokenizer", "lm_config"):
            if not (run_dir / part).exists():
                raise FileNotFoundError(f"{run_dir} is not a complete VLM run: `{part}` is missing")
        cfg = VLMConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        if cfg.backbone_weights:
            # absolute in memory, so a later save or chdir keeps it right
            cfg.backbone_weights = str((run_dir / cfg.backbone_weights).resolve())
        tok = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(run_dir / "lm_config")))
        backbone = create_backbone(cfg.backbone, **cfg.backbone_overrides)
        if cfg.backbone_weights:
            load_backbone_weights(backbone, cfg.backbone_weights)
        vlm = cls(cfg, backbone, lm, tok)
        sd = load_file(str(run_dir / "model.safetensors"), device=map_location)
        missing, unexpected = vlm.load_trainable(sd)
        if unexpected or [k for k in missing if k != "lm.lm_head.weight"]:
            raise ValueError(f"{run_dir}/model.safetensors does not fit config.json: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        return vlm

    def load_trainable(self, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        own = self.trainable_state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        self.connector.load_state_dict({k[10:]: v for k, v in sd.items() if k.startswith("connector.")})
        self.lm.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("lm.")}, strict=False)
        if getattr(self.lm.config, "tie_word_embeddings", False):
            self.lm.tie_weights()
        return missing, unexpected


def _stored_path(path: str | Path, vlm_dir: Path) -> str:
    """``path`` (absolute or relative to the cwd) as config.json keeps it: relative to ``vlm_dir`` when it lies in
    the same run tree (the directory holding ``vlms/``), so a moved or copied run reads its own file; else absolute."""
    path, vlm_dir = Path(path).resolve(), vlm_dir.resolve()
    root = vlm_dir.parent.parent if vlm_dir.parent.name == "vlms" else vlm_dir
    return os.path.relpath(path, vlm_dir) if path.is_relative_to(root) else str(path)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a backbone's weights from either kind of file: the toolkit's own (a flat file whose keys are exactly the
    backbone's ``state_dict`` keys, as pretraining writes it) or an official one (timm ``.safetensors``, VMamba /
    MambaVision ``.pth``, detectron2 ``.pkl``, mmdet / mmseg ``.pth``: ``Backbone.load_official``).

    Raises FileNotFoundError for a missing file and ``CheckpointMismatchError`` naming the offending keys when
    neither layout fits (measured against our keys when the file mostly holds them, else against the official ones).
    """
    from toolkit.backbones.base import CheckpointMismatchError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    keys, own = _flat_keys(path), backbone.state_dict().keys()
    if keys == set(own):
        _load_own_backbone(backbone, path)
        return
    try:
        backbone.load_official(path)
    except CheckpointMismatchError as official:
        err, ours = official, bool(keys) and len(keys & own) * 2 >= len(keys)  # mostly our names: judge by ours
        if ours:
            try:
                _load_own_backbone(backbone, path)
            except CheckpointMismatchError as e:
                err = e
        raise CheckpointMismatchError(f"neither this toolkit's backbone layout nor the official one fits; against "
                                      f"{'ours' if ours else 'the official one'}: {err}") from None


def _flat_keys(path: Path) -> set[str] | None:
    """The tensor names of a flat weights file, read without loading the tensors where the format allows;
    None for a nested or unreadable file (``load_official`` then reads it and reports what is wrong)."""
    if path.suffix == ".pkl":
        return None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return set(f.keys())
        except Exception:  # noqa: BLE001 (not a safetensors file: the loader says so)
            return None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (legacy format, truncated, unsafe: the loader says so)
        return None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return set(obj)
    return None


def _load_own_backbone(backbone: nn.Module, path: str | Path) -> None:
    """Load a backbone file the toolkit wrote (safetensors, our key names), reporting offending keys."""
    from toolkit.backbones.base import CheckpointMismatchError, _mismatch_message
    from toolkit.checkpoints import load_state_dict_file

    sd = load_state_dict_file(path)
    own = backbone.state_dict()
    missing = tuple(sorted(k for k in own if k not in sd))
    unexpected = tuple(sorted(k for k in sd if k not in own))
    bad = tuple(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                for k in own if k in sd and sd[k].shape != own[k].shape)
    if missing or unexpected or bad:
        raise CheckpointMismatchError(_mismatch_message(path, missing, unexpected, bad))
    backbone.load_state_dict(sd)


def validate_expression(expression: str) -> str:
    """Reject empty or absurdly long expressions with a message that says which."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("the referring expression is empty: type what to find, e.g. 'the red circle'")
    expression = " ".join(expression.split())
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the referring expression is {len(expression)} characters long; "
                         f"at most {MAX_EXPRESSION_CHARS} are accepted")
    return expression
