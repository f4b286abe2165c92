"""The scene world: procedural images of coloured shapes, generated deterministically and cached on disk.

Scenes hold ``min_objects..max_objects`` objects (6 shapes x 8 colours x 3 sizes) on a muted background
(solid, gradient, smooth noise or checks; saturation <= 0.18, so never confusable with the saturated object
colours). Objects are drawn in order with anti-aliasing and may overlap; a placement is rejected when it would
leave any object less than ``MIN_VISIBLE`` visible, so every object stays referable. Each object's mask is
its *visible* mask (after occlusion) and its box is the tight box of that mask (xyxy pixels, x2/y2 exclusive).

Everything is drawn from ``numpy.random.default_rng([seed, stream, split, index])``: each image depends only
on its own index, so generation parallelises and the same seed gives byte-identical PNGs and JSON.
The files written and their formats are described in :mod:`toolkit.data.formats`.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from toolkit.data import formats
from toolkit.data.expressions import (COLOURS, QUESTION_TYPES, SHAPES, SIZES, STYLES, SceneObject, generate_refs,
                                      generate_vqa)

GENERATOR_VERSION = 1  # bump when the generated content changes: invalidates every cached world
SPLITS = ("train", "val", "test")
CLASS_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # the ImageNet-1K analogue's labels
COLOUR_RGB = {"red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (245, 215, 25), "green": (30, 165, 60),
              "cyan": (0, 200, 215), "blue": (35, 75, 225), "purple": (135, 50, 200), "pink": (250, 105, 190)}
SIZE_RADIUS = {"small": (0.055, 0.075), "medium": (0.095, 0.12), "large": (0.145, 0.175)}  # half-extent / side
MIN_VISIBLE = 0.6  # an object may lose at most 40% of its pixels to occluders
_MIN_RADIUS = 3.0  # pixels: keeps shapes drawable at tiny resolutions
_STREAM = {"scene": 0, "language": 1, "classification": 2}


def _polygon(shape: str) -> np.ndarray:
    """Unit outline ``(K, 2)`` centred on the origin, extent about [-1, 1] (y down)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return 0.9 * np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        return np.array([[0.0, -0.9], [1.0, 0.85], [-1.0, 0.85]])
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t) + 0.05], 1)
    if shape == "diamond":
        return np.array([[0.0, -1.0], [0.8, 0.0], [0.0, 1.0], [-0.8, 0.0]])
    if shape == "cross":
        a, w = 0.95, 0.32
        return np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a], [-w, w], [-a, w],
                         [-a, -w], [-w, -w]])
    raise KeyError(f"unknown shape `{shape}`; choose one of {SHAPES}")


_POLYGONS = {s: _polygon(s) for s in SHAPES}


@dataclass(frozen=True)
class SceneWorldConfig:
    """What to generate. Counts are images per split; classification splits need at least one image per class
    (``len(CLASS_NAMES)`` = 48) so that ImageFolder sees the same classes in every split."""

    seed: int = 0
    image_size: int = 128
    n_train: int = 3000
    n_val: int = 300
    n_test: int = 300
    n_cls_train: int = 6000
    n_cls_val: int = 600
    min_objects: int = 2
    max_objects: int = 6
    refs_per_scene: int = 2  # referred objects per scene and style
    sentences_per_ref: int = 2
    object_scale: float = 1.0  # multiplies every size's radius range (SIZE_RADIUS)

    def __post_init__(self):
        if not 32 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be in [32, 4096], got {self.image_size}")
        if not 0.25 <= self.object_scale <= 2.5:
            raise ValueError(f"object_scale must be in [0.25, 2.5], got {self.object_scale}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 8, got {self.min_objects}..{self.max_objects}")
        for name in ("n_cls_train", "n_cls_val"):
            n = getattr(self, name)
            if 0 < n < len(CLASS_NAMES):
                raise ValueError(f"{name}={n}: use 0 or at least {len(CLASS_NAMES)} (one image per class)")

    def scene_count(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def first_image_id(self, split: str) -> int:
        """Image ids are unique across splits (the RefCOCO instances file holds every split)."""
        return 1 + sum(self.scene_count(s) for s in SPLITS[:SPLITS.index(split)])


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: list[SceneObject]
    masks: np.ndarray  # (N, H, W) bool, visible masks in drawing order
    visible_fraction: list[float]  # visible / full pixels per object, >= MIN_VISIBLE


def _rng(cfg: SceneWorldConfig, stream: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _STREAM[stream], SPLITS.index(split), index])


