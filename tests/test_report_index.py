"""The reports' index page: key numbers from the executed notebooks, figures, relative links."""

import re
from pathlib import Path

import nbformat
from report_fixtures import executed_notebook, fake_run, write_png

from mpt_utils.report_index import assign_figures, key_numbers, output_text, write_index


def test_key_numbers_are_the_computed_conclusion(tmp_path):
    nb = executed_notebook(tmp_path / "a.ipynb", "- PTP at 0.61 (CI 0.58-0.64)\n- KL ranks as PPL")
    assert key_numbers(nb) == "- PTP at 0.61 (CI 0.58-0.64)\n- KL ranks as PPL"  # timing line dropped
    summary = executed_notebook(tmp_path / "b.ipynb", "bits 3.2", heading="## Reading the results\nsome prose")
    assert key_numbers(summary) == "bits 3.2"


def test_no_conclusion_means_no_key_numbers(tmp_path):
    assert key_numbers(executed_notebook(tmp_path / "a.ipynb", None)) == ""  # the results table is not one
    assert key_numbers(tmp_path / "missing.ipynb") == ""
    (tmp_path / "cut.ipynb").write_text('{"cells": [')
    assert key_numbers(tmp_path / "cut.ipynb") == ""


def test_a_tagged_cell_and_markdown_output_win(tmp_path):
    nb = nbformat.v4.new_notebook()
    tagged = nbformat.v4.new_code_cell("display(Markdown(...))")
    tagged.metadata["tags"] = ["conclusion"]
    tagged.outputs = [nbformat.v4.new_output("display_data", {"text/markdown": "**s0 = 0.6**",
                                                               "text/plain": "<Markdown object>"})]
    late = nbformat.v4.new_code_cell("print('later')")
    late.outputs = [nbformat.v4.new_output("stream", name="stdout", text="later\n")]
    nb.cells = [tagged, nbformat.v4.new_markdown_cell("## Summary"), late]
    nbformat.write(nb, tmp_path / "t.ipynb")
    assert key_numbers(tmp_path / "t.ipynb") == "**s0 = 0.6**"


def test_only_the_conclusion_section_counts(tmp_path):
    nb = nbformat.read(executed_notebook(tmp_path / "a.ipynb", "- s0 = 0.6"), as_version=4)
    sub = nbformat.v4.new_code_cell("x")
    sub.outputs = [nbformat.v4.new_output("stream", name="stdout", text="- KL agrees\n")]
    appendix = nbformat.v4.new_code_cell("y")
    appendix.outputs = [nbformat.v4.new_output("stream", name="stdout", text="raw dump\n")]
    nb.cells += [nbformat.v4.new_markdown_cell("### Paired metric"), sub, nbformat.v4.new_markdown_cell("## Appendix"),
                 appendix]
    nbformat.write(nb, tmp_path / "a.ipynb")
    assert key_numbers(tmp_path / "a.ipynb") == "- KL agrees"  # a subsection belongs to it, the appendix not


def test_printed_lines_win_over_a_table_repr():
    cell = nbformat.v4.new_code_cell("display(df); print(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", {"text/html": "<table>", "text/plain": "   claim  verdict"}),
                    nbformat.v4.new_output("stream", name="stdout", text="- claim A: HOLDS\n")]
    assert output_text(cell) == "- claim A: HOLDS"
    cell.outputs = cell.outputs[:1]
    assert output_text(cell) == "claim  verdict"


def test_long_conclusions_are_cut(tmp_path):
    nb = executed_notebook(tmp_path / "a.ipynb", "\n".join(f"line {i}" for i in range(50)))
    lines = key_numbers(nb, max_lines=5).splitlines()
    assert lines == ["line 0", "line 1", "line 2", "line 3", "line 4", "…"]


def test_figures_go_to_the_notebook_that_wrote_them():
    runs = [{"notebook": "00_fits", "figures": ["figures/x.png"]}, {"notebook": "01_base"},
            {"notebook": "mine"}]
    figures = ["figures/x.png", "figures/01_ppl.png", "figures/mine_plot.png", "figures/stale.png",
               "figures/00_old.png"]
    by_nb, other = assign_figures(runs, figures)
    assert by_nb == {"00_fits": ["figures/x.png"], "01_base": ["figures/01_ppl.png"],
                     "mine": ["figures/mine_plot.png"]}
    assert other == ["figures/00_old.png", "figures/stale.png"]


def test_index_lists_status_time_key_numbers_and_relative_figures(tmp_path):
    out = tmp_path / "reports" / "tiny"
    runs = fake_run(out)
    runs.append({"notebook": "02_gamma", "status": "failed", "error": "ValueError: boom", "seconds": 0.3,
                 "ipynb": "", "html": "", "figures": []})
    write_png(out / "figures" / "zz_unclaimed.png", (0, 128, 0))
    (out / "results.csv").write_text("model,value\n")
    page = write_index(out, "tiny", runs).read_text()
    assert "00_alpha: PTP at 0.55" in page and "01_beta: PTP at 0.56" in page
    assert "notebook time" not in page and "ValueError: boom" in page and "2 ok, 1 failed" in page
    refs = re.findall(r"(?:href|src)='([^']+)'", page)
    assert refs and not any(r.startswith(("/", "file:")) or str(tmp_path) in r for r in refs)
    for ref in refs:
        assert (out / ref).exists(), ref
    assert "<a href='figures/00_curve.png'><img class='thumb' src='figures/00_curve.png'" in page
    assert "Other figures" in page and "zz_unclaimed" in page
    assert "id='figure-check'" in page and "naturalWidth" in page


def test_reproduce_rows_name_the_figures_a_notebook_wrote(tmp_path, monkeypatch):
    import papermill

    from mpt_utils import reproduce

    out = tmp_path / "out"
    write_png(out / "figures" / "old.png", (1, 2, 3))
    src = executed_notebook(tmp_path / "07_n.ipynb", "- done")

    def execute(source, target, **_):
        Path(target).write_bytes(Path(source).read_bytes())
        write_png(out / "figures" / "07_new.png", (9, 9, 9))

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(reproduce, "to_html", lambda nb, html: html.write_text("<html></html>"))
    row = reproduce.run_notebook(src, out, {})
    assert row["status"] == "ok" and row["figures"] == ["figures/07_new.png"]
