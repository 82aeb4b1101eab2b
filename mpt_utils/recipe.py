"""Compression recipes: ordered steps of the method families, applied to one model.

A recipe runs its steps in the fixed order decomposition (low rank) → pruning (unstructured / N:M, or
structured) → quantization (torch, or a GGUF file), at most one step per stage. Grammar (str() writes
the canonical form, which parses back to an equal recipe):

    recipe   := "dense" | step (SEP step)*        SEP := ">" | "->" | "→"   (written " > ")
    step     := method "@" ratio [opts]             low rank, pruning, structured pruning: ratio in [0, 1)
              | method "@" N ":" M [opts]           semi-structured pruning: N of every M pruned, 0 < N < M
              | method ":" B "bit" ["/g" G] [opts]  torch quantizers: B in 2..8, G the group size
                                                    (left out: the method's default; 0: per output row)
              | "gguf:" SCHEME                      a llama.cpp file type (e.g. Q4_K_M), always last
    opts     := "[" key "=" value ("," key "=" value)* "]"   keys sorted; values are JSON scalars
                                                    (1, 0.01, true, null, "text"), bare words (sparsegpt)
                                                    or lists of scalars ([0.2,0.4,0.6], kept as tuples)

e.g. `asvd@0.05 > admm@0.35 > gguf:Q3_K_M`, `svd@0.1 > wanda@0.5 > rtn:4bit`, `wanda@2:4`,
`gptq:3bit/g128`, `sparsegpt@0.6[blocksize=64,percdamp=0.01]`, `rtn:4bit[sym=true]`. The family of a
step comes from its method name (names are unique across the registries). Options are the method's own
keyword options, checked against its registry; torch quantizers also take `sym`. Every calibrated step
also takes the engine's `n_calib` / `calib_seqlen` (CALIB_OPTIONS): it calibrates on the first `n_calib`
of the protocol's windows, cut to their first `calib_seqlen` tokens (`sleb@0.2[calib_seqlen=256,n_calib=4]`:
SLEB scores every candidate removal, so the published protocol gives it fewer, shorter windows).
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mpt_utils.catalogue import CATALOGUE, load_all, method_info
from mpt_utils.errors import MPTError
from mpt_utils.registry import check_options

FAMILIES = ("lowrank", "prune", "structured", "quant", "gguf")
STAGES = ("decomposition", "pruning", "quantization")
STAGE_OF = {"lowrank": 0, "prune": 1, "structured": 1, "quant": 2, "gguf": 2}
RATIO_FAMILIES = ("lowrank", "prune", "structured")  # written method@setting; the others method:setting
GGUF = "gguf"  # the one GGUF method name ("gguf-roundtrip" is a ladder check, not a compression step)
BITS_RANGE = (2, 8)  # what every torch quantizer accepts (quant.rtn.check_bits)
SEPARATORS = ("->", "→", ">")
# step options the engine reads itself (a calibrated step's share of the protocol's windows), never the method
CALIB_OPTIONS = ("n_calib", "calib_seqlen")
# Later methods that fail today on what an earlier family or method leaves (measured on tiny Llama; a
# test checks each pair still fails): refused before any work instead of crashing half-way.
INCOMPATIBLE: dict[str, tuple[frozenset[str], str]] = {
    "lowrank": (frozenset({"flap", "llm_pruner", "random", "slicegpt", "awq", "smoothquant"}),
                "it needs the dense q/k/v/o and gate/up/down linears, which low rank replaced by factor pairs"),
    "slicegpt": (frozenset({"awq", "smoothquant"}),
                 "it folds its scales into the RMSNorm weights, which SliceGPT folded away"),
}
SETTING_HELP = {
    "lowrank": "a parameter reduction of the decomposed linears in [0, 1), e.g. svd@0.2",
    "prune": "a sparsity in [0, 1) or an N:M pattern with 0 < N < M, e.g. wanda@0.5 or wanda@2:4",
    "structured": "the method's ratio in [0, 1), e.g. slicegpt@0.2",
    "quant": f"an integer bit width in {BITS_RANGE[0]}..{BITS_RANGE[1]}, optionally a group size "
             "(0 = per output row), e.g. rtn:4bit or gptq:3bit/g128",
    "gguf": "a llama.cpp scheme, e.g. gguf:Q4_K_M",
}
_BARE = re.compile(r"[A-Za-z_][\w.\-]*")
_STEP = re.compile(r"(?P<method>[A-Za-z][\w\-]*)\s*(?:(?P<sep>[@:])(?P<setting>[^\[\]]*))?"
                   r"(?:\[(?P<opts>.*)\])?\s*", re.S)
_BITS = re.compile(r"(?P<bits>\d+)\s*bits?(?:\s*/\s*g(?P<group>\d+))?", re.I)


def method_families() -> dict[str, str]:
    """Every method name a recipe may use -> its family (the catalogue's, which this grammar shares)."""
    found = {name: info.family for name, info in load_all().items() if info.family in FAMILIES and info.family != GGUF}
    return {**found, GGUF: GGUF}  # of the GGUF ladder's steps, only "gguf" compresses


def _unknown_method(method: str, families: Mapping[str, str]) -> MPTError:
    close = difflib.get_close_matches(method, families, n=3, cutoff=0.5)
    guess = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    return MPTError(f"unknown method {method!r} in recipe", f"{guess}known methods: {', '.join(sorted(families))}")


# -- settings and options ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Bits:
    """A torch quantizer's setting: `bits` per weight, groups of `group_size` input columns (None: the
    method's default group size; 0: one group per output row)."""

    bits: int
    group_size: int | None = None

    def __str__(self) -> str:
        return f"{self.bits}bit" + ("" if self.group_size is None else f"/g{self.group_size}")


Setting = float | tuple[int, int] | Bits | str
Options = tuple[tuple[str, Any], ...]


def _bad_setting(family: str, method: str, setting: Any, why: str) -> MPTError:
    return MPTError(f"setting {setting!r} of {method} {why}", f"a {family} step takes {SETTING_HELP[family]}")


def _coerce_setting(family: str, method: str, setting: Any) -> Setting:
    """The validated setting of a step, from its text or a value."""
    text = setting.strip() if isinstance(setting, str) else setting
    if family == GGUF:
        from mpt_utils.quant.gguf.quantize import SCHEMES  # no llama.cpp: that loads only in a child process

        scheme = str(text).upper()
        if scheme not in SCHEMES:
            close = difflib.get_close_matches(scheme, SCHEMES, n=3)
            guess = f"did you mean {' or '.join(close)}? " if close else ""
            raise MPTError(f"unknown GGUF scheme {text!r}", f"{guess}schemes: {', '.join(SCHEMES)}")
        return scheme
    if family == "quant":
        if isinstance(text, str):
            m = _BITS.fullmatch(text)
            if m is None:
                raise _bad_setting(family, method, text, "is not a bit width")
            group = m["group"]
            text = Bits(int(m["bits"]), None if group is None else int(group))
        elif isinstance(text, int) and not isinstance(text, bool):
            text = Bits(text)
        if not isinstance(text, Bits):
            raise _bad_setting(family, method, setting, "is not a bit width")
        lo, hi = BITS_RANGE
        if isinstance(text.bits, bool) or not isinstance(text.bits, int) or not lo <= text.bits <= hi:
            raise _bad_setting(family, method, str(text), f"has bits outside {lo}..{hi}")
        g = text.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 0):
            raise _bad_setting(family, method, str(text), "has an invalid group size")
        fixed = method_info(method).traits.get("fixed_bits")
        if fixed is not None and text.bits != fixed:  # a named format (NF4, LLM.int8()) has one width
            raise MPTError(f"{method} is a {fixed}-bit format, not {text.bits}-bit",
                           f"write {method}:{fixed}bit, or use a bit-width quantizer (rtn, gptq) for {text.bits} bits")
        return text
    if family == "prune" and (isinstance(text, tuple | list) or (isinstance(text, str) and ":" in text)):
        return _pattern(method, text)
    if isinstance(text, str):
        try:
            text = float(text)
        except ValueError:
            raise _bad_setting(family, method, setting, "is not a number") from None
    if isinstance(text, bool) or not isinstance(text, int | float):
        raise _bad_setting(family, method, setting, "is not a number")
    value = float(text)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise _bad_setting(family, method, value, "is outside [0, 1)")
    return value


