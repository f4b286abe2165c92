"""The Gradio app, started through its CLI in a subprocess on a free port and queried over HTTP, by 20 clients at
once, and in a browser: every tab, at 800 and 1440 px wide."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import CHROMIUM, RUN_BACKBONES, scene_image
from PIL import Image

from test_interpret import _bomb_png
from test_viz import _score_rows

pytest.importorskip("gradio", reason="the app needs the `app` extra")
from gradio_client import Client, handle_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RED_SQUARE = "[0.08, 0.25, 0.38, 0.54]"  # the red square of scene_image() in the letterboxed input frame
# (image, expression, box) of the analysis output; maxvit-test answers "the red square" alone, the others always
# point at the red square: IoU differences 1 ("the square"), then 0, failures and invalid answers among them
SAMPLES = [("scene.png", "the red square", [4, 4, 18, 18]), ("scene.png", "the blue circle", [28, 10, 44, 26]),
           ("wide.png", "the red square", [4, 4, 18, 18]), ("scene.png", "the square", [4, 4, 18, 18])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixed_answers(vlm, tokens, prompts, *args, **kwargs):
    if vlm.cfg.backbone == "maxvit-test":
        return [RED_SQUARE if p.endswith(": the red square") else "no box" for p in prompts]
    return [RED_SQUARE] * len(prompts)


@pytest.fixture(scope="module")
def app_run(tiny_run, tmp_path_factory):
    """The tiny run as a finished run has it: results.csv, training records, and a `vlmtk analyze` output of
    ``SAMPLES`` (own data, with fixed answers so that the backbones' IoUs differ)."""
    from toolkit.eval.metrics import metric_row
    from toolkit.interpret import analyze_split
    from toolkit.report import results_frame
    from toolkit.vlm import VLM

    run = tmp_path_factory.mktemp("app") / "run"
    shutil.copytree(tiny_run, run)
    rows = _score_rows().to_dict("records") + [metric_row(n, "pretrain", "cls", "top1", v)
                                               for n, v in (("vit-test", 0.9), ("maxvit-test", 0.7))]
    results_frame(rows).to_csv(run / "results.csv", index=False)
    (run / "backbones").mkdir()
    (run / "backbones" / "vit-test.json").write_text(json.dumps(dict(top1=0.9, loss_curve=[[1, 2.0], [2, 1.0]])))
    (run / "vlms" / "vit-test" / "train_record.json").write_text(json.dumps(dict(loss_curve=[[1, 3.0], [2, 2.0]])))
    own = run.parent / "own"
    own.mkdir()
    scene_image().save(own / "scene.png")
    scene_image((64, 32)).save(own / "wide.png")
    (own / "own.jsonl").write_text("\n".join(json.dumps(dict(image=i, expression=e, box=b)) for i, e, b in SAMPLES))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VLM, "generate", _fixed_answers)
        analyze_split(run, expressions=own / "own.jsonl", maps=["similarity"], progress=False)
    return run


