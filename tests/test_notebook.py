"""notebooks/demo.ipynb runs top to bottom (nbclient) on the tiny untrained settings."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_notebook_executes(monkeypatch):
    # Always the untrained tiny cascade: a developer's demo_out/ must not change the test.
    monkeypatch.setenv("IMAGEN_NOTEBOOK_UNTRAINED", "1")
    nb = nbformat.read(os.path.join(REPO, "notebooks", "demo.ipynb"), as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": REPO}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "exact match" in text
    # The sampled shapes of all three stages and of the SR-only slice are displayed.
    results = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "(4, 256, 256, 3)" in results and "(2, 64, 64, 3)" in results
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline figure"
