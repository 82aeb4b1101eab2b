"""Every notebook takes papermill parameters and resolves its folders from the repository root."""

import re
from pathlib import Path

import nbformat
import pytest

from mpt_utils.profiles_schema import declared_parameters

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_the_notebooks_are_there():
    assert len(NOTEBOOKS) >= 12


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell(path):
    cells = code_cells(path)
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is cells[0], "one `parameters` cell, the first code cell"
    assert {"store_dir", "figures_dir", "profile"} <= set(declared_parameters(path))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_resolves_the_folders_before_using_them(path):
    setup = code_cells(path)[1].source
    resolve = "store_dir, figures_dir = notebook_dirs(store_dir, figures_dir)"
    assert resolve in setup
    before = setup[: setup.index(resolve)]
    assert not any(use in before for use in ("ResultsStore(store_dir)", "Path(store_dir)", "Path(figures_dir)"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_ends_with_a_computed_conclusion(path):
    """The last cell is the one code cell tagged `conclusion`, under a "## Conclusion" heading, and it
    prints bullet lines ("- ...") built from the notebook's own variables."""
    cells = nbformat.read(path, as_version=4).cells
    last, heading = cells[-1], cells[-2]
    tagged = [c for c in cells if "conclusion" in c.metadata.get("tags", [])]
    assert last.cell_type == "code" and tagged == [last], "the last cell, and only it, is tagged `conclusion`"
    assert heading.cell_type == "markdown" and heading.source.startswith("## Conclusion")
    assert "print(" in last.source or "display(Markdown(" in last.source
    assert '"- ' in last.source, "the conclusion prints bullet lines starting with '- '"


OUTSIDE = re.compile(r"GUIDE\.md|DESIGN\.md|seeds/|\.\./shared|\bissue ?#?\d+", re.I)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_names_nothing_outside_the_project(path):
    """A reader has the notebook and the repository, not our planning files."""
    text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    assert OUTSIDE.findall(text) == []
