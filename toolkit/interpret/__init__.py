"""Interpretability for grounding answers, from the feature contract only: tensors in, tensors out (no plotting).

``analyze``/``compare`` are the entry points for one image; the parts are usable alone: text-image similarity,
backbone and LM attention, scan paths of 2-D selective scans, pixel saliency, token attributions. Every map type is
registered in ``toolkit.interpret.maps`` (``MAP_TYPES``, ``compute_map``), scored against a ground-truth box by
``toolkit.interpret.scores`` and run over a whole split by ``analyze_split`` (``vlmtk analyze``), whose outputs
``toolkit.interpret.browse`` reads back; ``toolkit.interpret.explore`` serves front ends that show one map type for
several backbones (menus over the declared options, the maps, the JSON export).
"""
from toolkit.interpret.analysis import Analysis, analyze, compare, results_table
from toolkit.interpret.attribution import TokenAttribution, pixel_saliency, token_integrated_gradients
from toolkit.interpret.batch import SplitAnalysis, analyze_split, score_table
from toolkit.interpret.browse import (analysis_scores, find_analyses, load_samples, no_analysis_message,
                                      sample_example, sample_pairs)
from toolkit.interpret.context import MapContext, build_context
from toolkit.interpret.explore import (Control, Gallery, PixelPoint, analysis_json, gallery_maps, option_controls,
                                       parse_options)
from toolkit.interpret.inputs import MAX_SIDE, format_pixel_box, load_image, parse_pixel_box
from toolkit.interpret.maps import MAP_TYPES, MapType, MapUnavailable, Option, compute_map, map_options, register_map
from toolkit.interpret.scores import (DELETION_FRACTIONS, DeletionCurve, deletion_curve, deletion_curves,
                                      mass_in_box, pointing_game, random_map)
from toolkit.runs import Example, example_images, photo_examples
from toolkit.interpret.attention import (BackboneAttention, LMAttention, backbone_attention, capture_attention,
                                         lm_attention_rollout, lm_image_attention)
from toolkit.interpret.scan_paths import ScanPath, capture_scan_inputs, scan_paths
from toolkit.interpret.similarity import Similarity, text_image_similarity

__all__ = [
    "DELETION_FRACTIONS", "MAP_TYPES", "MAX_SIDE", "Analysis", "BackboneAttention", "Control", "DeletionCurve",
    "Example", "Gallery", "LMAttention", "MapContext", "MapType", "MapUnavailable", "Option", "PixelPoint",
    "ScanPath", "Similarity", "SplitAnalysis", "TokenAttribution", "analysis_json", "analysis_scores", "analyze",
    "analyze_split", "backbone_attention", "build_context", "capture_attention", "capture_scan_inputs", "compare",
    "compute_map", "deletion_curve", "deletion_curves", "example_images", "find_analyses", "format_pixel_box",
    "gallery_maps", "lm_attention_rollout", "lm_image_attention", "load_image", "load_samples", "map_options",
    "mass_in_box", "no_analysis_message", "option_controls", "parse_options", "parse_pixel_box", "photo_examples",
    "pixel_saliency", "pointing_game", "random_map", "register_map", "results_table", "sample_example",
    "sample_pairs", "scan_paths", "score_table", "text_image_similarity", "token_integrated_gradients",
]
