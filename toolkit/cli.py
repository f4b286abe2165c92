"""`vlmtk`: one command with subcommands over the toolkit's API."""
from __future__ import annotations

import argparse
import os
import sys


def _cmd_demo(a: argparse.Namespace) -> None:
    from toolkit.config import apply_overrides, preset
    from toolkit.pipeline import run_experiment
    from toolkit.report import results_frame, summary_text

    overrides = {"name": a.name} if a.name else {}
    if a.backbones:
        overrides["backbones"] = tuple(a.backbones.split(","))
    cfg = apply_overrides(preset(a.preset, **overrides), a.set)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.seeds > 1:
        from toolkit.pipeline import run_seeds

        res = run_seeds(cfg, a.seeds, a.runs, a.cache, make_figures=not a.no_figures)
        from toolkit.train import distributed

        if not distributed.current().main:
            return
        print((res["run_dir"] / "summary.md").read_text())
        return
    res = run_experiment(cfg, a.runs, a.cache, make_figures=not a.no_figures)
    from toolkit.train import distributed

    if not distributed.current().main:  # under torchrun rank 0 reports
        return
    print(summary_text(results_frame(res["rows"])), end="")
    print(f"\nReport: {res['run_dir']}/results.md   CSV: {res['run_dir']}/results.csv   "
          f"Figures: {res['run_dir']}/figures/")
    print("Next: `make app` opens the Gradio app on these models; `make lab` opens the notebooks.")


def _cmd_backbones(a: argparse.Namespace) -> None:
    from toolkit.registry import backbone_entry, list_backbones

    print(f"{'name':34s} {'family':12s} tags")
    for n in list_backbones(a.pattern):
        e = backbone_entry(n)
        print(f"{n:34s} {e.family:12s} {','.join(e.tags)}")


def _cmd_zoo(a: argparse.Namespace) -> None:
    from toolkit.zoo import default_names, format_zoo, with_paper, zoo_table

    names = [n.strip() for n in a.names.split(",") if n.strip()] if a.names else default_names()
    rows = zoo_table(names, batch=a.batch)
    print(format_zoo(with_paper(rows) if a.paper else rows, batch=a.batch))


def _cmd_models(a: argparse.Namespace) -> None:
    from toolkit.connector import PRISMATIC_ARCH
    from toolkit.paper import CONNECTOR, LLM, PAPER_CONFIGS

    conn = f"{PRISMATIC_ARCH[CONNECTOR]} ({CONNECTOR})"
    print(f"{'id':30s} {'family':12s} {'input':>9s} {'tokens':>6s} {'connector':30s} {'LLM':14s} "
          f"{'release backbone id':38s} {'VQA':>6s} {'Loc':>6s} {'overall':>7s}")
    for c in PAPER_CONFIGS.values():
        size = f"{c.input_hw[1]}x{c.input_hw[0]}"
        print(f"{c.id:30s} {c.family:12s} {size:>9s} {c.tokens:6d} {conn:30s} {LLM:14s} "
              f"{c.release_backbone_id:38s} {c.vqa:6.2f} {c.loc:6.2f} {c.overall:7.2f}")
    print("\nScores: the paper's weighted VQA / localisation / overall. Open a release run directory with "
          "toolkit.prismatic.load_prismatic(run_dir, llm=<local LLM dir>, vision_weights=<official backbone file>).")


def _cmd_figures(a: argparse.Namespace) -> None:
    from toolkit.report import write_all_figures

    written = write_all_figures(a.run, formats=tuple(f.strip() for f in a.formats.split(",") if f.strip()),
                                examples=not a.no_examples)
    print("\n".join(written.notes + [str(p) for p in written.paths]))


