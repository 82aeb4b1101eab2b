"""Profiles: which notebooks `make reproduce` runs, with which papermill parameters.

A profile is a JSON object (built-in ones live in `mpt_utils/profiles/`, picked by name, e.g.
`--profile paper`; your own is a path, `--profile my.json`):

    {
      "_doc": "keys starting with '_' are comments, at any level",
      "extends": "embedded",
      "common": {"model": "Qwen/Qwen2.5-0.5B", "seqlen": 1024},
      "notebooks": {"02_unstructured_pruning": {"sparsities": [0.5, 0.6]}},
      "run": ["01_dense_baseline", "02_unstructured_pruning"]
    }

- `extends`: the built-in profile this one starts from. A profile file without it extends
  `embedded`; `"extends": null` makes a file complete on its own, as the built-in `embedded` and
  `paper` are.
- `common`: parameters for every notebook that declares them; each entry replaces the inherited one.
- `notebooks`: per-notebook parameters, merged key by key into the inherited ones (a value replaces
  the inherited value whole, lists and objects included), so list only what changes. A notebook
  not inherited is added. Per-notebook entries win over `common`.
- `run`: the notebooks to run (default: every notebook of the merged profile). Notebooks always
  run in name order.

A notebook receives the `common` entries it declares, then its own entries, then `store_dir`,
`figures_dir` and `profile`, which the driver sets from `--results` / `--reports` (a profile may
not set them).

`check_profile` validates a profile against the `parameters` cell of each notebook before anything
runs: every notebook named must exist; a per-notebook key must be declared by that notebook and a
`common` key by at least one notebook (unknown names come with the closest valid name); a value must
match the declared default's type (an annotation such as `tasks: Union[str, list] = "x"` widens it; papermill reads `Union[...]`, not `a | b`):
an integer default takes integers, a float default any number, and both also take null ("all" /
"auto" in this suite); strings, true/false, lists and objects take their own kind; list items are
checked against the default list's items when those share one kind; a null default takes anything.
All problems are reported together, as one `MPTError`.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mpt_utils.errors import MPTError

BASE_PROFILE = "embedded"  # what a profile file extends when it does not say
DRIVER_KEYS = ("store_dir", "figures_dir", "profile")  # set by the driver, never by a profile
TOP_KEYS = ("extends", "common", "notebooks", "run")

_KIND_ORDER = ("int", "float", "str", "bool", "list", "dict", "null")
_KIND_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "list": "a list", "dict": "an object", "null": "null", "other": "a value"}
_PLURALS = {"int": "integers", "float": "numbers", "str": "strings", "bool": "true/false values",
            "list": "lists", "dict": "objects", "null": "nulls"}
_ANNOTATION_KINDS = {"int": {"int"}, "float": {"int", "float"}, "str": {"str"}, "bool": {"bool"},
                     "list": {"list"}, "tuple": {"list"}, "Sequence": {"list"}, "dict": {"dict"},
                     "Mapping": {"dict"}, "None": {"null"}, "NoneType": {"null"}}


@dataclass
class Profile:
    """A resolved profile: inheritance applied, comments dropped. `origin` maps ("common", key) or
    (notebook, key) to the profile that set it, so a problem names the file to edit."""

    name: str
    common: dict[str, Any]
    notebooks: dict[str, dict[str, Any]]
    run: list[str] | None = None
    origin: dict[tuple[str, str], str] = field(default_factory=dict)

    def selected(self) -> list[str]:
        """The notebooks that run, in name order."""
        return sorted(set(self.run if self.run is not None else self.notebooks))

    def parameters(self, notebook: str) -> dict[str, Any]:
        """Everything the profile gives `notebook` (the driver keeps what the notebook declares)."""
        return {**self.common, **self.notebooks.get(notebook, {})}

    def as_dict(self) -> dict[str, Any]:
        return {"common": dict(self.common), "notebooks": {nb: dict(p) for nb, p in self.notebooks.items()},
                "run": self.selected()}


# ---------------------------------------------------------------- loading and inheritance


def builtin_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files("mpt_utils.profiles").iterdir()
                  if p.name.endswith(".json"))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:  # json.loads would keep the last one silently
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, dup))}")
    return dict(pairs)


def parse_profile_text(text: str, label: str) -> dict[str, Any]:
    """JSON text -> dict, with the line and column of a syntax error in the message."""
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise MPTError(f"profile {label} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}",
                       "fix the JSON there (JSON has no comments or trailing commas; write notes as "
                       "\"_doc\": \"...\" entries)") from None
    except ValueError as err:
        raise MPTError(f"profile {label}: {err}", "keep one entry per key") from None
    if not isinstance(raw, dict):
        raise MPTError(f"profile {label} must be a JSON object {{...}}, not {_KIND_WORDS[_kind(raw)]}",
                       "see the example in mpt_utils/profiles/example_user.json")
    return raw


def _read_raw(spec: str) -> tuple[str, str, dict[str, Any], bool]:
    """(name, label, raw dict, is_builtin) for a built-in name or a path to a JSON file."""
    path = Path(spec)
    names = builtin_profiles()
    if spec in names:
        text = resources.files("mpt_utils.profiles").joinpath(f"{spec}.json").read_text(encoding="utf-8")
        return spec, spec, parse_profile_text(text, spec), True
    if path.suffix == "" and not path.exists():
        close = difflib.get_close_matches(spec, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MPTError(f"unknown profile {spec!r}",
                       f"{hint}use a built-in profile ({', '.join(names)}) or a path to a JSON file")
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise MPTError(f"profile file {path} {what}", "pass a built-in profile name or an existing JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MPTError(f"profile file {path} is not UTF-8 text", "save it as UTF-8 JSON") from None
    return path.stem, str(path), parse_profile_text(text, str(path)), False


def _problem_list(label: str, problems: list[tuple[str, str]], fix: str) -> MPTError:
    """One MPTError for every problem found (the user fixes them all in one go)."""
    fixes = {own for _, own in problems}
    fix = fixes.pop() if len(fixes) == 1 and "" not in fixes else fix  # one shared fix beats the generic one
    if len(problems) == 1:
        return MPTError(f"invalid profile {label}: {problems[0][0]}", fix)
    lines = "\n".join(f"  - {text}" for text, _ in problems)
    return MPTError(f"invalid profile {label} ({len(problems)} problems):\n{lines}", fix)


def _closest(word: str, options: list[str] | set[str]) -> str | None:
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return close[0] if close else None


def _structure_problems(raw: dict[str, Any], label: str) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for key in raw:
        if key not in TOP_KEYS and not key.startswith("_"):
            near = _closest(key, TOP_KEYS)
            hint = f"; did you mean {near!r}?" if near else ""
            problems.append((f"unknown top-level key {key!r}{hint} (allowed: {', '.join(TOP_KEYS)}, "
                             "or '_'-prefixed comments)", ""))
    if raw.get("extends") is not None and not isinstance(raw["extends"], str):
        problems.append(("'extends' must be the name of a built-in profile, or null", ""))
    if not isinstance(raw.get("common", {}), dict):
        problems.append(("'common' must be an object {\"name\": value, ...}", ""))
    notebooks = raw.get("notebooks", {})
    if not isinstance(notebooks, dict):
        problems.append(("'notebooks' must be an object {\"notebook\": {\"name\": value}, ...}", ""))
    else:
        problems += [(f"notebooks.{nb} must be an object {{\"name\": value, ...}}, not "
                      f"{_KIND_WORDS[_kind(v)]}", "") for nb, v in notebooks.items()
                     if not nb.startswith("_") and not isinstance(v, dict)]
    run = raw.get("run")
    if run is not None and (not isinstance(run, list) or not all(isinstance(n, str) for n in run)):
        problems.append(("'run' must be a list of notebook names, e.g. [\"01_dense_baseline\"]", ""))
    return problems


def _comments_out(entries: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entries.items() if not k.startswith("_")}


def resolve_profile(spec: str, _seen: tuple[str, ...] = ()) -> Profile:
    """Load a built-in profile by name or a profile file by path, with its inheritance applied.
    Checks the shape of the JSON; `check_profile` checks names and types against the notebooks."""
    name, label, raw, builtin = _read_raw(spec)
    problems = _structure_problems(raw, label)
    if problems:
        raise _problem_list(label, problems, "see the schema in mpt_utils/profiles_schema.py")
    parent = raw.get("extends", None if builtin else BASE_PROFILE)
    if parent is not None:
        if parent not in builtin_profiles():
            near = _closest(parent, builtin_profiles())
            raise MPTError(f"invalid profile {label}: extends unknown profile {parent!r}"
                           + (f"; did you mean {near!r}?" if near else ""),
                           f"extend one of: {', '.join(builtin_profiles())}")
        if parent in (*_seen, name if builtin else None):
            raise MPTError(f"invalid profile {label}: 'extends' loops back to {parent!r}", "break the loop")
        base = resolve_profile(parent, (*_seen, name))
    else:
        base = Profile(name=name, common={}, notebooks={})
    common, origin = dict(base.common), dict(base.origin)
    for key, value in _comments_out(raw.get("common", {})).items():
        common[key] = value
        origin[("common", key)] = label
    notebooks = {nb: dict(params) for nb, params in base.notebooks.items()}
    for nb, entries in _comments_out(raw.get("notebooks", {})).items():
        target = notebooks.setdefault(nb, {})
        origin.setdefault((nb, ""), label)  # who listed the notebook first
        for key, value in _comments_out(entries).items():
            target[key] = value
            origin[(nb, key)] = label
    run = raw["run"] if "run" in raw else base.run
    if "run" in raw:
        origin[("run", "")] = label
    return Profile(name=name, common=common, notebooks=notebooks, run=run, origin=origin)


# ---------------------------------------------------------------- what the notebooks declare


@dataclass(frozen=True)
class ParamSpec:
    """One declared papermill parameter: `accepts` is the set of value kinds it takes (None: any),
    `items` the kinds its list items take (None: unchecked)."""

    name: str
    default: str
    accepts: frozenset[str] | None
    items: frozenset[str] | None = None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "bool"
    for kind, types in (("int", int), ("float", float), ("str", str), ("list", (list, tuple)), ("dict", dict)):
        if isinstance(value, types):
            return kind
    return "other"


def _kinds_of_default(value: Any) -> frozenset[str]:
    kind = _kind(value)
    return frozenset({"int": {"int", "null"}, "float": {"int", "float", "null"}}.get(kind, {kind}))


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _kinds_of_annotation(annotation: str) -> frozenset[str] | None:
    """`int | None`, `Optional[float]`, `list[str]`, ... -> kinds; None when unreadable (accept any)."""
    text = annotation.replace(" ", "").strip("'\"")
    match = re.fullmatch(r"(?:typing\.)?(Optional|Union)\[(.*)\]", text)
    parts = _split_top(match.group(2), ",") + (["None"] if match.group(1) == "Optional" else []) \
        if match else _split_top(text, "|")
    kinds: set[str] = set()
    for part in parts:
        found = _ANNOTATION_KINDS.get(part.split("[", 1)[0].rsplit(".", 1)[-1])
        if found is None:
            return None
        kinds |= found
    return frozenset(kinds)


def param_spec(name: str, default: str, annotation: str = "None") -> ParamSpec:
    """The spec of a parameter from its default's source text and its annotation ("None": none)."""
    try:
        value = ast.literal_eval(default)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = ...  # an expression (e.g. a function call): its type is unknown
    if annotation not in ("None", ""):
        return ParamSpec(name, default, _kinds_of_annotation(annotation))
    if value is ... or value is None:
        return ParamSpec(name, default, None)
    items = None
    if isinstance(value, (list, tuple)) and value:
        kinds = {_kind(v) for v in value}
        if kinds <= {"int", "float"}:  # numbers: a float list takes ints too
            items = frozenset({"int"} if kinds == {"int"} else {"int", "float"})
        elif len(kinds) == 1 and "other" not in kinds:
            items = frozenset(kinds)
    return ParamSpec(name, default, _kinds_of_default(value), items)