@pytest.fixture(scope="module")
def app_url(app_run, tmp_path_factory):
    port = _free_port()
    tmp = tmp_path_factory.mktemp("app-tmp")  # what the app writes (downloads, gradio's cache) stays in pytest's
    proc = subprocess.Popen([sys.executable, "-m", "app.app", "--run-dir", str(app_run), "--port", str(port)],
                            cwd=REPO, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start:\n{proc.stdout.read()}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    scene_image().save(d / "scene.png")
    scene_image((64, 32)).save(d / "wide.png")
    (d / "garbage.png").write_bytes(b"not an image at all")
    (d / "huge.png").write_bytes(_bomb_png(20000))  # 20000 x 20000 pixels, as far as PIL is concerned
    return d


def test_one_row_per_backbone(client, files):
    plot, table, status = client.predict(handle_file(files / "scene.png"), "the red square", list(RUN_BACKBONES),
                                         "4, 4, 18, 18", api_name="/analyze")
    assert [row[0] for row in table["data"]] == list(RUN_BACKBONES)
    assert all(row[4] is not None for row in table["data"])  # IoU against the given box
    assert plot["type"] == "plotly" and status.startswith("Grounded with")


@pytest.mark.parametrize("image,expression,backbones,gt,message", [
    (None, "the red square", None, "", "no image given"),
    ("garbage.png", "the red square", None, "", "not a readable image"),
    ("huge.png", "the red square", None, "", "too large to decode safely"),
    ("scene.png", "", None, "", "expression is empty"),
    ("scene.png", "x" * 10000, None, "", "at most 500 are accepted"),
    ("scene.png", "the red square", [], "", "no backbone selected"),
    ("scene.png", "the red square", None, "4, 4, 2", "ground-truth box"),
    ("scene.png", "the red square", None, "4, 4, 60, 18", "leaves the 48x32 image"),
], ids=["no-image", "unreadable", "20000x20000", "empty-expression", "10000-chars", "no-backbone", "bad-gt-box",
        "gt-box-outside"])
def test_bad_input_gives_a_clear_message(client, files, image, expression, backbones, gt, message):
    plot, table, status = client.predict(None if image is None else handle_file(files / image), expression,
                                         list(RUN_BACKBONES) if backbones is None else backbones, gt,
                                         api_name="/analyze")
    assert status.startswith("**Cannot run:**") and message in status
    assert plot is None and table["data"] == []
    assert str(files) not in status and "/tmp" not in status  # the file's name only, never a server path


def test_non_image_file_type_is_refused_by_name(client, files):
    (files / "notes.txt").write_text("hello")
    with pytest.raises(Exception, match="Invalid file type"):
        client.predict(handle_file(files / "notes.txt"), "the red square", list(RUN_BACKBONES), "",
                       api_name="/analyze")


def test_analysing_a_run_without_a_world_says_why_without_its_path(client, app_run):
    _, note = client.predict(api_name="/analyse")
    assert note.startswith("**Cannot analyse 10 val samples here:**") and "neither evaluation caches" in note
    assert str(app_run) not in note and "<run run>" in note


def test_a_model_that_does_not_load_is_named_on_its_own_line_and_the_others_serve(tiny_run, tmp_path):
    from app.app import build_app

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / "vlms" / "vit-test" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    (run / "vlms" / "half-trained").mkdir()
    demo = build_app(run)
    texts = [b.value for b in demo.blocks.values() if type(b).__name__ == "Markdown" and b.value]
    lines = next(t for t in texts if "not loaded" in t).splitlines()
    assert lines[0].startswith("- **`half-trained` not loaded:** not finished")
    assert lines[1].startswith("- **`vit-test` not loaded:** its files do not load") and str(tmp_path) not in lines[1]
    assert any("trained on the toolkit's generated scene world" in t for t in texts)
    boxes = next(b for b in demo.blocks.values() if type(b).__name__ == "CheckboxGroup")
    assert sorted(c[1] for c in boxes.choices) == sorted(n for n in RUN_BACKBONES if n != "vit-test")


def _stamped_files(out_dir, formats, text) -> tuple[dict[str, Path], None]:
    """Export files that say which view they were made from (``text``), as the app's exports return them."""
    written = {f: Path(out_dir) / f"view.{f}" for f in formats}
    for path in written.values():
        path.write_text(text)
    return written, None


def test_an_export_finishing_after_the_view_changed_leaves_the_downloads_to_the_new_views(tiny_run, files,
                                                                                         monkeypatch):
    """The figure's and the gallery's download handlers in the order a quick second Run, or a new map type, lets
    them run: the export under way when the view changed leaves the buttons as the new view set them (disabled),
    and only the new view's own export fills them, with its files."""
    import gradio as gr

    import app.app as app_module
    from app.app import FIGURE_FORMATS, build_app

    meanwhile = []  # what the user does while an export runs

    def figure_export(analyses, out_dir, gallery=None, *, formats):
        while meanwhile and formats == FIGURE_FORMATS:
            meanwhile.pop(0)()
        return _stamped_files(out_dir, formats, next(iter(analyses.values())).expression)

    def gallery_export(analyses, gallery, out_dir, *, formats):
        while meanwhile:
            meanwhile.pop(0)()
        return _stamped_files(out_dir, formats, gallery.name)

    monkeypatch.setattr(app_module, "export_comparison", figure_export)
    monkeypatch.setattr(app_module, "export_gallery", gallery_export)
    handlers = {d.fn.__name__: d.fn for d in build_app(tiny_run).fns.values()}
    shown, disabled, unchanged = {}, [gr.update(value=None, interactive=False)] * 3, [gr.update()] * 4

    def ground(expression):  # a click on Run: its figure downloads go, then the models run
        assert list(handlers["forget_figure"](shown)) == [*disabled, ""]
        return handlers["run"](str(files / "scene.png"), expression, list(RUN_BACKBONES), "", shown)[-1]

    def offered(updates) -> list[str]:
        assert updates[3] == "" and all(u["interactive"] for u in updates[:3])
        return [Path(u["value"]).read_text() for u in updates[:3]]

    first = ground("the red square")
    meanwhile.append(lambda: ground("the blue circle"))
    assert list(handlers["export_figure"](shown)) == unchanged  # the red square's export, done after the second run
    assert offered(handlers["export_figure"](shown)) == ["the blue circle"] * 3  # the second run's own export
    meanwhile.append(lambda: ground(""))  # a run that fails: no figure on screen, none offered
    with pytest.warns(UserWarning, match="expression is empty"):  # gr.Warning outside a request
        assert list(handlers["export_figure"](shown)) == unchanged
    assert list(handlers["export_figure"](shown)) == [*disabled, ""]

    handlers["show_map_type"](first, "similarity", shown)
    meanwhile.append(lambda: handlers["show_map_type"](first, "backbone_attention", shown))
    assert list(handlers["export_gallery_images"](shown)) == unchanged
    assert offered(handlers["export_gallery_images"](shown)) == ["backbone_attention"] * 3


def test_figures_command_writes_the_map_score_tables_of_the_runs_analyses(app_run, tmp_path, capsys):
    from toolkit.cli import main

    run = tmp_path / "run"
    shutil.copytree(app_run, run)
    main(["figures", "--run", str(run), "--formats", "html", "--no-examples"])
    printed = capsys.readouterr().out.splitlines()
    md, tex = run / "figures" / "map_scores.md", run / "figures" / "map_scores.tex"
    assert str(md) in printed and str(tex) in printed and str(run / "figures" / "tables.md") in printed
    text = md.read_text()
    assert text.startswith(f"## Explanation maps, analysis own ({len(SAMPLES)} samples): mean [95% interval]")
    header, _, *rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
                        if line.startswith("|")]
    assert header == ["map", "backbone", "mass in box", "pointing game", "deletion AUC", "random-order AUC"]
    assert sorted((r[0], r[1]) for r in rows) == [("similarity", n) for n in sorted(RUN_BACKBONES)]
    assert all(len(r) == 6 and all(re.fullmatch(r"[\d.]+ \[[\d.]+, [\d.]+\]", v) for v in r[2:]) for r in rows)
    latex = tex.read_text()
    assert latex.startswith("\\begin{table}") and latex.count("\\begin{table}") == 1
    assert "map & backbone & mass in box & pointing game & deletion AUC & random-order AUC \\\\" in latex
    assert all(f"similarity & {name} & " in latex for name in RUN_BACKBONES)


