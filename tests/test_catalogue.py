"""The method catalogue: every registered method declares its traits in its one register call, the
flags agree with what the engines do, and a family finds its method modules by itself."""

from __future__ import annotations

import copy
import re
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from mpt_utils import catalogue
from mpt_utils.catalogue import display_names, families, load_all, method_info, methods
from mpt_utils.errors import MPTError
from mpt_utils.registry import Registry, method_modules

COMPRESSION = ("prune", "structured", "quant", "lowrank")


def _registries() -> dict[str, Registry]:
    load_all()
    return {r.family: r for r in catalogue.REGISTRIES if r.package is not None and r.family in COMPRESSION}


def test_every_method_declares_its_traits():
    infos = load_all().values()
    assert set(COMPRESSION) <= set(families())
    for info in infos:
        assert isinstance(info.display, str) and info.display, info.name
        assert isinstance(info.calibration, bool), info.name
        assert isinstance(info.version, int) and info.version >= 1, info.name
        assert info.mode in (("I", "II") if info.family == "lowrank" else (None,)), info.name
        assert info.modules and info.modules[0].startswith("mpt_utils."), info.name
    for family in COMPRESSION:  # each family has both kinds, so the behaviour test below covers both
        assert {i.calibration for i in infos if i.family == family} == {True, False}, family
    frame = pd.DataFrame(methods())
    assert {"name", "family", "display", "paper_name", "calibration", "mode", "version"} <= set(frame.columns)
    assert frame["name"].is_unique and len(frame) == len(infos)
    assert set(pd.DataFrame(methods("lowrank"))["mode"]) == {"I", "II"}


def test_each_registry_lists_exactly_its_family():
    for family, registry in _registries().items():
        assert registry.names() == sorted(i.name for i in load_all().values() if i.family == family)


def test_unknown_names_raise_naming_the_closest():
    with pytest.raises(MPTError) as err:
        method_info("sparsgpt")
    assert err.value.message == "unknown method 'sparsgpt'"
    assert err.value.fix.startswith("did you mean 'sparsegpt'")
    with pytest.raises(MPTError, match="unknown method family 'pruning'") as err:
        methods("pruning")
    assert "prune, structured, quant, lowrank" in err.value.fix
    with pytest.raises(MPTError, match="did you mean 'slicegpt'"):
        _registries()["structured"].get("slicegtp")


def test_names_for_tables_and_papers_come_from_the_catalogue():
    from mpt_utils.lowrank.sweep import Curve
    from mpt_utils.prune.sweep import paper_name
    from mpt_utils.published import load_published

    assert display_names("structured", free_suffix=" (calib-free)")["random"] == "Random (calib-free)"
    assert display_names(names=["smoothquant", "gguf"]) == {"smoothquant": "SmoothQuant W8A8", "gguf": "GGUF"}
    assert Curve("svd_llm_seq", "svd_llm", (0.2,), {"sequential": True}).display == "SVD-LLM (seq)"
    assert (paper_name("owl:sparsegpt"), paper_name("dsnot:wanda"), paper_name("ria")) == ("SparseGPT_owl", "w.DSnoT", "RIA")
    assert paper_name("dense") is None and paper_name("owl") is None  # a wrapper's name needs its base
    printed = set().union(*(load_published(t)["method"] for t in ("table1", "table2", "table3", "table4", "table7")))
    declared = {n for i in load_all().values() if i.paper_name is not None
                for n in (i.paper_name.values() if isinstance(i.paper_name, dict) else [i.paper_name])}
    assert declared and declared <= printed  # every name a method claims the papers use is printed there


def _runs(family: str, name: str, model) -> None:
    """Run method `name` of `family` on `model` without any calibration data."""
    if family == "prune":
        from mpt_utils.prune import prune_model

        prune_model(model, name, 0.5)
    elif family == "structured":
        from mpt_utils.prune.structured import structured_prune

        structured_prune(model, name, 0.2, None, progress=False)
    elif family == "quant":
        from mpt_utils.quant import quantize

        quantize(model, name, bits=method_info(name).traits.get("fixed_bits") or 4, progress=False)
    else:
        from mpt_utils.lowrank import decompose

        decompose(model, name, 0.2, progress=False)


