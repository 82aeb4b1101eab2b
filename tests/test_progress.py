"""Progress bars: to the file named by the environment (reproduce), else widgets or plain text."""

import warnings

from tqdm import std as tqdm_std

from mpt_utils import progress
from mpt_utils.progress import PROGRESS_ENV, LatestLine, progress_bar, read_progress


def test_bars_go_to_the_progress_file_and_nowhere_else(monkeypatch, tmp_path, capfd):
    target = tmp_path / "progress.txt"
    monkeypatch.setenv(PROGRESS_ENV, str(target))
    assert list(progress_bar(range(3), desc="sparsegpt 0.6", mininterval=0)) == [0, 1, 2]
    assert read_progress(target).startswith("sparsegpt 0.6 3/3 [")
    bar = progress_bar(total=49, desc="wanda 0.5")
    bar.update(12)
    bar.refresh()
    assert read_progress(target).startswith("wanda 0.5 12/49 [")
    bar.close()
    assert read_progress(target).startswith("wanda 0.5 12/49")  # the cleared bar keeps its last line
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert [p.name for p in tmp_path.iterdir()] == ["progress.txt"]  # no temp file left behind


def test_disabled_bars_write_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path / "progress.txt"))
    list(progress_bar(range(3), desc="x", disable=True))
    assert not (tmp_path / "progress.txt").exists()


def test_an_unwritable_progress_file_does_not_stop_the_work(monkeypatch, tmp_path):
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path / "missing" / "progress.txt"))
    assert sum(progress_bar(range(4), desc="x", mininterval=0)) == 6


def test_latest_line_keeps_the_newest_non_blank_line(tmp_path):
    stream = LatestLine(tmp_path / "p.txt")
    stream.write("\ra 1/3")
    stream.write("\ra 2/3\r")
    stream.write("\r      \r")
    assert read_progress(tmp_path / "p.txt") == "a 2/3"
    assert read_progress(tmp_path / "absent.txt") == ""


def test_without_widgets_a_plain_bar_on_stderr_and_no_warning(monkeypatch, capfd):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setattr(progress, "_widgets_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = progress_bar(range(2), desc="plain", mininterval=0)
        list(bar)
    assert type(bar) is tqdm_std.tqdm
    out, err = capfd.readouterr()
    assert out == "" and "plain" in err


def test_progress_goes_through_the_one_helper():
    """A module that imports tqdm itself would draw bars into executed reports."""
    import re
    from pathlib import Path

    import mpt_utils

    root = Path(mpt_utils.__file__).parent
    direct = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "progress.py"
              and re.search(r"^\s*(from tqdm(\.\w+)? import|import tqdm)", p.read_text(), re.M)
              and "eval/downstream.py" not in str(p)]  # swaps lm-eval's own bars off, imports tqdm for that
    assert direct == []