def _pattern(method: str, text: str | tuple | list) -> tuple[int, int]:
    from mpt_utils.prune import get_method

    try:
        n, m = (int(v) for v in (text.split(":") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        raise _bad_setting("prune", method, text, "is not an N:M pattern") from None
    if not 0 < n < m:
        raise _bad_setting("prune", method, f"{n}:{m}", "is not an N:M pattern with 0 < N < M")
    if not get_method(method).supports_nm:
        raise MPTError(f"{method} does not support N:M patterns ({n}:{m})",
                       "use an unstructured sparsity with it, or another method for N:M")
    return n, m


def _coerce_options(options: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Options:
    pairs = list(options.items() if isinstance(options, Mapping) else options)
    keys = [k for k, _ in pairs]
    for key, value in pairs:
        if not isinstance(key, str) or not key.isidentifier():
            raise MPTError(f"option name {key!r} is not an identifier", "write options as [key=value,...]")
        if keys.count(key) > 1:
            raise MPTError(f"option {key!r} given twice", "give each option once")
        if not _is_scalar(value) and not (isinstance(value, list | tuple) and all(map(_is_scalar, value))):
            raise MPTError(f"option {key}={value!r} is not a JSON scalar or a list of them",
                           "a recipe holds numbers, true/false, null, strings and lists of them; "
                           "call the family API for more")
    # a list becomes a tuple: options are part of hashable cache keys (a low-rank plan's)
    return tuple(sorted((k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in pairs))


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _check_calib_options(family: str, method: str, options: dict[str, Any]) -> None:
    given = [k for k in CALIB_OPTIONS if k in options]
    if not given:
        return
    if family == GGUF or not method_info(method).calibration:
        raise MPTError(f"{method} takes no calibration windows: {', '.join(given)} cannot be set for it",
                       f"drop {', '.join(given)} from the {method} step")
    for k in given:
        value = options[k]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MPTError(f"{k}={value!r} in the {method} step is not a positive whole number",
                           f"write e.g. {method}@...[{k}=4]: the step calibrates on that share of the "
                           "protocol's windows")


def _check_step_options(family: str, method: str, options: dict[str, Any]) -> None:
    """One MPTError naming the closest valid option, through each family's own registry check (the
    engine's CALIB_OPTIONS are checked here and never reach the method)."""
    _check_calib_options(family, method, options)
    options = {k: v for k, v in options.items() if k not in CALIB_OPTIONS}
    if family == "lowrank":
        from mpt_utils.lowrank import LOWRANK

        LOWRANK.check_options(method, options)
    elif family == "prune":
        from mpt_utils.prune import check_method_options

        check_method_options(method, options)
    elif family == "structured":
        from mpt_utils.prune.structured import STRUCTURED

        STRUCTURED.check_options(method, options)
    elif family == "quant":
        from mpt_utils.quant import QUANTIZERS

        if "group_size" in options or "bits" in options:
            raise MPTError(f"bits and group_size of {method} are its setting, not options",
                           f"write {method}:<bits>bit/g<group size>, e.g. {method}:4bit/g128")

        valid = QUANTIZERS.options(method)
        if valid is not None:  # `sym` is an engine argument of `quantize`, but a recipe may set it
            check_options(f"quantizer {method!r}", options, valid | {"sym"})
    else:
        check_options("a GGUF step", options, ())


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, str) and _BARE.fullmatch(value) and not _is_json(value):
        return value
    return json.dumps(value)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _parse_value(raw: str) -> Any:
    if _BARE.fullmatch(raw) and not _is_json(raw):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        value = ...
    if isinstance(value, list) and all(map(_is_scalar, value)):
        return tuple(value)
    if value is ... or isinstance(value, dict | list):
        raise MPTError(f"cannot read option value {raw!r}",
                       'use a number, true/false/null, a word, a "string" or a list of them, e.g. [0.2,0.4]')
    return value


def _split(text: str, separators: tuple[str, ...]) -> list[str]:
    """Split at `separators` outside brackets and double quotes (option values may hold them)."""
    parts, start, depth, quoted, i = [], 0, 0, False, 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch in "[]":
            depth += 1 if ch == "[" else -1
        elif depth == 0:
            sep = next((s for s in separators if text.startswith(s, i)), None)
            if sep is not None:
                parts.append(text[start:i])
                i += len(sep)
                start = i
                continue
        i += 1
    parts.append(text[start:])
    return parts


def _parse_options(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in _split(text, (",",)):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise MPTError(f"cannot read option {item.strip()!r}",
                           "write options as [key=value,...], e.g. sparsegpt@0.6[blocksize=64,percdamp=0.01]")
        if key in out:
            raise MPTError(f"option {key!r} given twice", "give each option once")
        out[key] = _parse_value(raw.strip())
    return out


# -- steps and recipes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One compression step: `family` (see FAMILIES), registered `method`, its `setting` (a ratio, an N:M
    pattern, `Bits` or a GGUF scheme; text is parsed) and method `options` (stored sorted)."""

    family: str
    method: str
    setting: Setting
    options: Options = ()

    def __post_init__(self) -> None:
        families = method_families()
        if self.method not in families:
            raise _unknown_method(self.method, families)
        if self.family != families[self.method]:
            raise MPTError(f"{self.method} is a {families[self.method]} method, not {self.family}",
                           "build steps with Step.of(method, setting), which knows the family")
        object.__setattr__(self, "setting", _coerce_setting(self.family, self.method, self.setting))
        object.__setattr__(self, "options", _coerce_options(self.options))
        _check_step_options(self.family, self.method, self.opts)

    @classmethod
    def of(cls, method: str, setting: Setting, **options: Any) -> Step:
        families = method_families()
        if method not in families:
            raise _unknown_method(method, families)
        return cls(families[method], method, setting, tuple(options.items()))

    @classmethod
    def parse(cls, text: str) -> Step:
        m = _STEP.fullmatch(text.strip())
        if m is None:
            raise MPTError(f"cannot read recipe step {text.strip()!r}",
                           "write method@ratio, method@N:M, method:4bit or gguf:SCHEME, options in [key=value,...]")
        method, sep, setting = m["method"], m["sep"], (m["setting"] or "").strip()
        families = method_families()
        if method not in families:
            raise _unknown_method(method, families)
        family = families[method]
        want = "@" if family in RATIO_FAMILIES else ":"
        if not setting:
            raise MPTError(f"recipe step {text.strip()!r} has no setting", f"a {family} step takes {SETTING_HELP[family]}")
        if sep != want:
            raise MPTError(f"recipe step {text.strip()!r} writes its setting after {sep!r}",
                           f"a {family} step is written {method}{want}<setting>, e.g. {method}{want}{setting}")
        options = _parse_options(m["opts"]) if m["opts"] is not None and m["opts"].strip() else {}
        return cls(family, method, setting, tuple(options.items()))

    @property
    def opts(self) -> dict[str, Any]:
        """The options as a dict (the engine's CALIB_OPTIONS included)."""
        return dict(self.options)

    @property
    def method_opts(self) -> dict[str, Any]:
        """The options the method itself takes (all but the engine's CALIB_OPTIONS)."""
        return {k: v for k, v in self.options if k not in CALIB_OPTIONS}

    def calibration(self, calib_ids: Any) -> Any:
        """This step's share of the protocol's calibration windows [n, seqlen]: the first `n_calib`,
        cut to `calib_seqlen` tokens (both optional); one clear error when the protocol has fewer."""
        opts = self.opts
        if calib_ids is None or not any(k in opts for k in CALIB_OPTIONS):
            return calib_ids
        n, length = opts.get("n_calib", calib_ids.shape[0]), opts.get("calib_seqlen", calib_ids.shape[1])
        if n > calib_ids.shape[0] or length > calib_ids.shape[1]:
            raise MPTError(f"{self} asks for {n} calibration windows of {length} tokens, the protocol has "
                           f"{calib_ids.shape[0]} of {calib_ids.shape[1]}",
                           "lower n_calib / calib_seqlen in the step, or raise the protocol's n_calib / seqlen")
        return calib_ids[:n, :length]

    @property
    def stage(self) -> int:
        return STAGE_OF[self.family]

    @property
    def setting_text(self) -> str:
        s = self.setting
        if isinstance(s, float):
            return repr(s)
        if isinstance(s, tuple):
            return f"{s[0]}:{s[1]}"
        return str(s)

    @property
    def version(self) -> int:
        """The method's declared algorithm version (the results store recomputes when it changes)."""
        return CATALOGUE[self.method].version

    def __str__(self) -> str:
        sep = "@" if self.family in RATIO_FAMILIES else ":"
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.options)
        return f"{self.method}{sep}{self.setting_text}" + (f"[{opts}]" if opts else "")


def _check_recipe(steps: tuple[Step, ...]) -> None:
    for prev, step in zip(steps, steps[1:]):
        if prev.family == GGUF:
            raise MPTError(f"GGUF step {prev} is not the last step ({step} follows it)",
                           "a GGUF step writes the llama.cpp file, so it must end the recipe")
    for i, step in enumerate(steps):
        for earlier in steps[:i]:
            if earlier.stage == step.stage:
                raise MPTError(f"two {STAGES[step.stage]} steps: {earlier} and {step}",
                               f"a recipe takes at most one step per stage ({' > '.join(STAGES)})")
            if earlier.stage > step.stage:
                fixed = " > ".join(map(str, sorted(steps, key=lambda s: s.stage)))
                raise MPTError(f"wrong order: {STAGES[step.stage]} step {step} comes after "
                               f"{STAGES[earlier.stage]} step {earlier}",
                               f"steps run {' > '.join(STAGES)}: write {fixed!r}")
            for cause in (earlier.family, earlier.method):
                later, why = INCOMPATIBLE.get(cause, (frozenset(), ""))
                if step.method in later:
                    raise MPTError(f"{step} cannot follow {earlier}: {why}",
                                   f"drop one of them; after {earlier} use one of the other methods")


@dataclass(frozen=True)
class Recipe:
    """An ordered, validated tuple of steps; `Recipe()` (written "dense") compresses nothing."""

    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        _check_recipe(self.steps)

    @classmethod
    def parse(cls, text: str | Recipe) -> Recipe:
        if isinstance(text, Recipe):
            return text
        if text.strip().lower() in ("", "dense"):
            return cls()
        parts = _split(text, SEPARATORS)
        if any(not p.strip() for p in parts):
            raise MPTError(f"recipe {text!r} has an empty step",
                           "separate steps with ' > ', e.g. 'svd@0.1 > wanda@0.5 > rtn:4bit'")
        return cls(tuple(Step.parse(p) for p in parts))

    def __str__(self) -> str:
        return " > ".join(map(str, self.steps)) or "dense"

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> Step:
        return self.steps[i]

    @property
    def label(self) -> str:
        """Short text for tables and legends."""
        return " → ".join(map(str, self.steps)) or "dense"

    @property
    def gguf_scheme(self) -> str | None:
        """The scheme of the final GGUF step, if the recipe ends in one."""
        return str(self.steps[-1].setting) if self.steps and self.steps[-1].family == GGUF else None

    @property
    def torch_part(self) -> Recipe:
        """The steps `apply_recipe` runs (all but a final GGUF step)."""
        return Recipe(tuple(s for s in self.steps if s.family != GGUF))

    def key(self) -> dict[str, Any]:
        """What the results store keys a recipe's points by: the canonical text and every step with its
        method's algorithm version, so bumping a version recomputes exactly the recipes that use it."""
        method_families()  # the versions are registered when the families load
        return {"recipe": str(self),
                "steps": [{"family": s.family, "method": s.method, "setting": s.setting_text, "options": s.opts,
                           "version": s.version} for s in self.steps],
                # the store's own version lookup (store.point_inputs) reads this key as well; a wrapper's
                # base method (owl@0.5[base=sparsegpt]) counts too, so bumping the base recomputes it
                "registry_method": [n for s in self.steps for n in (s.method, *_base_method(s))]}


def _base_method(step: Step) -> list[str]:
    """The method a wrapper step (OWL, DSnoT) runs inside, named by its `base` option or defaulted."""
    if step.family != "prune":
        return []
    from mpt_utils.prune import get_method

    base = step.opts.get("base", inspect.signature(get_method(step.method).fn).parameters.get("base"))
    if isinstance(base, inspect.Parameter):
        base = base.default
    return [base] if isinstance(base, str) else []


# -- applying ------------------------------------------------------------------------------------------
def needs_calibration(step: Step) -> bool:
    return step.family != GGUF and method_info(step.method).calibration


def _calib_key(calib_ids: Any) -> str:
    if calib_ids is None:
        return "none"
    data = calib_ids.detach().cpu().contiguous().numpy().tobytes()
    return f"{tuple(calib_ids.shape)}:{hashlib.sha1(data).hexdigest()[:16]}"


def lowrank_plan(model, step: Step, calib_ids=None, *, device=None, progress: bool = False,
                 cache: dict | None = None) -> Any:
    """The ratio-independent plan (`LowRankPlan`: SVDs, ASVD's sensitivity table) of the low-rank
    `step` on the dense `model`, kept in `cache` per method, options and calibration windows: what a
    recipe's first low-rank step reuses across ratios, and what timing its layer shapes needs."""
    from mpt_utils.lowrank import prepare

    key = ("recipe", step.family, step.method, step.options, _calib_key(calib_ids))
    plan = cache.get(key) if cache is not None else None
    if plan is None:
        plan = prepare(model, step.method, calib_ids, device=device, progress=progress, **step.method_opts)
        if cache is not None:
            cache[key] = plan
    return plan


def _lowrank(model, step: Step, calib_ids, device, progress, cache) -> dict[str, Any]:
    plan = lowrank_plan(model, step, calib_ids, device=device, progress=progress, cache=cache)
    report = plan.apply(model, step.setting)
    report.originals = {}  # compressed in place for good: do not keep the dense linears alive
    summary = report.summary()
    summary.pop("decompose_seconds")
    # each decomposed linear's measured rank and size (a method's allocation, e.g. ASVD's)
    layers = [{"layer": r.name, "rank": r.rank, "out_features": r.out_features, "in_features": r.in_features,
               "dense_params": r.dense_params, "params": r.params} for r in report.layers]
    return {"ratio": report.ratio, **summary, "layers": layers}


def _prune(model, step: Step, calib_ids, device, progress, cache) -> dict[str, Any]:
    from mpt_utils.prune import get_method
    from mpt_utils.prune.engine import allocation_scores, prune_model

    nm = isinstance(step.setting, tuple)
    scores = None
    if cache is not None and get_method(step.method).allocate is not None:
        # OWL's dense block scores do not depend on the ratio: one dense pass serves a whole sweep
        key = ("recipe", step.family, step.method, step.options, _calib_key(calib_ids), "block_scores")
        if key not in cache:
            cache[key] = allocation_scores(model, step.method, calib_ids=calib_ids, device=device,
                                           progress=progress, **step.method_opts)
        scores = cache[key]
    report = prune_model(model, step.method, None if nm else step.setting, calib_ids=calib_ids,
                         pattern=step.setting if nm else None, device=device, progress=progress,
                         block_scores=scores, **step.method_opts)
    return {k: v for k, v in report.as_dict().items() if k not in ("method", "seconds")}


def _structured(model, step: Step, calib_ids, device, progress, cache) -> dict[str, Any]:
    from mpt_utils.prune.structured import structured_prune

    sub = None if cache is None else cache.setdefault(("recipe", step.family, step.method, step.options), {})
    result = structured_prune(model, step.method, step.setting, calib_ids, cache=sub, device=device,
                              progress=progress, **step.method_opts)
    return {k: v for k, v in result.as_dict().items() if k not in ("method", "seconds")}


def _quant(model, step: Step, calib_ids, device, progress, cache) -> dict[str, Any]:
    from mpt_utils.compression_axis import mark_quantized, zero_counts
    from mpt_utils.quant import quantize
    from mpt_utils.quant.size import storage

    setting = step.setting
    assert isinstance(setting, Bits)
    group = {} if setting.group_size is None else {"group_size": setting.group_size}
    pruned = zero_counts(model)  # before quantizing: rounding to zero is not pruning
    result = quantize(model, step.method, bits=setting.bits, calib_ids=calib_ids, device=device,
                      progress=progress, **group, **step.method_opts)
    mark_quantized(model, result.layers, pruned)
    size = storage(model, result.layers)
    return {**result.spec.as_dict(), "act_bits": result.act_bits, "n_quantized": len(result.layers),
            "bits_per_weight": size.bits_per_weight, "storage_ratio": size.ratio, "extra": dict(result.extra)}


_APPLY: dict[str, Callable[..., dict[str, Any]]] = {
    "lowrank": _lowrank, "prune": _prune, "structured": _structured, "quant": _quant}


def apply_recipe(model, recipe: Recipe | str, calib_ids=None, *, device=None, progress: bool = False,
                 cache: dict | None = None) -> list[dict[str, Any]]:
    """Apply `recipe` to `model` (an nn.Module) in place, step by step through each family's own entry
    point; every calibrated step calibrates on `calib_ids` [n, seqlen] through the model as compressed so
    far (a step's `n_calib` / `calib_seqlen` options take the first windows / tokens of them, `Step.calibration`).
    Pass a fresh copy of the dense model. Returns one report per step: family, method, setting, step
    (its text), options, seconds (the step's wall time) and what the family measured on the tensors
    (low rank: param_reduction...; pruning: achieved sparsity...; structured: param/block reduction...;
    quantization: bits, group_size, bits_per_weight...). The quantized specs are recorded on the model
    (`mpt_utils.compression_axis.mark_quantized`) for the compression axis.

    A GGUF step is not applied here: it is a file, written by the GGUF writer (`mpt_utils.quant.gguf`)
    in a child process, so a recipe ending in one is refused before any work; apply
    `recipe.torch_part` and export `recipe.gguf_scheme` from the result.

    `cache`: a dict shared by calls on fresh copies of the same dense model with the same `calib_ids`;
    only the first step sees the dense model, so only its ratio-independent work (a low-rank plan, a
    structured method's scores) is kept there.
    """
    recipe = Recipe.parse(recipe)
    if recipe.gguf_scheme is not None:
        raise MPTError(f"recipe {recipe} ends in a GGUF step, which apply_recipe does not apply",
                       f"GGUF steps are exported by the GGUF writer: apply_recipe(model, recipe.torch_part, ...), "
                       f"then export the model with mpt_utils.quant.gguf and quantize it to {recipe.gguf_scheme}")
    needy = [str(s) for s in recipe if needs_calibration(s)]
    if needy and calib_ids is None:
        raise MPTError(f"{', '.join(needy)} need calibration windows",
                       "pass calib_ids=calibration_windows(tokenizer, corpus, n, seqlen)")
    shares = [step.calibration(calib_ids) if needs_calibration(step) else None for step in recipe]  # checked first
    reports = []
    for i, step in enumerate(recipe):
        start = time.perf_counter()
        measured = _APPLY[step.family](model, step, shares[i], device, progress, cache if i == 0 else None)
        reports.append({"family": step.family, "method": step.method, "setting": step.setting_text,
                        "step": str(step), "options": step.opts, "seconds": time.perf_counter() - start,
                        **measured})
    return reports


__all__ = ["Bits", "Recipe", "Step", "apply_recipe", "lowrank_plan", "method_families", "needs_calibration"]
