"""Gradio app: ground a referring expression with every trained VLM of a run and compare how each backbone saw it.

Three tabs. **Compare**: an image (upload, or a run's example), an expression, an optional ground-truth box and the
backbones; the answers table, the side-by-side figure, and a map gallery (any registered map type for every
backbone, its options as menus, the query patch of backbone maps also chosen by a click on the image); downloads of
the figure and of the gallery (PNG/SVG/PDF) and of the analysis (JSON). **Dataset**: a
finished ``vlmtk analyze`` output: its scores, and its samples sorted by how differently two backbones ground them;
a row opens in Compare. **Run**: the run's result tables and figures.

Thin over the toolkit: ``toolkit.interpret`` checks inputs, analyses and reads analysis outputs, ``toolkit.viz``
draws and exports, ``toolkit.report`` gives the run's results. The image is taken as a file (not ``gr.Image``) so
that unreadable or oversized files reach ``load_image`` and come back as a clear message instead of failing inside
the component. Every event that runs the models shares one queue slot (``concurrency_id="models"``): the analysis's
hooks switch attention modules to their non-fused path, so two analyses must not overlap on one model.

    python -m app.app --run-dir runs/demo --port 7860
"""
from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr

from toolkit.interpret import (MAP_TYPES, PixelPoint, analysis_scores, analyze_split, compare, example_images,
                               find_analyses, format_pixel_box, gallery_maps, load_image, load_samples,
                               no_analysis_message, option_controls, parse_options, parse_pixel_box, photo_examples,
                               results_table, sample_example, sample_pairs)
from toolkit.interpret.browse import SHOW
from toolkit.interpret.explore import click_query, option_text
from toolkit.report import load_results, reliance_flags, result_figures, summary_tables, tables_markdown
from toolkit.runs import load_vlms, user_message
from toolkit.viz import export_comparison, export_gallery, for_screen, map_gallery, side_by_side

FIGURE_FORMATS = ("png", "svg", "pdf")
ANALYSE_LIMIT = 10  # samples the Dataset tab's button analyses
RUN_FIGURES = 3  # toolkit.report.result_figures: training curves, score bars, top-1 against grounding
GALLERY_HINT = "The map gallery shows once **Run** has grounded an expression."


class _Scratch:
    """The app's own temp folder: one fresh subfolder per request's files (downloads, images to show), those older
    than ``keep_s`` removed as new ones are made, the whole folder at exit."""

    def __init__(self, keep_s: float = 3600):
        self.root, self.keep_s = Path(tempfile.mkdtemp(prefix="vlmtk-app-")), keep_s
        atexit.register(shutil.rmtree, self.root, True)

    def __call__(self) -> Path:
        now = time.time()
        for old in self.root.iterdir():
            if now - old.stat().st_mtime > self.keep_s:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.root))


def _served_copy(path: str | Path, scratch: _Scratch) -> str:
    """A copy of an image in a fresh temp folder, which the app serves (it serves nothing else of the server's
    files: an example lies in the run's world, an analysed image anywhere). gr.Error when it is gone."""
    copy = scratch() / Path(path).name
    try:
        shutil.copyfile(path, copy)
    except OSError:
        raise gr.Error(f"the image `{copy.name}` is no longer where the run or its analysis found it") from None
    return str(copy)


