"""The offline downstream suite: lm-eval multiple-choice tasks built from gensim's questions-words.txt.

Factual recall (ParaRel-style cloze, one item per distinct subject of a relation):

| task                         | section                  | items | template                               |
| ---------------------------- | ------------------------ | ----- | -------------------------------------- |
| mpt_capital_common_countries | capital-common-countries | 23    | "The capital of {x} is" -> " {y}"      |
| mpt_capital_world            | capital-world            | 116   | "The capital of {x} is" -> " {y}"      |
| mpt_currency                 | currency                 | 30    | "The currency of {x} is the" -> " {y}" |
| mpt_city_in_state            | city-in-state            | 66    | "{x} is a city in the state of" -> " {y}" |

and one grammatical-analogy task, mpt_grammar_analogy: 40 analogy lines from each of the nine gram*
sections (360 items), "{a} is to {b} as {c} is to" -> " {d}".

Every item has 4 choices: the correct answer and 3 distinct distractors drawn from the answers of
the same relation (same section), in a seeded random order, so chance is exactly 0.25. Subjects
with two answers in the file (city-in-state: Glendale is in Arizona and in California) are dropped
rather than guessed. Items are shuffled once, so lm-eval's `limit` takes an unbiased prefix.
Construction is deterministic (string-seeded RNG, sorted inputs): same file, same JSON, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from mpt_utils.errors import MPTError
from mpt_utils.store import atomic_write_text

BUILD_VERSION = 1  # bump when construction changes: cached JSON is rebuilt
N_CHOICES = 4
GRAMMAR_PER_SECTION = 40
TASK_DIR = Path(__file__).resolve().parent.parent / "tasks" / "mpt_offline"
SOURCE = "questions-words.txt"

# task name -> (questions-words section, prompt template over subject x, whether the file writes the
# pair as answer-subject: capital sections read "Athens Greece", the others subject-answer)
FACTUAL: dict[str, tuple[str, str, bool]] = {
    "mpt_capital_common_countries": ("capital-common-countries", "The capital of {x} is", True),
    "mpt_capital_world": ("capital-world", "The capital of {x} is", True),
    "mpt_currency": ("currency", "The currency of {x} is the", False),
    "mpt_city_in_state": ("city-in-state", "{x} is a city in the state of", False),
}
GRAMMAR_TASK = "mpt_grammar_analogy"
GRAMMAR_TEMPLATE = "{a} is to {b} as {c} is to"
OFFLINE_TASKS: tuple[str, ...] = (*FACTUAL, GRAMMAR_TASK)


def source_file() -> Path:
    from mpt_utils.data import _gensim_test_data

    path = _gensim_test_data() / SOURCE
    if not path.exists():
        raise MPTError(f"{path} is missing", "reinstall gensim (pip install --force-reinstall gensim)")
    return path


def read_sections(path: Path) -> dict[str, list[tuple[str, str, str, str]]]:
    """Analogy lines `a b c d` grouped by their `: section` header."""
    sections: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            current = line[1:].strip()
        elif line.strip() and current is not None:
            a, b, c, d = line.split()
            sections[current].append((a, b, c, d))
    return dict(sections)


def _mc_item(rng: random.Random, query: str, answer: str, pool: list[str], **extra: Any) -> dict[str, Any]:
    distractors = rng.sample([p for p in pool if p != answer], N_CHOICES - 1)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "gold": choices.index(answer), "answer": answer, **extra}


def factual_items(task: str, sections: dict[str, list[tuple[str, str, str, str]]]) -> list[dict[str, Any]]:
    section, template, answer_first = FACTUAL[task]
    answers: dict[str, set[str]] = defaultdict(set)
    for a, b, c, d in sections[section]:
        for x, y in ((a, b), (c, d)):
            if answer_first:
                x, y = y, x
            answers[x].add(y)
    # a subject with two answers in the file is ambiguous as a single-answer question: drop it
    facts = sorted((x, next(iter(ys))) for x, ys in answers.items() if len(ys) == 1)
    pool = sorted({y for _, y in facts})
    rng = random.Random(f"mpt-offline:{task}:v{BUILD_VERSION}")
    items = [_mc_item(rng, template.format(x=x), y, pool, subject=x, relation=section) for x, y in facts]
    rng.shuffle(items)
    return [{"id": i, **item} for i, item in enumerate(items)]


def grammar_items(sections: dict[str, list[tuple[str, str, str, str]]]) -> list[dict[str, Any]]:
    rng = random.Random(f"mpt-offline:{GRAMMAR_TASK}:v{BUILD_VERSION}")
    items = []
    for section in sorted(s for s in sections if s.startswith("gram")):
        lines = sorted(set(sections[section]))
        pool = sorted({d for *_, d in lines} | {b for _, b, _, _ in lines})
        for a, b, c, d in rng.sample(lines, min(GRAMMAR_PER_SECTION, len(lines))):
            items.append(_mc_item(rng, GRAMMAR_TEMPLATE.format(a=a, b=b, c=c), d, pool, subject=c,
                                  relation=section))
    rng.shuffle(items)
    return [{"id": i, **item} for i, item in enumerate(items)]


def build_items() -> dict[str, list[dict[str, Any]]]:
    sections = read_sections(source_file())
    return {**{task: factual_items(task, sections) for task in FACTUAL}, GRAMMAR_TASK: grammar_items(sections)}


def data_dir(task_dir: Path = TASK_DIR) -> Path:
    return task_dir / "data"


def _manifest(items: dict[str, list[dict[str, Any]]], source: Path) -> dict[str, Any]:
    return {"build_version": BUILD_VERSION, "source": SOURCE,
            "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "n_choices": N_CHOICES, "sizes": {task: len(rows) for task, rows in items.items()}}


def _is_current(task_dir: Path) -> bool:
    path = data_dir(task_dir) / "manifest.json"
    if not path.exists():
        return False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return manifest.get("build_version") == BUILD_VERSION and all(
        (data_dir(task_dir) / f"{task}.jsonl").exists() for task in OFFLINE_TASKS)


def build_offline_tasks(task_dir: str | Path | None = None, force: bool = False) -> Path:
    """Write the suite's JSONL files next to its YAML configs (idempotent) and return the directory to
    pass to lm-eval as `TaskManager(include_path=...)`."""
    task_dir = Path(task_dir) if task_dir is not None else TASK_DIR
    if task_dir.resolve() != TASK_DIR:  # a copy elsewhere (tests, read-only installs): bring the configs
        for src in TASK_DIR.iterdir():
            if src.is_file() and not src.name.endswith(".pyc"):
                atomic_write_text(task_dir / src.name, src.read_text(encoding="utf-8"))
    if not force and _is_current(task_dir):
        return task_dir
    source = source_file()
    items = build_items()
    out = data_dir(task_dir)
    for task, rows in items.items():
        atomic_write_text(out / f"{task}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    atomic_write_text(out / "manifest.json", json.dumps(_manifest(items, source), indent=1, sort_keys=True))
    return task_dir


def load_items(task: str, task_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The items of one offline task, building the JSON on first use (fresh clones, wheels)."""
    if task not in OFFLINE_TASKS:
        raise MPTError(f"unknown offline task {task!r}", f"choose one of: {', '.join(OFFLINE_TASKS)}")
    folder = Path(task_dir) if task_dir is not None else TASK_DIR
    try:
        build_offline_tasks(folder)
    except OSError:  # a read-only install: build into the user's cache instead
        folder = build_offline_tasks(Path.home() / ".cache" / "mpt_utils" / "tasks" / "mpt_offline")
    path = data_dir(folder) / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def describe_offline_suite() -> list[dict[str, Any]]:
    """One row per task: size, choices, chance level and prompt template (for tables and reports)."""
    rows = []
    for task in OFFLINE_TASKS:
        items = load_items(task)
        section, template, _ = FACTUAL.get(task, ("gram1..gram9", GRAMMAR_TEMPLATE, False))
        rows.append({"task": task, "source_section": section, "n_items": len(items),
                     "n_choices": N_CHOICES, "chance": sum(1 / len(i["choices"]) for i in items) / len(items),
                     "template": template + " {answer}"})
    return rows
