"""The notebooks run top to bottom (quick mode: CFS_NOTEBOOK_FAST=1 shrinks every step)."""

import json

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import REPO


@pytest.mark.slow
def test_quickstart_and_your_model_notebooks_execute(tmp_path, monkeypatch):
    monkeypatch.setenv("CFS_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("CFS_NOTEBOOK_RUNS", str(tmp_path / "runs"))  # the kernel inherits the environment
    for name in ("01_quickstart.ipynb", "03_your_model.ipynb"):  # 03 reuses the base 01 built
        nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert images, f"{name} shows no plot"
    quick = json.loads((tmp_path / "runs/quickstart/report/results.json").read_text())
    assert set(quick["methods"]) == {"ft", "cfs"}
    yours = json.loads((tmp_path / "runs/your_model/report/results.json").read_text())
    assert set(yours["methods"]) == {"ft", "cfs"} and yours["retained_metric"] == "shakespeare_heldout/bits_per_byte"
    assert (tmp_path / "runs/your_model/study.yaml").is_file()