def _muted(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.18), rng.uniform(0.35, 0.85))) * 255


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(S, S, 3)`` float32: solid, gradient, smooth grey noise or checks, all in muted colours."""
    base = _muted(rng)
    kind = int(rng.integers(4))
    if kind == 0:
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if kind == 1:
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return (base * (1 - t[..., None]) + _muted(rng) * t[..., None]).astype(np.float32)
    if kind == 2:
        k = int(rng.integers(3, 10))
        noise = cv2.resize(rng.uniform(-30, 30, (k, k)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        return np.clip(base + noise[..., None], 0, 255).astype(np.float32)
    period = rng.uniform(0.08, 0.25)
    checks = ((xx // period + yy // period) % 2)[..., None]
    return (base * (1 - checks) + _muted(rng) * checks).astype(np.float32)


def _alpha(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Anti-aliased coverage ``(S, S)`` in [0, 1] of one shape (sub-pixel vertices, 4 fractional bits)."""
    canvas = np.zeros((size, size), np.uint8)
    pts = np.round((_POLYGONS[shape] * radius + (cx, cy)) * 16).astype(np.int32)
    cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _paint(img: np.ndarray, alpha: np.ndarray, colour: str, rng: np.random.Generator) -> None:
    rgb = np.clip(np.array(COLOUR_RGB[colour]) + rng.integers(-12, 13, 3), 0, 255)  # small jitter, still unambiguous
    img *= 1 - alpha[..., None]
    img += alpha[..., None] * rgb.astype(np.float32)


def _radius(rng: np.random.Generator, size_name: str, cfg: SceneWorldConfig) -> float:
    return max(_MIN_RADIUS, rng.uniform(*SIZE_RADIUS[size_name]) * cfg.object_scale * cfg.image_size)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """xyxy of the non-zero pixels of ``mask (H, W)``, x2/y2 exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def render_scene(cfg: SceneWorldConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a pure function of (config, split, index)."""
    rng, size = _rng(cfg, "scene", split, index), cfg.image_size
    img = _background(rng, size)
    colours = rng.choice(COLOURS, int(rng.integers(2, len(COLOURS) + 1)), replace=False)  # a per-scene palette
    shapes = rng.choice(SHAPES, int(rng.integers(2, len(SHAPES) + 1)), replace=False)  # makes repeats likely
    placed: list[tuple[str, str, str]] = []
    full: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        for _attempt in range(30):
            shape, colour, size_name = str(rng.choice(shapes)), str(rng.choice(colours)), str(rng.choice(SIZES))
            r = _radius(rng, size_name, cfg)
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            alpha = _alpha(shape, cx, cy, r, size)
            mask = alpha >= 0.5
            if mask.any() and all((v & ~mask).sum() >= MIN_VISIBLE * f.sum() for v, f in zip(visible, full)):
                break
        else:
            continue  # no room left: fewer objects
        visible = [v & ~mask for v in visible] + [mask]
        full.append(mask)
        placed.append((shape, colour, size_name))
        _paint(img, alpha, colour, rng)
    objects = [SceneObject(s, c, z, tight_box(v)) for (s, c, z), v in zip(placed, visible)]
    return Scene(np.round(img).astype(np.uint8), objects, np.stack(visible),
                 [float(v.sum() / f.sum()) for v, f in zip(visible, full)])


def render_classification(cfg: SceneWorldConfig, split: str, index: int) -> tuple[np.ndarray, str]:
    """Single-object image ``index`` of ``split`` and its label; labels cycle so every class is present."""
    rng, size = _rng(cfg, "classification", split, index), cfg.image_size
    label = CLASS_NAMES[index % len(CLASS_NAMES)]
    colour, shape = label.split()
    img = _background(rng, size)
    r = _radius(rng, str(rng.choice(SIZES)), cfg)
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    _paint(img, _alpha(shape, cx, cy, r, size), colour, rng)
    return np.round(img).astype(np.uint8), label


def class_folder(label: str) -> str:
    """ImageFolder directory name of a label: "red circle" -> "red_circle"."""
    return label.replace(" ", "_")


