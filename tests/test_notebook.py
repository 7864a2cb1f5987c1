"""notebooks/walkthrough.ipynb runs top to bottom with small settings, so that it cannot rot."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"


@pytest.mark.slow
def test_walkthrough_runs_top_to_bottom(mnist_dir, tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not [c for c in notebook.cells if c.get("outputs")], "commit the notebook without outputs"
    for name, value in {"MNIST_DATASET": mnist_dir, "WALKTHROUGH_TRAIN_STEPS": 4, "WALKTHROUGH_EVAL_SAMPLES": 8,
                        "MNIST_DIFFUSION_CACHE": tmp_path / "cache"}.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))  # the kernel inherits them
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    # The schedule, the forward process, the small model's digits, the backward process, the shipped model's digits.
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 5
    scores = notebook.cells[-1].outputs[-1]["data"]["text/plain"]
    assert "'num_samples': 8" in scores and "'fid'" in scores