def build_app(run_dir: str | Path) -> gr.Blocks:
    """The app over the VLMs of ``run_dir`` (loaded once, on the CPU)."""
    run_dir = Path(run_dir)
    skipped: dict[str, str] = {}
    vlms = load_vlms(run_dir, skipped=skipped)
    examples = example_images(run_dir) + photo_examples()
    empty = results_table({})
    n_slots = max(len(t.options) for t in MAP_TYPES.values())
    hidden_slots = [gr.update(visible=False, value=None)] * n_slots
    no_downloads = [gr.update(value=None, interactive=False)] * len(FIGURE_FORMATS)
    scratch = _Scratch()

    # ---- Compare
    def preview(image_path):
        if image_path is None:
            return None, ""
        try:
            return load_image(image_path), ""
        except ValueError as e:
            return None, f"**Cannot read this image:** {e}"

    def pick_example(evt: gr.SelectData):
        e = examples[evt.index]
        return _served_copy(e.image, scratch), e.expression, format_pixel_box(e.gt_box)

    def forget_figure(shown):
        """Before a run: the figure downloads go, until ``export_figure`` has made the new figure's files."""
        shown["figure"] = None  # from now on, files an export of the previous figure makes are stale
        return (*no_downloads, "")

    def run(image_path, expression, names, gt_text, shown):
        try:
            analyses = compare({n: vlms[n] for n in names or ()}, load_image(image_path), expression,
                               gt_box=parse_pixel_box(gt_text))
        except ValueError as e:
            gr.Warning(str(e))
            return None, empty, f"**Cannot run:** {e}", None
        shown["figure"] = analyses  # the figure on screen: ``export_figure`` makes its files
        return (for_screen(side_by_side(analyses)), results_table(analyses),
                f"Grounded with {len(analyses)} backbone(s).", analyses)

    def gallery(analyses, name, values, shown):
        """The map gallery and the JSON download for ``values`` (option name -> menu text); its image downloads
        stay disabled until ``export_gallery_images`` has made them from ``shown["gallery"]``."""
        try:
            g = gallery_maps(analyses, name, **parse_options(name, analyses, values))
        except ValueError as e:
            return None, f"**Cannot draw this map:** {e}", gr.update(), *no_downloads
        shown["gallery"] = (analyses, g)  # with the analyses it maps: a newer run may replace the State meanwhile
        written, _ = export_comparison(analyses, scratch(), g, formats=("json",))
        missing = "; ".join(f"`{b}`: {why}" for b, why in g.unavailable.items())
        note = f"`{name}`: {MAP_TYPES[name].fn.__doc__.splitlines()[0]}" + (f" No map for {missing}" if missing else "")
        return (for_screen(map_gallery(analyses, g)), note, gr.update(value=str(written["json"]), interactive=True),
                *no_downloads)

    def show_map_type(analyses, name, shown):
        """Option menus for map type ``name`` (from its declared options over the analysed backbones), then its
        gallery with the defaults."""
        shown["gallery"] = None  # from now on, files an export of the previous gallery makes are stale
        if not analyses:
            return (*hidden_slots, None, GALLERY_HINT, gr.update(value=None, interactive=False), *no_downloads)
        controls = option_controls(name, analyses)
        slots = [gr.update(visible=True, label=c.name, info=c.help, choices=c.texts(), value=option_text(c.default))
                 for c in controls] + hidden_slots[len(controls):]
        return (*slots, *gallery(analyses, name, {}, shown))

    def change_option(analyses, name, shown, *values):
        shown["gallery"] = None
        if not analyses:
            return None, GALLERY_HINT, gr.update(), *no_downloads
        controls = option_controls(name, analyses)
        return gallery(analyses, name, {c.name: v for c, v in zip(controls, values)}, shown)

    def click_patch(evt: gr.SelectData, analyses, name):
        """A click on the analysed image -> the query menu shows the cell it falls in (``change_option`` then draws
        the gallery from it); gr.Error, and nothing redrawn, for a map type that looks from no patch."""
        if not analyses:
            raise gr.Error(GALLERY_HINT)
        try:
            key, point = click_query(name, analyses, PixelPoint(*evt.index))
        except ValueError as e:
            raise gr.Error(f"No query patch to set: {e}") from None
        at = list(MAP_TYPES[name].options).index(key)  # the slots hold the options in their declared order
        return [gr.update(value=option_text(point)) if i == at else gr.update() for i in range(n_slots)]

    def analysed_image(analyses):
        return next(iter(analyses.values())).image if analyses else None

    def offer(written, problem, note):
        """The download buttons for the written figure files, or disabled ones and ``note`` naming the problem."""
        if problem:
            return (*no_downloads, note.format(problem))
        return (*[gr.update(value=str(written[f]), interactive=True) for f in FIGURE_FORMATS], "")

    def offer_on_screen(shown, key, export):
        """``export(shown[key])``'s download buttons (``offer``), for the view on screen under ``key``. A view
        drawn while it ran has disabled the buttons, and its own export fills them: not with these files."""
        view = shown.get(key)
        if view is None:
            return (*no_downloads, "")
        offered = export(view)
        return offered if shown.get(key) is view else [gr.update()] * len(offered)

    def export_figure(shown):
        return offer_on_screen(shown, "figure", lambda analyses: offer(
            *export_comparison(analyses, scratch(), formats=FIGURE_FORMATS), "{}; the JSON download still works."))

    def export_gallery_images(shown):
        return offer_on_screen(shown, "gallery", lambda view: offer(
            *export_gallery(*view, scratch(), formats=FIGURE_FORMATS), "{}"))

    # ---- Dataset
    def dataset_choices():
        found = find_analyses(run_dir)
        if not found:
            return gr.update(choices=[], value=None), no_analysis_message(run_dir)
        return gr.update(choices=list(found), value=next(iter(found))), f"{len(found)} analysis output(s) in this run."

    def open_analysis(name):
        found = find_analyses(run_dir)
        if name not in found:
            return None, gr.update(), gr.update(), None, None, ""
        samples = load_samples(found[name])
        names = sorted(set(samples.backbone))
        a, b = names[0], names[1] if len(names) > 1 else names[0]
        return (analysis_scores(found[name]), gr.update(choices=names, value=a), gr.update(choices=names, value=b),
                *browse(samples, a, b, "all"))

    def browse(samples, a, b, show):
        if samples is None:
            return None, None, ""
        try:
            shown = sample_pairs(samples, a, b, show)
        except ValueError as e:
            return None, (samples, []), f"**Cannot sort:** {e}"
        return shown.reset_index(drop=True), (samples, list(shown.index)), f"{len(shown)} sample(s)."

    def resort(state, a, b, show):
        return browse(None if state is None else state[0], a, b, show)

    def send_sample(state, evt: gr.SelectData):
        samples, ids = state or (None, [])
        if evt.index is None or evt.index[0] >= len(ids):
            raise gr.Error("select a row of the samples table")
        ex = sample_example(samples, ids[evt.index[0]])
        return _served_copy(ex.image, scratch), ex.expression, format_pixel_box(ex.gt_box), gr.Tabs(selected="compare")

    def analyse_now(progress=gr.Progress(track_tqdm=True)):
        try:
            analyze_split(run_dir, "val", limit=ANALYSE_LIMIT, progress=True)
        except (FileNotFoundError, ValueError) as e:
            return gr.update(), f"**Cannot analyse {ANALYSE_LIMIT} val samples here:** {user_message(e, run_dir)}"
        return dataset_choices()

    # ---- Run
    def show_run():
        try:
            df = load_results(run_dir)
        except FileNotFoundError as e:
            return (str(e), *[gr.update(visible=False, value=None)] * RUN_FIGURES)
        text = "\n".join(reliance_flags(df)) + "\n\n" + tables_markdown(summary_tables(df), level=3, floatfmt=".3f")
        figures = [for_screen(fig) for fig, _ in result_figures(run_dir, df)][:RUN_FIGURES]
        plots = [gr.update(visible=True, value=f) for f in figures] + [gr.update(visible=False, value=None)] * (
            RUN_FIGURES - len(figures))
        return (text, *plots)

    # gradio's copies of what it served go after a day, checked every hour
    with gr.Blocks(title="VLM backbone explorer", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## VLM backbone explorer\nRun `{run_dir.name}`: where does each backbone's VLM put the "
                    "box, and why? These models were trained on the toolkit's generated scene world (coloured shapes "
                    "on plain backgrounds); on photos they show how they fail, not what a paper-scale VLM sees.")
        if skipped:  # one line per backbone that did not load; the others serve
            gr.Markdown("\n".join(f"- **`{n}` not loaded:** {why}" for n, why in skipped.items()))
        analyses = gr.State()
        # {"figure": the analyses whose figure is on screen, "gallery": (analyses, the Gallery on screen)}: one dict per
        # session, which every handler is given itself (not a copy), so that an export finishing after a newer
        # figure or gallery was drawn can tell
        on_screen = gr.State(dict)
        with gr.Tabs(selected="compare") as tabs:
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        image = gr.File(label="image", file_types=["image"], type="filepath")
                        choose = gr.UploadButton("choose another image", file_types=["image"], size="sm",
                                                 elem_id="choose-image")
                        shown = gr.Image(label="preview", interactive=False, height=160, format="png",
                                         elem_id="preview")
                        image_note = gr.Markdown()
                        expression = gr.Textbox(label="referring expression",
                                                placeholder="the red circle left of the square")
                        gt = gr.Textbox(label="ground-truth box in pixels (optional)", placeholder="x1, y1, x2, y2")
                        backbones = gr.CheckboxGroup(list(vlms), value=list(vlms), label="backbones")
                        button = gr.Button("Run", variant="primary")
                        if examples:
                            thumbs = gr.Gallery([(e.image, e.expression) for e in examples], label="examples",
                                                columns=4, height=150, allow_preview=False, object_fit="contain",
                                                elem_id="examples")
                    with gr.Column(scale=2, min_width=300):
                        status = gr.Markdown()
                        table = gr.Dataframe(empty, label="answers", interactive=False)
                        with gr.Row():
                            downloads = [gr.DownloadButton(f"figure {f.upper()}", interactive=False, size="sm",
                                                           min_width=90) for f in FIGURE_FORMATS]
                            json_button = gr.DownloadButton("analysis JSON", interactive=False, size="sm",
                                                            min_width=90)
                        export_note = gr.Markdown()
                plot = gr.Plot(label="side by side: boxes (solid predicted, dashed ground truth) and maps on the image",
                               elem_id="figure")
                gr.Markdown("### Map gallery: one map type for every backbone")
                with gr.Row():
                    map_type = gr.Dropdown(list(MAP_TYPES), value=next(iter(MAP_TYPES)), label="map type",
                                           min_width=160)
                    slots = [gr.Dropdown(visible=False, allow_custom_value=True, interactive=True, min_width=160)
                             for _ in range(n_slots)]
                with gr.Row():
                    with gr.Column(scale=1, min_width=200):
                        # the analysed image as it is (not the preview, which may already show the next upload):
                        # a click's pixel is a point of the image the gallery's maps were computed for
                        query_image = gr.Image(label="click a patch: backbone maps look from it",
                                               interactive=False, height=220, format="png", elem_id="query-image")
                        with gr.Row():
                            gallery_downloads = [gr.DownloadButton(f"gallery {f.upper()}", interactive=False,
                                                                   size="sm", min_width=90) for f in FIGURE_FORMATS]
                        gallery_export_note = gr.Markdown()
                    with gr.Column(scale=3, min_width=300):
                        gallery_note = gr.Markdown(GALLERY_HINT)
                        gallery_plot = gr.Plot(label="map gallery (dotted: the patch a backbone map looks from)",
                                               elem_id="gallery")
            with gr.Tab("Dataset", id="dataset"):
                dataset_note = gr.Markdown()
                with gr.Row():
                    dataset = gr.Dropdown(label="analysis output (<run>/analysis/...)", choices=[], min_width=200)
                    analyse = gr.Button(f"Analyse {ANALYSE_LIMIT} val samples now", size="sm")
                scores = gr.Dataframe(label="scores per backbone and map type (mean [95% interval])",
                                      interactive=False, elem_id="scores")
                with gr.Row():
                    first = gr.Dropdown(label="backbone A", min_width=160)
                    second = gr.Dropdown(label="backbone B", min_width=160)
                    show = gr.Radio([(label, key) for key, label in SHOW.items()], value="all", label="show")
                browse_note = gr.Markdown()
                samples = gr.Dataframe(label="samples by IoU A - B (select a row to open it in Compare)",
                                       interactive=False, elem_id="samples")
                browsing = gr.State()
            with gr.Tab("Run", id="run"):
                run_note = gr.Markdown()
                with gr.Column(elem_id="run-figures"):
                    run_plots = [gr.Plot(visible=False, show_label=False) for _ in range(RUN_FIGURES)]

        # Compare: run, then the image to click and the gallery for the chosen map type, then the downloads
        inputs, outputs = [image, expression, backbones, gt, on_screen], [plot, table, status, analyses]
        figure_downloads = [*downloads, export_note]
        gallery_view = [gallery_plot, gallery_note, json_button, *gallery_downloads]
        gallery_outputs = [*slots, *gallery_view]

        def drawn(event):  # a gallery drawn: its image downloads follow
            return event.then(export_gallery_images, on_screen,
                              [*gallery_downloads, gallery_export_note], api_name=False)

        def grounded(listener, api_name=False):
            """Grounding on ``listener`` (``button.click``, ...): the figure's downloads go, then ``run``, the image
            to click, the gallery and the downloads. The downloads go in a step of their own, before the new figure
            is drawn, so that ``run``'s outputs (the API's) stay the figure, table and status."""
            event = listener(forget_figure, on_screen, figure_downloads, api_name=False) \
                .then(run, inputs, outputs, api_name=api_name, concurrency_id="models") \
                .then(analysed_image, analyses, query_image, api_name=False)
            drawn(event.then(show_map_type, [analyses, map_type, on_screen], gallery_outputs, api_name=False,
                             concurrency_id="models")
                  .then(export_figure, on_screen, figure_downloads, api_name=False))

        image.change(preview, image, [shown, image_note], api_name=False)
        choose.upload(lambda path: path, choose, image, api_name=False)  # a new file while one is loaded
        grounded(button.click, api_name="analyze")
        grounded(expression.submit)
        drawn(map_type.input(show_map_type, [analyses, map_type, on_screen], gallery_outputs, api_name=False,
                             concurrency_id="models"))
        for slot in slots:
            drawn(slot.input(change_option, [analyses, map_type, on_screen, *slots], gallery_view,
                             api_name=False, concurrency_id="models"))
        drawn(query_image.select(click_patch, [analyses, map_type], slots, api_name=False)
              .success(change_option, [analyses, map_type, on_screen, *slots], gallery_view, api_name=False,
                       concurrency_id="models"))
        if examples:
            thumbs.select(pick_example, None, [image, expression, gt], api_name=False)

        # Dataset: list the outputs, show one, sort and filter, send a row to Compare and run it
        browse_outputs = [samples, browsing, browse_note]
        opened = [scores, first, second, *browse_outputs]
        demo.load(dataset_choices, None, [dataset, dataset_note], api_name=False) \
            .then(open_analysis, dataset, opened, api_name=False)
        dataset.input(open_analysis, dataset, opened, api_name=False)
        for control in (first, second, show):
            control.input(resort, [browsing, first, second, show], browse_outputs, api_name=False)
        grounded(samples.select(send_sample, browsing, [image, expression, gt, tabs], api_name=False).success)
        analyse.click(analyse_now, None, [dataset, dataset_note], api_name="analyse") \
            .then(open_analysis, dataset, opened, api_name=False)

        # Run: the results as they are on disk when the page loads
        demo.load(show_run, None, [run_note, *run_plots], api_name=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/demo", help="a run directory with trained VLMs under vlms/")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    try:
        demo = build_app(args.run_dir)
    except (FileNotFoundError, KeyError) as e:  # no trained VLMs there: say so instead of a traceback
        p.error(str(e))
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
