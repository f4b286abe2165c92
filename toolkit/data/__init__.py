"""The embedded scene world (a no-download stand-in for RefCOCO/+/g, VQAv2, LLaVA data and ImageNet-1K) and
loaders of the real formats. Generation: :mod:`toolkit.data.world`; language and the resolver:
:mod:`toolkit.data.expressions`; on-disk layout, writers and loaders: :mod:`toolkit.data.formats`."""
from toolkit.data.expressions import (COLOURS, LOCATION_WORDS, QUESTION_TYPES, SHAPES, SIZES, STYLES, VQA_PROMPT,
                                      Query, SceneObject, holds, parse_expression, relation, render_expression, resolve)
from toolkit.data.formats import (IGNORE_PIXEL, CocoImage, ConversationExample, FormatError, RefExample, VQAExample,
                                  load_annotation_pickle, load_coco_instances, load_coco_semantic, load_llava,
                                  load_refcoco, load_vqa, load_vqa_split, scene_objects)
from toolkit.data.world import (CLASS_NAMES, Scene, SceneWorldConfig, WorldPaths, build_world, render_classification,
                                render_scene)

__all__ = [
    "CLASS_NAMES", "COLOURS", "IGNORE_PIXEL", "LOCATION_WORDS", "QUESTION_TYPES", "SHAPES", "SIZES", "STYLES",
    "VQA_PROMPT", "CocoImage", "ConversationExample", "FormatError", "Query", "RefExample",
    "Scene", "SceneObject", "SceneWorldConfig", "VQAExample", "WorldPaths", "build_world",
    "holds", "load_annotation_pickle", "load_coco_instances", "load_coco_semantic",
    "load_llava", "load_refcoco", "load_vqa", "load_vqa_split", "parse_expression", "relation",
    "render_classification", "render_expression", "render_scene", "resolve", "scene_objects",
]