def _cmd_analyze(a: argparse.Namespace) -> None:
    import torch

    from toolkit.interpret import analyze_split
    from toolkit.interpret.maps import split_map_specs

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.images and not a.expressions:
            raise ValueError("--images goes with --expressions (the file naming the images)")
        res = analyze_split(a.run, a.split, split_map_specs(a.maps) if a.maps else None, a.limit, a.images,
                            a.expressions, a.out, a.cache, a.device, a.max_new_tokens)
    except (FileNotFoundError, ValueError) as e:  # bad input (HarnessError is a ValueError): one line, status 2
        print(f"vlmtk analyze: error: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    print((res.out_dir / "summary.md").read_text())
    print(f"Per sample: {res.out_dir}/<backbone>/samples.jsonl and maps/<id>.npz   Summary: "
          f"{res.out_dir / 'summary.csv'}  {res.out_dir / 'summary.md'}")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
    p = argparse.ArgumentParser(prog="vlmtk", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the main job: world -> pretraining -> VLMs -> evaluation -> report")
    d.add_argument("--preset", default="embedded", help="embedded (default, CPU), smoke (seconds) or gpu")
    d.add_argument("--name", default=None, help="run name (default: the preset's)")
    d.add_argument("--backbones", default=None, help="comma-separated registry names (default: the preset's)")
    d.add_argument("--runs", default="runs")
    d.add_argument("--cache", default="data_cache")
    d.add_argument("--no-figures", action="store_true")
    d.add_argument("--seeds", type=int, default=1, help="repeat the comparison over N training seeds: mean +- sd")
    d.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set pretrain.epochs=4 --set train.stages.0.steps=1200")
    d.set_defaults(fn=_cmd_demo)
    b = sub.add_parser("backbones", help="list registered backbones")
    b.add_argument("pattern", nargs="?", default="*")
    b.set_defaults(fn=_cmd_backbones)
    z = sub.add_parser("zoo", help="table of backbones: input, tap grid, visual tokens, params, GFLOPs to the tap")
    z.add_argument("--names", default=None,
                   help="comma-separated registry names (default: every backbone tagged paper or embedded)")
    z.add_argument("--paper", action="store_true", help="add the paper's token and parameter counts beside ours")
    z.add_argument("--batch", type=int, default=1, help="batch size the FLOPs are counted at (default 1)")
    z.set_defaults(fn=_cmd_zoo)
    m = sub.add_parser("models", help="the study's eight released VLMs: backbone, input, tokens, LLM, paper scores")
    m.set_defaults(fn=_cmd_models)
    f = sub.add_parser("figures", help="every figure and table of a finished run again: curves, score bars, top-1 vs "
                                       "grounding, side-by-side examples (html/png/pdf/svg), tables (md/tex), "
                                       "map scores of its `vlmtk analyze` outputs (md/tex)")
    f.add_argument("--run", default="runs/demo", help="the run directory (default: %(default)s)")
    f.add_argument("--formats", default="html,png,pdf,svg", help="comma-separated (default: %(default)s)")
    f.add_argument("--no-examples", action="store_true", help="skip the side-by-side examples (they rerun the VLMs)")
    f.set_defaults(fn=_cmd_figures)
    an = sub.add_parser("analyze", help="every explanation map of every VLM of a run over a split (or your own data), "
                                        "scored against the ground-truth box: samples.jsonl, maps, summary.md/csv")
    an.add_argument("--run", required=True, help="the run directory")
    an.add_argument("--split", default="val", help="split of the run's scene world (default: %(default)s)")
    an.add_argument("--maps", default=None, help="comma-separated map types (default: every registered one), each "
                    "with options if wanted: lm_attention:token=2,scan_path:direction=0:query=(3,4)")
    an.add_argument("--limit", type=int, default=None, help="the first N samples")
    an.add_argument("--expressions", metavar="JSONL",
                    help='your own data instead: {"image": ..., "expression": ..., "box": [x1, y1, x2, y2]?} per line')
    an.add_argument("--images", metavar="DIR", help="folder the expressions' images are relative to "
                                                    "(default: the JSONL's folder)")
    an.add_argument("--out", default=None, help="output folder (default: <run>/analysis/<split>, or "
                                                 "<run>/analysis/<JSONL stem> for --expressions); rerun to resume")
    an.add_argument("--cache", default="data_cache", help="where a world the run's config names is made if missing")
    an.add_argument("--max-new-tokens", type=int, default=24)
    an.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    an.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    an.set_defaults(fn=_cmd_analyze)
    from toolkit.eval.harness import add_eval_arguments, eval_command

    e = sub.add_parser("eval", help="score a VLM on RefCOCO/+/g and VQAv2 files in their real layouts, or on your "
                                    "own images and expressions: results.json, samples_<task>.jsonl, tables")
    add_eval_arguments(e)
    e.set_defaults(fn=eval_command)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
