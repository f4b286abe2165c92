"""Interpretability for grounding answers, from the feature contract only: tensors in, tensors out (no plotting).

``analyze``/``compare`` are the entry points; the parts are usable alone: text-image similarity, backbone and LM
attention, scan paths of 2-D selective scans, pixel saliency.
"""
from toolkit.interpret.analysis import Analysis, analyze, compare, results_table
from toolkit.interpret.attribution import pixel_saliency
from toolkit.interpret.inputs import MAX_SIDE, format_pixel_box, load_image, parse_pixel_box
from toolkit.runs import Example, example_images, photo_examples
from toolkit.interpret.attention import (BackboneAttention, LMAttention, backbone_attention, capture_attention,
                                         lm_image_attention)
from toolkit.interpret.scan_paths import ScanPath, capture_scan_inputs, scan_paths
from toolkit.interpret.similarity import Similarity, text_image_similarity

__all__ = [
    "MAX_SIDE", "Analysis", "BackboneAttention", "Example", "LMAttention", "ScanPath", "Similarity", "analyze",
    "backbone_attention", "capture_attention", "capture_scan_inputs", "compare", "example_images", "format_pixel_box",
    "lm_image_attention", "load_image", "parse_pixel_box", "photo_examples", "pixel_saliency", "results_table",
    "scan_paths", "text_image_similarity",
]
