"""Plotly figures over ``toolkit.interpret`` results; the ipywidgets UI (``Explorer``) loads on first use."""
from toolkit.viz.figures import (DIRECTIONS, export_comparison, export_gallery, for_screen, grounding_title,
                                 map_gallery, save_figure, save_figure_as, scan_path_figure, side_by_side)
from toolkit.viz.overlays import box_shapes, display_size, heatmap_trace, image_trace, map_on_original

__all__ = ["DIRECTIONS", "Explorer", "box_shapes", "display_size", "export_comparison", "export_gallery",
           "for_screen", "grounding_title", "heatmap_trace", "image_trace", "map_gallery", "map_on_original",
           "save_figure", "save_figure_as", "scan_path_figure", "side_by_side"]


def __getattr__(name: str):
    if name == "Explorer":  # ipywidgets is an optional extra: import it only when the UI is asked for
        from toolkit.viz.widgets import Explorer

        return Explorer
    raise AttributeError(f"module 'toolkit.viz' has no attribute {name!r}")
