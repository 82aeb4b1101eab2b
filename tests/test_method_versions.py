"""Per-method algorithm versions: the lock, the store keys they change, and option validation."""

import dataclasses
import json
from pathlib import Path

import pytest

from mpt_utils import method_versions as mv
from mpt_utils.errors import MPTError
from mpt_utils.registry import METHOD_VERSIONS
from mpt_utils.store import ResultsStore

FAMILIES = {"pruning method": {"magnitude", "wanda", "sparsegpt", "ria", "admm", "owl", "dsnot", "besa"},
            "structured pruning method": {"shortgpt", "sleb", "flap", "llm_pruner", "slicegpt", "random", "srad",
                                          "shortened_llama", "loraprune", "sheared_llama", "random_prunenet"},
            "quantizer": {"rtn", "gptq", "awq", "smoothquant", "nf4", "fp4", "llm_int8"},
            "low-rank method": {"svd", "asvd", "svd_llm", "svd_llm_v2", "flat_llm", "modegpt", "lillama", "losparse",
                                "sola"},
            "GGUF ladder step": {"gguf", "gguf-roundtrip"}}


def test_every_method_matches_the_lock():
    problems = mv.lock_problems()
    assert not problems, "\n".join(problems)


def test_every_family_declares_versions():
    versions = mv.load_all()
    for kind, names in FAMILIES.items():
        assert {n for n, v in versions.items() if v.kind == kind} == names
    assert all(isinstance(v.version, int) and v.version >= 1 for v in versions.values())


def test_changed_code_without_a_bump_is_reported():
    current = mv.current_lock()
    lock = json.loads(json.dumps(current))
    lock["sparsegpt"]["source"] = "0" * 16
    problems = mv.lock_problems(lock, current)
    assert len(problems) == 1
    assert "'sparsegpt' changed its code (mpt_utils.prune.sparsegpt) but not its version 1" in problems[0]
    assert ("bump the version in the register call and run `python -m mpt_utils.method_versions --lock`"
            in problems[0])
    lock["sparsegpt"] = dict(current["sparsegpt"], version=2)  # bumped in code, lock not rewritten
    lock.pop("wanda")
    assert mv.lock_problems(lock, current) == [
        "pruning method 'sparsegpt' is at version 1 but the lock has 2: "
        "run `python -m mpt_utils.method_versions --lock`",
        "pruning method 'wanda' (version 1) is not in the lock: run `python -m mpt_utils.method_versions --lock`"]


