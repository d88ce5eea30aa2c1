"""The tutorial notebooks in ``notebooks/`` run top to bottom, and are committed clean.

Each notebook is executed in a fresh ``python3`` kernel with a short training run
(``NESTEDLORA_NOTEBOOK_STEPS``), the non-interactive matplotlib backend and JAX on the CPU, with
the notebook's folder as working directory (as in Jupyter). A cell that raises fails the test with
nbclient's ``CellExecutionError``, which shows the cell and the traceback. Cost, measured on the
2-core CI machine: about 80 s of CPU time for the three notebooks (95-110 s wall time while three
benchmark jobs shared the CPU), mostly kernel start, JIT compilation and evaluation; the 200
training steps take a few seconds per notebook.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SMOKE_STEPS = 200  # training steps of the smoke run: a few seconds per notebook
CELL_TIMEOUT_S = 600


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    # The kernel inherits this process's environment.
    monkeypatch.setenv("NESTEDLORA_NOTEBOOK_STEPS", str(SMOKE_STEPS))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("NESTEDLORA_HYDROGEN_RESULTS", raising=False)  # 02 trains, not loads
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},  # working directory of the kernel
    )
    client.execute()  # raises CellExecutionError on the first failing cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have outputs or execution counts; clear them "
        f"(e.g. `jupyter nbconvert --clear-output --inplace {path.name}`) before committing."
    )
