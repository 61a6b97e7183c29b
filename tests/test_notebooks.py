"""The tutorial notebooks in docs/notebooks run top to bottom, in fast mode (REPARAM_DOCS_FAST=1:
tiny inputs, a few iterations), so they never rot. The saved outputs come from full runs;
this test executes copies and leaves the files alone."""
import time
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
import nbformat  # noqa: E402  (installed with nbclient)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))


def test_the_six_tutorials_exist():
    assert {p.stem for p in NOTEBOOKS} == {"fuse_gcnet", "own_block", "inside_the_compiler", "train_fuse_export",
                                           "expand_any_network", "why_not"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, monkeypatch):
    monkeypatch.setenv("REPARAM_DOCS_FAST", "1")  # the kernel inherits the environment
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})  # cwd: the repo root
    start = time.perf_counter()
    client.execute()
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_saved_notebooks_have_outputs_and_no_errors():
    """Committed with the outputs of a full run, so they read well on a code host."""
    for path in NOTEBOOKS:
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{path.name}: saved without running every cell"
        assert not any(o.output_type == "error" for c in code for o in c.outputs), f"{path.name}: an error output"
