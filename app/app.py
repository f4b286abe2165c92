"""Gradio app: ground a referring expression with every trained VLM of a run and compare how each backbone saw it.

Thin over the toolkit: ``toolkit.interpret`` checks the inputs and analyses, ``toolkit.viz`` draws. The image is
taken as a file (not ``gr.Image``) so that unreadable or oversized files reach ``load_image`` and come back as a
clear message instead of failing inside the component. Gradio runs one analysis at a time per event (its default
concurrency limit of 1), which the analysis needs: its hooks switch attention modules to their non-fused path.

    python -m app.app --run-dir runs/demo --port 7860
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gradio as gr

from toolkit.interpret import compare, example_images, format_pixel_box, load_image, parse_pixel_box, photo_examples
from toolkit.interpret import results_table
from toolkit.runs import load_vlms
from toolkit.viz import side_by_side


def build_app(run_dir: str | Path) -> gr.Blocks:
    """The app over the VLMs of ``run_dir`` (loaded once, on the CPU)."""
    skipped: dict[str, str] = {}
    vlms = load_vlms(run_dir, skipped=skipped)
    examples = example_images(run_dir) + photo_examples()
    empty = results_table({})

    def run(image_path, expression, names, gt_text):
        try:
            analyses = compare({n: vlms[n] for n in names or ()}, load_image(image_path), expression,
                               gt_box=parse_pixel_box(gt_text))
        except ValueError as e:
            gr.Warning(str(e))
            return None, empty, f"**Cannot run:** {e}"
        return side_by_side(analyses), results_table(analyses), f"Grounded with {len(analyses)} backbone(s)."

    with gr.Blocks(title="VLM backbone explorer") as demo:
        gr.Markdown(f"## VLM backbone explorer\nRun `{Path(run_dir).name}`: where does each backbone's VLM put the "
                    "box, and why? These models were trained on the toolkit's generated scene world (coloured shapes "
                    "on plain backgrounds); on photos they show how they fail, not what a paper-scale VLM sees.")
        if skipped:
            gr.Markdown("**Not loaded:** " + "; ".join(f"`{n}`: {why}" for n, why in skipped.items()))
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                image = gr.File(label="image", file_types=["image"], type="filepath")
                expression = gr.Textbox(label="referring expression", placeholder="the red circle left of the square")
                gt = gr.Textbox(label="ground-truth box in pixels (optional)", placeholder="x1, y1, x2, y2")
                backbones = gr.CheckboxGroup(list(vlms), value=list(vlms), label="backbones")
                button = gr.Button("Run", variant="primary")
                if examples:
                    gr.Examples([[e.image, e.expression, format_pixel_box(e.gt_box)] for e in examples],
                                [image, expression, gt], label="examples")
            with gr.Column(scale=2):
                status = gr.Markdown()
                table = gr.Dataframe(empty, label="answers", interactive=False)
        plot = gr.Plot(label="side by side: boxes (solid predicted, dashed ground truth) and maps on the image")
        inputs, outputs = [image, expression, backbones, gt], [plot, table, status]
        button.click(run, inputs, outputs, api_name="analyze")
        expression.submit(run, inputs, outputs, api_name=False)
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