@pytest.mark.parametrize("family", COMPRESSION)
def test_calibration_flag_matches_what_the_engine_does(family, tiny):
    """Without calibration data every calibrated method refuses and every calibration-free one runs."""
    for info in (i for i in load_all().values() if i.family == family):
        model = copy.deepcopy(tiny.model)
        if info.calibration:
            with pytest.raises(MPTError, match="calibration"):
                _runs(family, info.name, model)
        else:
            _runs(family, info.name, model)


def test_every_method_module_of_a_family_is_discovered():
    for family, registry in _registries().items():
        homes = {i.modules[0] for i in load_all().values() if i.family == family}
        decorated = {m for m in method_modules(registry.package)
                     if re.search(r"^@\w+\.register\(", Path(sys.modules[m].__file__).read_text(), re.M)}
        assert homes == decorated, family


@pytest.fixture
def probe_package(tmp_path, monkeypatch):
    """A throwaway family package `mpt_probe_family`, forgotten again afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "mpt_probe_family"
    root.mkdir()
    (root / "__init__.py").write_text(textwrap.dedent("""
        from mpt_utils.registry import Registry

        PROBES = Registry("probe method", family="probe", package=__name__, modes=("I", "II"),
                          traits={"fast": False})
    """))
    before = dict(catalogue.CATALOGUE), list(catalogue.REGISTRIES)
    yield root
    catalogue.CATALOGUE.clear()
    catalogue.CATALOGUE.update(before[0])
    catalogue.REGISTRIES[:] = before[1]
    for name in [m for m in sys.modules if m.startswith("mpt_probe_family")]:
        del sys.modules[name]


def _method_file(root, module: str, name: str, **traits) -> None:
    extra = "".join(f", {k}={v!r}" for k, v in traits.items())
    (root / f"{module}.py").write_text(textwrap.dedent(f"""
        from mpt_probe_family import PROBES


        @PROBES.register({name!r}, version=1, display={name.upper()!r}, calibration=False, mode="I"{extra})
        def {module}(model):
            return model
    """))


def test_adding_a_method_is_adding_one_file(probe_package):
    _method_file(probe_package, "alpha", "probe_alpha")
    _method_file(probe_package, "beta", "probe_beta", fast=True)
    (probe_package / "helpers.py").write_text("VALUE = 1\n")  # registers nothing: imported, harmless
    (probe_package / "_draft.py").write_text("raise RuntimeError('private modules are skipped')\n")
    from mpt_probe_family import PROBES

    assert PROBES.names() == ["probe_alpha", "probe_beta"]
    assert method_info("probe_beta").traits == {"fast": True}
    assert method_info("probe_alpha").modules == ("mpt_probe_family.alpha",)
    assert [m["name"] for m in methods("probe")] == ["probe_alpha", "probe_beta"]


def test_register_refuses_incomplete_or_unknown_traits(probe_package):
    from mpt_probe_family import PROBES

    with pytest.raises(ValueError, match="mode must be one of"):
        PROBES.register("probe_x", version=1, display="X", calibration=True)
    with pytest.raises(ValueError, match="unknown traits"):
        PROBES.register("probe_x", version=1, display="X", calibration=True, mode="I", colour="red")
    with pytest.raises(ValueError, match="display"):
        PROBES.register("probe_x", version=1, display="", calibration=True, mode="II")
    with pytest.raises(TypeError):
        PROBES.register("probe_x", version=1, display="X", mode="II")  # calibration left out


def test_random_prunenet_is_a_calibration_free_structured_method_versioned_like_the_others():
    from mpt_utils.method_versions import config_versions
    from mpt_utils.recipe import Recipe

    info = method_info("random_prunenet")
    assert info.family == "structured" and not info.calibration and info.display == "RandomPruneNet"
    assert config_versions({"method": "random_prunenet"}) == {"random_prunenet": info.version}
    step = Recipe.parse("random_prunenet@0.3").key()["steps"][0]
    assert (step["family"], step["version"]) == ("structured", info.version)


def test_readme_methods_table_lists_every_method():
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Methods\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| [^|]+ \| `([\w-]+)` \|", section, re.M))
    assert listed == {i.name for i in load_all().values()} - {"gguf-roundtrip"}  # the round trip is a check
