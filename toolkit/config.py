"""Experiment configs as dataclasses. Named presets override only what differs from the defaults;
the resolved config is saved as JSON in every run directory."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from toolkit.llm import LMConfig


@dataclass(frozen=True)
class PretrainConfig:
    """The one classification recipe every backbone family gets (matched settings)."""

    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    label_smoothing: float = 0.1
    max_shift: int = 8  # random translation in pixels (labels are colour+shape: no colour jitter, flips are fine)
    head: str = "tap-max"  # toolkit.train.pretrain.Classifier: max-pooled tap tokens, or "pooled" (whole network)


DENSE = "+dense"  # backbone spec suffix: the backbone after dense-task tuning (toolkit.train.dense)


CONNECTOR_SEP = "@"  # VLM spec suffix naming its connector: "vit-scene-128+dense@mlp3x_gelu"


def split_vlm_spec(spec: str) -> tuple[str, str | None]:
    """``"vit-scene-128+dense@mlp3x_gelu"`` -> (``"vit-scene-128+dense"``, ``"mlp3x_gelu"``): the backbone spec and
    the connector (None: the experiment's ``connector``)."""
    backbone, sep, connector = spec.partition(CONNECTOR_SEP)
    return backbone, (connector if sep else None)


def split_spec(spec: str) -> tuple[str, bool]:
    """``"vit-scene-128+dense"`` -> (``"vit-scene-128"``, True): registry name and whether it is dense-tuned."""
    return (spec[: -len(DENSE)], True) if spec.endswith(DENSE) else (spec, False)


@dataclass(frozen=True)
class DenseConfig:
    """Dense-task tuning after pretraining (matched across families): segmentation of the world's COCO masks."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    label_stride: int = 4  # label maps at 1/4 of the input side (32x32 at 128 px), as ADE20K heads predict


@dataclass(frozen=True)
class StageConfig:
    """One VLM training stage. ``align`` trains the connector; ``finetune`` connector and LM (Prismatic)."""

    name: str = "finetune"
    steps: int = 1100
    lr: float = 1.5e-3
    batch_size: int = 32
    train_lm: bool = True


@dataclass(frozen=True)
class TrainConfig:
    lm_pretrain_steps: int = 300  # text-only warm-up of a fresh LM on the world's answers, shared by all backbones
    stages: tuple[StageConfig, ...] = (StageConfig(),)  # single finetune stage = Prismatic's "no-align"
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    grounding_fraction: float = 0.5  # share of grounding turns in the training mix (the rest is VQA)
    objects_fraction: float = 0.2  # share of "list every object with its box" turns (toolkit.data.formats)
    # Turns per image in one training sequence (LLaVA's multi-turn rows); a stage's batch_size counts images.
    turns_per_image: int = 1
    # Scale (toolkit.train.distributed): a stage's batch_size is the global batch, split over torchrun's processes
    # and grad_accum micro-batches; "bf16" autocasts the forward; LoRA (peft) of rank lora_r replaces full
    # fine-tuning of the LM when > 0 (merged into the LM when the VLM is saved).
    grad_accum: int = 1
    # What the loss averages over: "token" (every answer token alike, as LLaVA/Prismatic train) or "turn" (each
    # answer's mean token loss, every turn alike: a one-word VQA answer then weighs as much as a box).
    loss_unit: str = "token"
    strategy: str = "ddp"  # "ddp" | "fsdp", used when launched by torchrun with more than one process
    precision: str = "fp32"  # "fp32" | "bf16"
    activation_checkpointing: bool = False
    lora_r: int = 0
    checkpoint_every: int = 100
    # Grounding Acc@0.5 on monitor_expressions validation expressions per style, at monitor_points evenly spaced
    # steps of VLM training (the last included): the training curves' accuracy panel. 0 points: off.
    monitor_points: int = 5
    monitor_expressions: int = 32
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    max_per_style: int = 200  # referring expressions per RefCOCO-style split
    max_vqa: int = 400
    max_reliance: int = 512  # val turns scored with true vs shuffled image tokens (toolkit.eval.reliance)
    batch_size: int = 64
    max_new_tokens: int = 20


# Objects at 2x the base sizes (28-90 px in a 128 px scene): against 1.6x, grounding Acc@0.5 rose for ViT, MaxViT and
# MambaVision in the same recipe (benchmarks/RESULTS.md, "Larger objects").
EASY_WORLD = dict(object_scale=2.0, min_objects=1, max_objects=3)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "demo"
    # One backbone per family of the study, matched in visual tokens (8x8) and width (128) at the tap.
    backbones: tuple[str, ...] = ("vit-scene-128", "maxvit-scene-128-s3", "mambavision-scene-128-s3",
                                  "vmamba-scene-128-s3")
    connector: str = "mlp2x_gelu"
    # A 2-D position code on the image tokens, which the small LMs here need to learn grounding in minutes (see
    # toolkit.connector.MLPConnector); "none" is the study's connector, for paper-scale LMs.
    image_pos: str = "sincos2d"
    # 4 layers: at the same wall time as 2000 steps of a 2-layer LM, 1100 steps of a 4-layer one ground better
    # (benchmarks/RESULTS.md, "VLM budget probes").
    lm: LMConfig = LMConfig(num_layers=4)
    # SceneWorldConfig overrides. The default world has 1-3 objects of 2x the base sizes; the "embedded-hard" preset
    # keeps the base world (2-6 objects, base sizes).
    world: dict = field(default_factory=lambda: dict(EASY_WORLD))
    pretrain: PretrainConfig = PretrainConfig()
    dense: DenseConfig = DenseConfig()  # used by backbones named with the "+dense" suffix
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    figure_examples: int = 4
    device: str = "auto"
    # Paper scale. {registry name: a pretrained file} (the toolkit's own, or official timm / VMamba / MambaVision /
    # detectron2 / mmdet / mmseg weights): that backbone is taken as given instead of pretrained on the world.
    backbone_weights: dict = field(default_factory=dict)
    # A LLaVA conversation file (and the folder its image paths are relative to) to train the VLMs on instead of the
    # world's; evaluation stays on the world's val split (`vlmtk eval` scores real benchmarks).
    train_llava: str | None = None
    train_images: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentConfig":
        """A saved ``config.json`` back as a config, every field checked as ``--set`` checks it."""
        return _coerce(cls(), json.loads(Path(path).read_text()), str(path))


def _preset_smoke() -> ExperimentConfig:
    """Seconds-long run over tiny models: the test suite's end-to-end check."""
    return ExperimentConfig(
        name="smoke", backbones=("vit-test", "vmamba-test", "vmamba-test+dense", "vit-test@mlp3x_gelu"),
        lm=LMConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, vocab_size=600),
        world=dict(image_size=32, n_train=120, n_val=30, n_test=10, n_cls_train=240, n_cls_val=48),
        pretrain=PretrainConfig(epochs=1, batch_size=32, warmup_steps=2, max_shift=2),
        dense=DenseConfig(epochs=1, batch_size=32, warmup_steps=2),
        train=TrainConfig(lm_pretrain_steps=20, stages=(StageConfig("align", 10, 1e-3, 16, False),
                                                        StageConfig("finetune", 20, 1e-3, 16, True)),
                          checkpoint_every=10, monitor_expressions=8),
        eval=EvalConfig(max_per_style=20, max_vqa=20, max_reliance=64, batch_size=32, max_new_tokens=20),
        figure_examples=2,
    )