def test_figures_command_without_analyses_says_how_to_make_one(app_run, tmp_path, capsys):
    from toolkit.cli import main

    run = tmp_path / "run"
    shutil.copytree(app_run, run, ignore=shutil.ignore_patterns("analysis"))
    main(["figures", "--run", str(run), "--formats", "html", "--no-examples"])
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if "analyze" in line] == [
        "No map-score table: No finished `vlmtk analyze` output in this run yet: make one with `vlmtk analyze --run "
        "runs/run --split val --limit 50` (or over your own data: `--expressions file.jsonl`)."]
    assert not list((run / "figures").glob("map_scores*")) and (run / "figures" / "tables.md").is_file()


@pytest.mark.slow
def test_twenty_clients_at_once_all_get_their_answer(app_url, files, capsys):
    def one(i: int) -> float:
        c = Client(app_url, verbose=False)
        start = time.perf_counter()
        plot, table, status = c.predict(handle_file(files / ("scene.png", "wide.png")[i % 2]), "the red square",
                                        list(RUN_BACKBONES), "4, 4, 18, 18", api_name="/analyze")
        assert status.startswith("Grounded with") and [r[0] for r in table["data"]] == list(RUN_BACKBONES)
        return time.perf_counter() - start

    with ThreadPoolExecutor(20) as pool:
        latencies = sorted(pool.map(one, range(20)))  # re-raises the first failure of any client
    assert len(latencies) == 20
    with capsys.disabled():
        print(f"\n20 concurrent /analyze requests: median {statistics.median(latencies):.2f} s, "
              f"p95 {latencies[18]:.2f} s (queued one at a time: the events that run the models share one slot)")


