"""What the README shows a user must work as shown."""

import re
from pathlib import Path

from mpt_utils.profiles_schema import load_checked_profile

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_profile_example_passes_the_profile_checks(tmp_path):
    blocks = re.findall(r"```json\n(.*?)```", README, re.S)
    assert blocks, "the README shows a profile"
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.json"
        path.write_text(block)
        profile, _ = load_checked_profile(str(path), ROOT / "notebooks")
        assert profile.selected()


def test_the_figures_the_readme_shows_exist():
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert shown
    assert [p for p in shown if not (ROOT / p).is_file()] == []
