"""The notebooks under notebooks/ run top to bottom on the embedded default models without an error.

02 and 03 run smaller: a cell with smaller sizes goes in after their cell tagged `parameters` (what papermill
does with its `injected-parameters` cell), so the suite checks every cell's code path in a fraction of the
time. Their kernels connect to the session's Ray (`ray_local`, through `RAY_ADDRESS`) instead of each starting
its own."""

import ast
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
SMALLER = {  # notebook: the injected cell (the defaults: see each notebook's parameters cell)
    "02_train_and_evaluate_sae": "train_samples, test_samples = 256, 64\nepochs = 1\neval_tokens, splice_samples = 1024, 16",
    "03_interpret_and_steer": (
        "train_images, train_steps = 160, 150\ninterpret_images = 64\nexplain_latents = list(range(24))"
    ),
}


def parameters_cell(nb) -> int:
    """The index of the notebook's one cell tagged `parameters`."""
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    return index


def assigned(source: str) -> set[str]:
    """The names a cell's top-level assignments bind."""
    targets = [t for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def with_parameters(nb, source: str):
    """`nb` with a cell tagged `injected-parameters` holding `source` right after its `parameters` cell."""
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(parameters_cell(nb) + 1, cell)
    return nb


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_hooked_models.ipynb",
        "02_train_and_evaluate_sae.ipynb",
        "03_interpret_and_steer.ipynb",
    ]


@pytest.mark.parametrize("stem", sorted(SMALLER))
def test_the_smaller_sizes_override_every_parameter_of_the_notebook(stem):
    """A renamed parameter would leave the injected value unused (and the notebook at full size)."""
    nb = nbformat.read(NOTEBOOKS[0].parent / f"{stem}.ipynb", as_version=4)
    assert assigned(SMALLER[stem]) == assigned(nb.cells[parameters_cell(nb)].source)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch, ray_local):
    monkeypatch.setenv("PRISMA_QUICKSTART", str(tmp_path / "quickstart"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)
    nb = nbformat.read(path, as_version=4)
    if path.stem in SMALLER:
        nb = with_parameters(nb, SMALLER[path.stem])
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