# ------------------------------------------------------------------------------------ in a browser


@contextmanager
def _page(url: str, width: int):
    from playwright.sync_api import expect, sync_playwright

    # waits, not timings: on a loaded 2-core machine a chained event (the map gallery after an answer) can take
    # longer than Playwright's 5 s default for expect()
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(60_000)
        page.goto(url)
        try:
            yield page
        finally:
            browser.close()


def _choose(page, label: str, option: str) -> None:
    """Pick ``option`` from the list of the dropdown labelled ``label`` (not from another one still open)."""
    menu = page.get_by_label(label, exact=True)
    menu.click()
    page.locator(f"#{menu.get_attribute('aria-controls')}").get_by_role("option", name=option, exact=True).click()
    menu.blur()


def _ground(page, image: Path, expression: str, gt: str = "") -> None:
    page.get_by_test_id("file-upload").first.set_input_files(str(image))
    page.locator("#preview img").wait_for()
    page.get_by_label("referring expression").fill(expression)
    page.get_by_label("ground-truth box in pixels (optional)").fill(gt)
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Grounded with").wait_for()


def _click_pixel(page, x: int, y: int) -> None:
    """Click pixel (x, y) of the analysed image where the page shows it (centred, never enlarged, perhaps shrunk:
    the sum Gradio makes to send the pixel back)."""
    img = page.locator("#query-image img")
    img.scroll_into_view_if_needed()
    page.wait_for_function("() => document.querySelector('#query-image img').naturalWidth > 0")  # loaded
    box = img.bounding_box()
    natural_w, natural_h = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    s = min(box["width"] / natural_w, box["height"] / natural_h, 1)
    img.click(position={"x": (box["width"] - natural_w * s) / 2 + (x + 0.25) * s,
                        "y": (box["height"] - natural_h * s) / 2 + (y + 0.25) * s})


def _within(page, locator, width: int) -> None:
    locator.scroll_into_view_if_needed()
    box = locator.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, (box, width)