def test_source_hash_ignores_comments_docstrings_and_layout(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = tmp_path / "mv_probe.py"
    probe.write_text('"""Doc."""\n\ndef f(x):\n    """Say."""\n    return x + 1  # one\n')
    first = mv.source_hash(["mv_probe"])
    probe.write_text("def f(x):\n    # another comment\n    return (x +\n            1)\n")
    assert mv.source_hash(["mv_probe"]) == first
    probe.write_text("def f(x):\n    return x + 2\n")
    assert mv.source_hash(["mv_probe"]) != first


def test_lock_cli_writes_the_lock(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mv, "LOCK_PATH", tmp_path / "lock.json")
    assert mv.main(["--lock"]) == 0
    assert json.loads((tmp_path / "lock.json").read_text()) == mv.current_lock()
    assert "locked" in capsys.readouterr().out
    lock = json.loads((tmp_path / "lock.json").read_text())
    lock["rtn"]["source"] = "x"
    (tmp_path / "lock.json").write_text(json.dumps(lock))
    assert mv.main(["--check"]) == 1
    assert "'rtn' changed its code" in capsys.readouterr().out


def test_config_versions_cover_labels_and_skip_unversioned_points():
    assert mv.config_versions({"method": "dense"}) == {}
    assert mv.config_versions({"method": "wanda"}) == {"wanda": 1}
    assert mv.config_versions({"method": "owl:sparsegpt"}) == {"owl": 1, "sparsegpt": 1}
    assert mv.config_versions({"method": "svd_llm_seq", "registry_method": "svd_llm"}) == {
        "svd_llm": mv.method_version("svd_llm")}
    assert mv.config_versions({"method": "speed", "registry_method": ["asvd", "svd"]}) == {
        "asvd": mv.method_version("asvd"), "svd": 1}


def test_bumping_one_version_invalidates_only_its_points(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    calls = []

    def point(method, ratio):
        cfg = {"model": "tiny-llama", "method": method, "family": "unstructured", "ratio": ratio}
        return store.get_or_compute(cfg, lambda: calls.append((method, ratio)) or {"metric": "ppl", "value": 1.0})

    for method in ("wanda", "magnitude", "owl:sparsegpt", "owl:wanda"):
        point(method, 0.5)
    point("dense", 0.0)
    assert len(calls) == 5
    monkeypatch.setitem(METHOD_VERSIONS, "wanda", dataclasses.replace(METHOD_VERSIONS["wanda"], version=2))
    stale = store.stale()
    assert sorted(stale.method) == ["owl:wanda", "wanda"]
    assert set(stale.reason) == {"wanda version 1 -> version 2"}
    for method in ("wanda", "magnitude", "owl:sparsegpt", "owl:wanda"):
        point(method, 0.5)
    point("dense", 0.0)
    assert calls[5:] == [("wanda", 0.5), ("owl:wanda", 0.5)]
    assert len(store.drop_stale()) == 2 and store.stale().empty


# -- method options -----------------------------------------------------------------------------------
def test_misspelled_pruning_option_names_the_closest(tiny, tmp_path):
    from mpt_utils.prune import prune_model
    from mpt_utils.prune.sweep import prune_recipe

    with pytest.raises(MPTError) as err:
        prune_recipe("sparsegpt", 0.5, percdmp=0.1)
    assert err.value.message == "unknown option 'percdmp' for pruning method 'sparsegpt'"
    assert err.value.fix == "did you mean 'percdamp'? valid options: blocksize, percdamp"
    with pytest.raises(MPTError, match="did you mean 'lam'"):
        prune_recipe("owl:sparsegpt", 0.5, lamda=0.1)
    with pytest.raises(MPTError, match="unknown option 'colour'.*\n.*valid options: base, lam, m, scope"):
        prune_model(tiny.model, "owl", 0.5, stats={}, colour="red")
    with pytest.raises(MPTError, match="valid options: scope"):
        prune_model(tiny.model, "magnitude", 0.5, scpoe="row")
    prune_recipe("owl:sparsegpt", 0.5, lam=0.1, m=4, percdamp=0.05, blocksize=64)


def test_misspelled_options_of_other_families(tiny):
    from mpt_utils.lowrank import LOWRANK, prepare
    from mpt_utils.prune.structured import structured_prune
    from mpt_utils.quant import quantize

    with pytest.raises(MPTError, match="unknown option 'n_gird' for quantizer 'awq'\n.*did you mean 'n_grid'"):
        quantize(tiny.model, "awq", bits=4, calib_ids=None, stats={}, n_gird=10)
    with pytest.raises(MPTError, match="did you mean 'alpha'"):
        prepare(tiny.model, "asvd", None, alpah=0.5)
    with pytest.raises(MPTError, match=r"valid options: none \(structured pruning method 'shortgpt' takes no"):
        structured_prune(tiny.model, "shortgpt", 0.2, None, colour="red")
    assert LOWRANK.options("svd_llm") == {"damp", "layer_filter", "sequential", "update", "update_steps",
                                          "update_batch_size", "update_lr", "update_seqlen"}


def _profile_options(profile):
    path = Path(__file__).parents[1] / "mpt_utils" / "profiles" / f"{profile}.json"
    notebooks = json.loads(path.read_text())["notebooks"]
    return (notebooks.get("02_unstructured_pruning", {}).get("method_opts", {}),
            notebooks.get("03_quantization", {}).get("method_options", {}))


@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_profile_method_options_are_valid(profile):
    from mpt_utils.prune import check_method_options
    from mpt_utils.prune.sweep import parse_method
    from mpt_utils.quant import QUANTIZERS

    prune_opts, quant_opts = _profile_options(profile)
    for label, opts in prune_opts.items():
        name, base = parse_method(label)
        check_method_options(name, {**base, **opts})
    for name, opts in quant_opts.items():
        QUANTIZERS.check_options(name, opts)
    if profile == "embedded":
        assert prune_opts["admm"] == {"iters": 10, "gradual_iters": 8} and quant_opts["awq"] == {"n_grid": 10}
