import pytest

from mpt_utils.data import load_text
from mpt_utils.errors import MPTError, check_ratio
from mpt_utils.models import load_model


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half"])
def test_ratio_outside_range_is_a_clear_error(bad):
    with pytest.raises(MPTError, match=r"\[0, 1\)"):
        check_ratio(bad)


def test_ratio_inside_range_passes():
    assert check_ratio(0) == 0.0 and check_ratio(0.99) == 0.99


@pytest.mark.parametrize("spec", ["no-such-model", "./missing/dir", "a/b/c"])
def test_bad_model_spec(spec):
    with pytest.raises(MPTError, match="unknown model|does not exist"):
        load_model(spec)


def test_unreachable_hub_model_names_embedded_default():
    with pytest.raises(MPTError, match="smollm2-135m"):
        load_model("meta-llama/Llama-2-7b-hf")


def test_missing_and_corrupt_gguf(tmp_path):
    with pytest.raises(MPTError, match="does not exist"):
        load_model(str(tmp_path / "nothing.gguf"))
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    with pytest.raises(MPTError, match="could not load GGUF"):
        load_model(str(bad))


def test_unreachable_dataset_names_embedded_alternative():
    with pytest.raises(MPTError, match="embedded-wiki"):
        load_text("wikitext2")
    with pytest.raises(MPTError, match="embedded-news"):
        load_text("ptb")


def test_unknown_corpus():
    with pytest.raises(MPTError, match="unknown corpus"):
        load_text("no-such-corpus")