def declared_parameters(notebook: Path) -> dict[str, ParamSpec]:
    """The parameters a notebook declares in its `parameters` cell (papermill's own reading)."""
    import papermill

    try:
        found = papermill.inspect_notebook(str(notebook))
    except Exception as err:  # a notebook that is not valid JSON / nbformat
        raise MPTError(f"cannot read the parameters of {notebook}: {type(err).__name__}: {err}",
                       "restore the notebook (git checkout notebooks/)") from None
    return {name: param_spec(name, p["default"], p["inferred_type_name"]) for name, p in found.items()}


# ---------------------------------------------------------------- checking a profile


def _describe(kinds: frozenset[str]) -> str:
    ordered = [k for k in _KIND_ORDER if k in kinds]
    if {"int", "float"} <= kinds:
        ordered.remove("int")
    return " or ".join(_KIND_WORDS[k] for k in ordered)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _type_problem(value: Any, spec: ParamSpec) -> tuple[str, str] | None:
    """(what is wrong, expected) or None when `value` fits `spec`."""
    if spec.accepts is not None and _kind(value) not in spec.accepts:
        return f"{json.dumps(value)} is {_KIND_WORDS[_kind(value)]}", _describe(spec.accepts)
    if spec.items is not None and isinstance(value, list):
        for i, item in enumerate(value):
            if _kind(item) not in spec.items:
                return (f"item [{i}] {json.dumps(item)} is {_KIND_WORDS[_kind(item)]}",
                        "a list of " + " or ".join(_PLURALS[k] for k in _KIND_ORDER
                                                   if k in spec.items and not (k == "int" and "float" in spec.items)))
    return None