@pytest.mark.browser
def test_browser_compare_gallery_and_downloads(app_url, files, tmp_path):
    from playwright.sync_api import expect

    with _page(app_url, 1440) as page:
        page.locator("#examples img").first.click()  # the run's scene example: image, expression and its box
        expect(page.get_by_label("ground-truth box in pixels (optional)")).to_have_value("4, 4, 18, 18")
        assert page.get_by_label("referring expression").input_value() == "the red square"
        first = page.locator("#preview img").get_attribute("src")
        # a new file while one is loaded (the file box itself takes one when empty: see _ground)
        page.get_by_test_id("choose another image-upload-button").set_input_files(str(files / "wide.png"))
        expect(page.locator("#preview img")).not_to_have_attribute("src", first)
        page.get_by_label("referring expression").fill("the red square")
        page.get_by_label("ground-truth box in pixels (optional)").fill("4, 4, 18, 18")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Grounded with").wait_for()
        for name in RUN_BACKBONES:
            assert page.get_by_role("gridcell", name=name, exact=True).count() == 1
        title = page.locator("#gallery .gtitle")
        expect(title).to_contain_text("similarity (token=mean, contextual=False)")
        _choose(page, "map type", "backbone_attention")
        expect(title).to_contain_text("backbone_attention (module=rollout, query=box-centre)")
        _choose(page, "module", "blocks.1.attn")
        expect(title).to_contain_text("module=blocks.1.attn")
        _choose(page, "query", "patch (1, 2) of maxvit-test (x 40, y 8)")
        expect(title).to_contain_text("query=40, 8")
        assert "'blocks.1.attn' does not apply to" in page.locator("#gallery").text_content()  # maxvit-test's reason
        magic = {"figure PNG": b"\x89PNG\r\n\x1a\n", "figure SVG": b"<svg", "figure PDF": b"%PDF-"}
        for name in [*magic, "analysis JSON"]:
            button = page.get_by_role("button", name=name)
            expect(button).to_be_enabled()
            with page.expect_download() as download:
                button.click()
            data = Path(download.value.path()).read_bytes()
            if name in magic:
                assert data.startswith(magic[name]), (name, data[:20])
            else:
                saved = json.loads(data)
                assert set(saved) == {"expression", "image", "gt_box", "backbones", "gallery"}
                assert saved["gallery"]["options"] == {"module": "blocks.1.attn", "query": {"x": 40, "y": 8}}
                vit = saved["gallery"]["maps"]["vit-test"]
                assert len(vit["values"]) == vit["grid"][0] and vit["query"] == [1, 2]
                assert "does not apply" in saved["gallery"]["maps"]["maxvit-test"]["unavailable"]
                assert saved["backbones"]["vit-test"]["geometry"]["orig_w"] == 64
        page.screenshot(path=tmp_path / "compare-1440.png", full_page=True)
        page.get_by_label("referring expression").fill("")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Cannot run: the referring expression is empty").first.wait_for()


@pytest.mark.browser
def test_browser_a_click_on_the_image_sets_the_query_and_the_gallery_downloads(app_url, files):
    from playwright.sync_api import expect

    with _page(app_url, 1440) as page:
        _ground(page, files / "wide.png", "the red square", "4, 4, 18, 18")
        title = page.locator("#gallery .gtitle")
        expect(title).to_contain_text("similarity (token=mean, contextual=False)")
        _click_pixel(page, 50, 20)  # similarity looks from no patch: said so, nothing redrawn
        page.get_by_text("No query patch to set").first.wait_for()
        expect(title).to_contain_text("similarity (token=mean, contextual=False)")
        _choose(page, "map type", "backbone_attention")
        expect(title).to_contain_text("query=box-centre")
        # the first backbone, maxvit-test, letterboxes the 64x32 image into 32x32: pixel (50, 20) is input (25, 18)
        _click_pixel(page, 50, 20)
        expect(title).to_contain_text("backbone_attention (module=rollout, query=56, 24)")
        expect(page.get_by_label("query", exact=True)).to_have_value("patch (2, 3) of maxvit-test (x 56, y 24)")
        expect(page.locator("#gallery")).to_contain_text("from patch (2, 3) of its 4x4 grid")
        for name, magic in (("gallery PNG", b"\x89PNG\r\n\x1a\n"), ("gallery SVG", b"<svg")):
            button = page.get_by_role("button", name=name)
            expect(button).to_be_enabled()  # once the redrawn gallery is exported: never the previous one
            with page.expect_download() as download:
                button.click()
            data = Path(download.value.path()).read_bytes()
            assert data.startswith(magic), (name, data[:20])
        assert b"query=56, 24" in data, re.findall(rb"gtitle[^>]*>([^<]*)<", data)  # the gallery on screen


