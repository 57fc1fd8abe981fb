"""Every committed notebook: no outputs, exactly one cell tagged ``parameters``."""

from __future__ import annotations

import ast

import nbformat
import pytest

from mgutil.config import PROJECT_ROOT

NOTEBOOKS = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))


def test_four_numbered_notebooks():
    names = [path.name for path in NOTEBOOKS]
    assert names == [
        "01_readiness.ipynb",
        "02_launch.ipynb",
        "03_generate.ipynb",
        "04_cost_analysis.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_committed_clean(path):
    notebook = nbformat.read(str(path), as_version=4)
    nbformat.validate(notebook)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_parameters_are_literals(path):
    notebook = nbformat.read(str(path), as_version=4)
    (cell,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    for statement in ast.parse(cell.source).body:
        assert isinstance(statement, ast.Assign), ast.unparse(statement)
        ast.literal_eval(statement.value)