def _preset_embedded_dense() -> ExperimentConfig:
    """The embedded comparison grown by each family's dense-tuned variant (the study's COCO/ADE20K backbones)."""
    base = ExperimentConfig()
    return replace(base, name="embedded-dense", backbones=base.backbones + tuple(b + DENSE for b in base.backbones))


def _preset_embedded_ablation() -> ExperimentConfig:
    """The study's ablation in miniature: for every family, plain vs dense-tuned backbone x 2- vs 3-layer connector
    (16 VLMs on 4 pretrained and 4 dense-tuned backbones)."""
    base = ExperimentConfig()
    specs = tuple(f"{b}{d}{c}" for b in base.backbones for d in ("", DENSE) for c in ("", CONNECTOR_SEP + "mlp3x_gelu"))
    return replace(base, name="embedded-ablation", backbones=specs)


def _preset_embedded_hard() -> ExperimentConfig:
    """The embedded comparison on the base world: 2-6 objects per scene at the base sizes (small ones 14-19 px)."""
    return replace(ExperimentConfig(), name="embedded-hard", world={})


def _preset_gpu() -> ExperimentConfig:
    """The same pipeline at larger sizes for a GPU machine, with SmolLM2-135M (real pretrained weights) as the LM."""
    return ExperimentConfig(
        name="gpu",
        lm=LMConfig(name_or_path="smollm2-135m"),
        world=dict(EASY_WORLD, n_train=20000, n_val=1000, n_test=1000, n_cls_train=40000, n_cls_val=2000),
        pretrain=PretrainConfig(epochs=10, batch_size=256),
        train=TrainConfig(lm_pretrain_steps=1000, stages=(StageConfig("finetune", 5000, 5e-4, 64, True),)),
        eval=EvalConfig(max_per_style=1000, max_vqa=2000, batch_size=256),
    )