@pytest.mark.browser
def test_browser_dataset_sorts_filters_and_opens_a_row_in_compare(app_url, tmp_path):
    from playwright.sync_api import expect

    with _page(app_url, 1440) as page:
        page.get_by_role("tab", name="Dataset").click()
        expect(page.locator("#scores")).to_contain_text("similarity")
        rows = page.locator("#samples").get_by_role("row")
        expect(rows).to_have_count(1 + len(SAMPLES))  # the page's load has shown the first output: now choose
        _choose(page, "backbone A", "vit-test")
        _choose(page, "backbone B", "maxvit-test")
        expect(rows.first).to_contain_text("IoU vit-test - maxvit-test")
        expect(rows).to_have_count(1 + len(SAMPLES))
        cells = [r.split("\n") for r in rows.all_inner_texts()[1:]]
        diffs = [float(c[5]) for c in cells]
        assert diffs == sorted(diffs, reverse=True) and diffs[0] > 0.9 and cells[0][0] == "the square"
        page.get_by_label("invalid answers").check()
        expect(rows).to_have_count(1 + 2)  # maxvit-test does not answer "the square" or "the blue circle"
        page.get_by_label("failures (IoU < 0.5)").check()
        expect(rows).to_have_count(1 + 3)  # all but "the red square" on scene.png, which both get right
        page.screenshot(path=tmp_path / "dataset-1440.png", full_page=True)
        rows.nth(1).get_by_role("gridcell").first.click()
        expect(page.get_by_role("tab", name="Compare")).to_have_attribute("aria-selected", "true")
        page.get_by_text("Grounded with").wait_for()
        assert page.get_by_label("referring expression").input_value() == "the square"
        assert page.get_by_label("ground-truth box in pixels (optional)").input_value() == "4, 4, 18, 18"


@pytest.mark.browser
@pytest.mark.parametrize("width", [800, 1440])
def test_browser_every_tab_fits_the_width(app_url, files, tmp_path, width):
    with _page(app_url, width) as page:
        for tab in ("Compare", "Dataset", "Run"):
            _within(page, page.get_by_role("tab", name=tab), width)
        _ground(page, files / "scene.png", "the red square", "4, 4, 18, 18")
        page.locator("#figure .js-plotly-plot").wait_for()
        page.locator("#gallery .js-plotly-plot").wait_for()
        for locator in (page.locator("#figure .js-plotly-plot"), page.locator("#gallery .js-plotly-plot"),
                        page.locator("#query-image img"),
                        *[page.get_by_role("button", name=n) for n in ("figure PNG", "figure SVG", "figure PDF",
                                                                        "analysis JSON", "gallery PNG", "gallery SVG",
                                                                        "gallery PDF")]):
            _within(page, locator, width)
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # nothing runs off to the right
        page.screenshot(path=tmp_path / f"compare-{width}.png", full_page=True)
        assert Image.open(tmp_path / f"compare-{width}.png").width == width
        page.get_by_role("tab", name="Run").click()
        page.get_by_text("Grounding Acc@IoU>=0.5").wait_for()
        assert page.get_by_role("cell", name="0.750 [0.25, 1.00]").count() >= 1  # a results table, with intervals
        plots = page.locator("#run-figures .js-plotly-plot")
        plots.first.wait_for()
        assert plots.count() == 3  # training curves, score bars, top-1 against grounding
        assert "Training curves" in plots.first.text_content()
        for i in range(3):
            _within(page, plots.nth(i), width)
        page.screenshot(path=tmp_path / f"run-{width}.png", full_page=True)
        assert Image.open(tmp_path / f"run-{width}.png").width == width
