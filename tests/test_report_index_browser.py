"""The reports' index in a real headless browser (Debian's Chromium): every figure must load.

The page's own footer script counts the images that did not decode; the test reads that line from
the DOM Chromium dumps after load, and checks a screenshot of the page is not blank. A copy of the
folder with one figure missing must report exactly that one, so the check can fail.
"""

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from report_fixtures import fake_run

from mpt_utils.report_index import write_index

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=(
    "needs Debian's Chromium at /usr/bin/chromium: `apt-get install -y chromium` as root "
    "(scripts/setup_env.sh does this when it runs as root)"))


def chromium(*args: str) -> subprocess.CompletedProcess:
    # a fresh, empty profile per launch: no state from another run, no first-run prompts
    with tempfile.TemporaryDirectory(prefix="mpt-chromium-") as profile:
        return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                               *args], capture_output=True, text=True, timeout=120, check=False)


def figure_check(index: Path) -> str:
    """The footer line the page's script wrote after load."""
    run = chromium("--dump-dom", index.resolve().as_uri())
    found = re.search(r"id=\"figure-check\"[^>]*>([^<]*)<", run.stdout)
    assert found, f"no figure check in the dumped DOM (exit {run.returncode}): {run.stderr[-500:]}"
    return found.group(1)


def screenshot_colours(index: Path, shot: Path) -> int:
    from PIL import Image

    run = chromium("--window-size=1000,700", f"--screenshot={shot}", index.resolve().as_uri())
    assert shot.exists(), f"no screenshot (exit {run.returncode}): {run.stderr[-500:]}"
    with Image.open(shot) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """The same fake run twice: complete, and moved elsewhere with one figure missing."""
    root = tmp_path_factory.mktemp("reports")
    good = root / "good"
    runs = fake_run(good)
    write_index(good, "tiny", runs)
    broken = root / "moved" / "broken"
    shutil.copytree(good, broken)  # a moved copy: relative links must still resolve
    (broken / runs[1]["figures"][0]).unlink()
    return good / "index.html", broken / "index.html"


def test_every_figure_loads(indexes):
    assert figure_check(indexes[0]) == "2 figures, 0 failed to load"


def test_a_missing_figure_is_reported(indexes):
    assert figure_check(indexes[1]) == "2 figures, 1 failed to load"


def test_the_page_renders(indexes, tmp_path):
    assert screenshot_colours(indexes[0], tmp_path / "index.png") > 2  # text and both figures, not blank