def _write_png(path: Path, img: np.ndarray) -> str:
    """Write an RGB image; returns the sha256 of the bytes (the content hash never re-reads files)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    data = buf.tobytes()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _scene_job(args: tuple[SceneWorldConfig, str, int, str]) -> tuple[formats.AnnotatedImage, str]:
    cfg, split, index, root = args
    scene = render_scene(cfg, split, index)
    image_id = cfg.first_image_id(split) + index
    file_name = f"{split}/{image_id:06d}.png"
    digest = _write_png(Path(root) / "images" / file_name, scene.image)
    lang = _rng(cfg, "language", split, index)
    refs = {style: generate_refs(scene.objects, cfg.image_size, style, lang, cfg.refs_per_scene,
                                 cfg.sentences_per_ref) for style in STYLES}
    rec = formats.AnnotatedImage(
        image_id=image_id, split=split, file_name=file_name, width=cfg.image_size, height=cfg.image_size,
        objects=scene.objects, areas=[int(m.sum()) for m in scene.masks],
        polygons=[formats.mask_polygons(m) for m in scene.masks], refs=refs,
        vqa=generate_vqa(scene.objects, cfg.image_size, lang))
    return rec, digest


def _classification_job(args: tuple[SceneWorldConfig, str, int, str]) -> tuple[str, str]:
    cfg, split, index, root = args
    img, label = render_classification(cfg, split, index)
    rel = f"classification/{split}/{class_folder(label)}/{index:06d}.png"
    return rel, _write_png(Path(root) / rel, img)


def _counts(records: list[formats.AnnotatedImage], cfg: SceneWorldConfig) -> dict:
    """Per split: scenes, objects, expressions per style, questions per type; classification images."""
    out = {}
    for split in SPLITS:
        recs = [r for r in records if r.split == split]
        out[split] = {"scenes": len(recs), "objects": sum(len(r.objects) for r in recs),
                      **{style: sum(len(s) for r in recs for _, s in r.refs[style]) for style in STYLES},
                      **{f"vqa_{t}": sum(q.question_type == t for r in recs for q in r.vqa) for t in QUESTION_TYPES}}
    out["classification"] = {"train": cfg.n_cls_train, "val": cfg.n_cls_val}
    return out


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool already uses every core


@dataclass(frozen=True)
class WorldPaths:
    """Where a generated world lives; the layout is described in :mod:`toolkit.data.formats`."""

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def coco(self) -> Path:
        return self.root / "coco"

    @property
    def vqa(self) -> Path:
        return self.root / "vqa"

    @property
    def llava(self) -> Path:
        return self.root / "llava"

    @property
    def classification(self) -> Path:
        return self.root / "classification"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def refs_dir(self, dataset: str) -> Path:
        return self.root / dataset


_POOL_MIN_JOBS = 1000
_GENERATED = ("images", "coco", "vqa", "llava", "classification") + STYLES


def build_world(root: str | Path, cfg: SceneWorldConfig = SceneWorldConfig(), progress: bool = True,
                workers: int | None = None) -> WorldPaths:
    """Generate the world under ``root`` unless its manifest already matches ``cfg`` (then return at once).

    The manifest is written last, so an interrupted build is redone from scratch on the next call.
    ``workers`` processes render images (default: every core for large builds, none for small ones, where
    starting them costs more than it saves); the output never depends on it. Workers come from a fork server,
    never from a fork of the caller, whose threads (OpenCV's pool, tqdm's monitor) can deadlock a forked child.
    """
    paths = WorldPaths(Path(root))
    wanted = {"generator_version": GENERATOR_VERSION, "config": asdict(cfg)}
    if paths.manifest.is_file():
        manifest = json.loads(paths.manifest.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            return paths
    for name in _GENERATED + ("manifest.json",):
        target = paths.root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for split in SPLITS:
        (paths.images / split).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", cfg.n_cls_train), ("val", cfg.n_cls_val)):
        for label in CLASS_NAMES if n else ():
            (paths.classification / split / class_folder(label)).mkdir(parents=True, exist_ok=True)

    scene_jobs = [(cfg, s, i, str(paths.root)) for s in SPLITS for i in range(cfg.scene_count(s))]
    cls_jobs = [(cfg, s, i, str(paths.root)) for s, n in (("train", cfg.n_cls_train), ("val", cfg.n_cls_val))
                for i in range(n)]
    workers = workers or ((os.cpu_count() or 1) if len(scene_jobs) + len(cls_jobs) >= _POOL_MIN_JOBS else 1)
    digests: dict[str, str] = {}
    records: list[formats.AnnotatedImage] = []
    bar = tqdm(total=len(scene_jobs) + len(cls_jobs), desc="scene world", unit="img", disable=not progress)
    pool = None
    if workers > 1:
        ctx = get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # imported once in the server, not once per worker
        pool = ctx.Pool(workers, initializer=_init_worker)
    def run(fn, jobs, chunk):
        return pool.imap(fn, jobs, chunk) if pool else map(fn, jobs)

    try:
        for rec, digest in run(_scene_job, scene_jobs, 16):
            records.append(rec)
            digests[f"images/{rec.file_name}"] = digest
            bar.update()
        for rel, digest in run(_classification_job, cls_jobs, 32):
            digests[rel] = digest
            bar.update()
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    digests.update(formats.write_annotations(paths.root, records))
    content = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()
    manifest = {**wanted, "content_sha256": content, "files": len(digests),
                "counts": _counts(records, cfg)}
    tmp = paths.manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(paths.manifest)
    return paths
