"""The exploration notebook runs top to bottom on a finished run (slow: it needs a trained demo run)."""

import os

import pytest


@pytest.mark.slow
def test_notebook_runs_on_a_demo_run(demo_master, home, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from conftest import tiny_run
    from seedlings.chain.submit import submit

    submit(tiny_run(demo_master, "demo", "precompute_d4=false"))
    monkeypatch.setenv("SEEDLINGS_RUN", "demo")
    monkeypatch.setenv("SEEDLINGS_DATA", str(demo_master))
    nb = nbformat.read(os.path.join(os.path.dirname(__file__), "..", "notebooks", "explore.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "out-of-fold micro-F1" in outputs