def _names(notebooks: list[str], most: int = 3) -> str:
    if len(notebooks) <= most:
        return ", ".join(notebooks)
    return f"{', '.join(notebooks[:most])} and {len(notebooks) - most} more"


def check_profile(profile: Profile, notebooks_dir: Path, label: str | None = None) -> dict[str, dict[str, ParamSpec]]:
    """Validate `profile` against the notebooks in `notebooks_dir`; raise one MPTError listing every
    problem. Returns the declared parameters of each notebook in the folder."""
    label = label or profile.name
    problems: list[tuple[str, str]] = []
    available = {p.stem: p for p in sorted(Path(notebooks_dir).glob("*.ipynb")) if not p.name.startswith(".")}

    def where(section: str, key: str) -> str:
        source = profile.origin.get((section, key), profile.origin.get((section, "")))
        return f" (set in {source})" if source and source != label else ""

    listed = dict.fromkeys([*profile.notebooks, *(profile.run or [])])
    for nb in listed:
        if nb not in available:
            near = _closest(nb, available)
            hint = f"; did you mean {near!r}?" if near else ""
            src = where("run", "") if nb not in profile.notebooks else where(nb, "")
            problems.append((f"notebook {nb!r} is listed but {Path(notebooks_dir) / (nb + '.ipynb')} does not "
                             f"exist{hint}{src}", "restore the notebook or remove it from the profile"))
    declared = {nb: declared_parameters(path) for nb, path in available.items()}
    every = sorted({name for specs in declared.values() for name in specs})

    def check_value(section: str, key: str, value: Any, owners: list[str]) -> None:
        by_expected: dict[tuple[str, str], list[str]] = {}
        for nb in owners:
            bad = _type_problem(value, declared[nb][key])
            if bad:
                by_expected.setdefault(bad, []).append(nb)
        for (what, expected), nbs in by_expected.items():
            default = _short(declared[nbs[0]][key].default)
            problems.append((f"{section}.{key}: {what}, expected {expected} ({_names(nbs)} "
                             f"declare{'s' if len(nbs) == 1 else ''} {key} = {default}){where(section, key)}",
                             f"give {key} {expected}"))

    def driver_key(section: str, key: str) -> bool:
        if key in DRIVER_KEYS:
            problems.append((f"{section}.{key} is set by the driver from --results / --reports{where(section, key)}",
                             f"remove {key} from the profile"))
        return key in DRIVER_KEYS

    for key, value in profile.common.items():
        if driver_key("common", key):
            continue
        owners = [nb for nb in declared if key in declared[nb]]
        if owners:
            check_value("common", key, value, owners)
            continue
        near = _closest(key, every)
        hint = (f"; did you mean {near!r} (declared by {_names([nb for nb in declared if near in declared[nb]])})?"
                if near else "")
        problems.append((f"common.{key}: no notebook declares this parameter{hint}{where('common', key)}",
                         f"rename it to {near!r}" if near else "remove it from the profile"))
    for nb, entries in profile.notebooks.items():
        if nb not in declared:
            continue
        section = f"notebooks.{nb}"
        for key, value in entries.items():
            if driver_key(section, key):
                continue
            if key in declared[nb]:
                check_value(section, key, value, [nb])
                continue
            near = _closest(key, declared[nb])
            elsewhere = [other for other in declared if key in declared[other]]
            if near:
                hint, fix = f"; did you mean {near!r}?", f"rename it to {near!r}"
            elif elsewhere:
                hint, fix = f" (declared by {_names(elsewhere)})", "move it to the notebook that declares it"
            else:
                hint, fix = "", f"remove it; {nb} declares: {', '.join(sorted(declared[nb]))}"
            problems.append((f"{section}.{key}: {nb} declares no such parameter{hint}{where(nb, key)}", fix))
    if problems:
        raise _problem_list(label, problems, "fix each entry above; a notebook's parameters and defaults are in "
                            "its 'parameters' cell (papermill --help-notebook notebooks/<name>.ipynb)")
    return declared


def load_checked_profile(spec: str, notebooks_dir: Path) -> tuple[Profile, dict[str, dict[str, ParamSpec]]]:
    """Resolve and validate in one step (what the driver does before running anything)."""
    profile = resolve_profile(spec)
    return profile, check_profile(profile, notebooks_dir, label=_label(spec))


def _label(spec: str) -> str:
    return spec if spec in builtin_profiles() else str(Path(spec))