PRESETS = {"embedded": ExperimentConfig, "embedded-dense": _preset_embedded_dense,
           "embedded-hard": _preset_embedded_hard, "embedded-ablation": _preset_embedded_ablation,
           "smoke": _preset_smoke,
           "gpu": _preset_gpu}


def _coerce(current: Any, value: Any, where: str) -> Any:
    """``value`` (parsed from JSON) as the type of the field it replaces, ``current``; a clear error naming ``where``
    otherwise. Dicts become the field's dataclass (``train.stages=[{"steps": 500}]`` -> StageConfig entries, unset
    fields at their defaults), lists become tuples; ``None`` fields take any value (e.g. ``lm.name_or_path``)."""
    if dataclasses.is_dataclass(current):
        if dataclasses.is_dataclass(value) and isinstance(value, type(current)):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"`{where}` takes a JSON object of {type(current).__name__} fields, not {value!r}")
        fields = {f.name for f in dataclasses.fields(current)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise KeyError(f"`{where}`: {', '.join(unknown)} not field(s) of {type(current).__name__} "
                           f"(fields: {', '.join(sorted(fields))})")
        base = type(current)()  # a new entry starts from the defaults, not from the entry it replaces
        return replace(base, **{k: _coerce(getattr(base, k), v, f"{where}.{k}") for k, v in value.items()})
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{where}` takes a JSON list, not {value!r}")
        like = current[0] if current else None
        return tuple(v if like is None else _coerce(like, v, f"{where}.{i}") for i, v in enumerate(value))
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise ValueError(f"`{where}` takes a JSON object, not {value!r}")
        return dict(value)
    if current is None:
        return value
    if isinstance(current, bool) or isinstance(value, bool):
        if not (isinstance(current, bool) and isinstance(value, bool)):
            raise ValueError(f"`{where}` takes a {type(current).__name__}, not {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(current)):
        raise ValueError(f"`{where}` takes a {type(current).__name__}, not {value!r}")
    return value


def _set(obj: Any, path: list[str], value: Any, where: str = "") -> Any:
    """A copy of ``obj`` (dataclass, tuple or dict) with ``path`` set to ``value``, coerced to the field's type."""
    head, rest = path[0], path[1:]
    where = f"{where}.{head}" if where else head
    if isinstance(obj, tuple):
        try:
            i = int(head)
            old = obj[i]
        except (ValueError, IndexError):
            raise KeyError(f"`{where}`: no entry {head} (the list has {len(obj)})") from None
        return obj[:i] + (_set(old, rest, value, where) if rest else _coerce(old, value, where),) + obj[i + 1:]
    if isinstance(obj, dict):
        if not rest:
            return {**obj, head: value}  # free-form overrides (world): checked where they are used
        if head not in obj:
            raise KeyError(f"`{where}` is not set, so `{'.'.join(rest)}` inside it cannot be")
        return {**obj, head: _set(obj[head], rest, value, where)}
    if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
        raise KeyError(f"`{head}` is not a field of {type(obj).__name__}")
    old = getattr(obj, head)
    if not rest and value is None and "None" in str(next(f.type for f in dataclasses.fields(obj) if f.name == head)):
        return replace(obj, **{head: None})  # an optional field unset
    return replace(obj, **{head: _set(old, rest, value, where) if rest else _coerce(old, value, where)})


def apply_overrides(cfg: ExperimentConfig, assignments: list[str]) -> ExperimentConfig:
    """Dotted ``key=value`` overrides, values parsed as JSON where they parse (``pretrain.epochs=4``,
    ``train.stages.0.steps=1200``, ``world.n_train=5000``, ``lm.num_layers=4``,
    ``train.stages=[{"name": "align", "steps": 200, "train_lm": false}, {"steps": 800}]``). Every value is checked
    against its field's type here, before any work starts."""
    for a in assignments:
        key, sep, raw = a.partition("=")
        if not sep or not key:
            raise ValueError(f"override `{a}` is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        cfg = _set(cfg, key.split("."), value)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Checks that need more than a field's type, run before any work: world fields, stages, budgets."""
    from toolkit.data import SceneWorldConfig

    world_fields = {f.name for f in dataclasses.fields(SceneWorldConfig)}
    unknown = sorted(set(cfg.world) - world_fields)
    if unknown:
        raise KeyError(f"world: {', '.join(unknown)} not field(s) of SceneWorldConfig "
                       f"(fields: {', '.join(sorted(world_fields))})")
    if not cfg.train.stages:
        raise ValueError("train.stages is empty: a VLM needs at least one training stage")
    for i, st in enumerate(cfg.train.stages):
        if st.steps < 1 or st.batch_size < 1 or st.lr <= 0:
            raise ValueError(f"train.stages.{i}: steps, batch_size and lr must be positive, got {st}")
    t = cfg.train
    if t.grad_accum < 1 or t.turns_per_image < 1 or t.lora_r < 0:
        raise ValueError(f"train: grad_accum and turns_per_image must be >= 1 and lora_r >= 0, got {t.grad_accum}, "
                         f"{t.turns_per_image}, {t.lora_r}")
    from toolkit.train.distributed import STRATEGIES

    for field_, value, allowed in (("strategy", t.strategy, STRATEGIES), ("precision", t.precision, ("fp32", "bf16")),
                                   ("loss_unit", t.loss_unit, ("token", "turn"))):
        if value not in allowed:
            raise ValueError(f"train.{field_}={value!r}; choose one of {allowed}")
    if t.lora_r and t.strategy == "fsdp":
        raise ValueError("train.lora_r with strategy fsdp is not supported: LoRA trains a few small matrices, use ddp")
    for name in ("pretrain", "dense"):
        c = getattr(cfg, name)
        if c.epochs < 1 or c.batch_size < 1 or c.lr <= 0:
            raise ValueError(f"{name}: epochs, batch_size and lr must be positive, got {c}")
    if not cfg.backbones:
        raise ValueError("backbones is empty: name at least one registered backbone")
    bases = {split_spec(split_vlm_spec(b)[0])[0] for b in cfg.backbones}
    for name, path in cfg.backbone_weights.items():
        if name not in bases:
            raise KeyError(f"backbone_weights names `{name}`, which is not among the run's backbones "
                           f"({', '.join(sorted(bases))})")
        if not Path(path).is_file():
            raise FileNotFoundError(f"backbone_weights[{name!r}]: {path} not found")
    _check_lm_is_local(cfg.lm.name_or_path)
    if (cfg.train_llava is None) != (cfg.train_images is None):
        raise ValueError("train_llava and train_images go together: the LLaVA file and the folder of its images")
    if cfg.train_llava is not None and not Path(cfg.train_llava).is_file():
        raise FileNotFoundError(f"train_llava: {cfg.train_llava} not found")
    if cfg.train_images is not None and not Path(cfg.train_images).is_dir():
        raise FileNotFoundError(f"train_images: {cfg.train_images} is not a folder")


def _check_lm_is_local(name: str | None) -> None:
    """An LM is a packaged alias, a local directory, or a hub id already in the Hugging Face cache: nothing is
    downloaded, so anything else fails here instead of after hours of pretraining."""
    from toolkit.llm import LM_PACKAGES

    if name is None or name in LM_PACKAGES or Path(name).is_dir():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid hub id either (e.g. a path that does not exist)
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(f"lm.name_or_path: `{name}` is neither a local directory nor a model in the Hugging "
                                f"Face cache (nothing is downloaded here)")


def preset(preset_name: str, **overrides: Any) -> ExperimentConfig:
    """A named preset with top-level field ``overrides`` (e.g. ``backbones=("vit-test",)``)."""
    if preset_name not in PRESETS:
        raise KeyError(f"unknown preset `{preset_name}`; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset_name]()
    return replace(cfg, **overrides) if overrides else cfg
