"""notebooks/explore.ipynb: committed without outputs or widget state, and runs headless against a tiny run without
errors, from notebooks/ as `make lab` runs it (the run given through TOOLKIT_RUN_DIR, as `make lab` gives it)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import RUN_BACKBONES

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the `notebooks` extra")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the `notebooks` extra")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def test_committed_without_outputs_or_widget_state():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "widgets" not in nb.metadata and all("widgets" not in c.metadata for c in nb.cells)
    assert NOTEBOOK.stat().st_size < 10_000  # a few thin cells


def test_runs_headless_against_a_run(tiny_run, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Checks appended to the run (not to the file): the widget ran, drew its map gallery, every backbone analysed.
    nb.cells.append(nbformat.v4.new_code_cell(
        "assert '<table' in ui.status.value, ui.status.value\n"
        "assert ui.gallery is not None and set(ui.gallery.maps) | set(ui.gallery.unavailable) == set(analyses)\n"
        f"assert sorted(analyses) == {sorted(RUN_BACKBONES)!r}"))
    monkeypatch.setenv("TOOLKIT_RUN_DIR", str(tiny_run))
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
