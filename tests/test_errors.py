import errno
import os

import pytest

from mpt_utils.data import load_text
from mpt_utils.errors import MPTError, check_ratio, cli_main
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


def test_unknown_split_and_directory_corpus(tmp_path):
    with pytest.raises(MPTError, match="unknown split 'calib'") as err:
        load_text("embedded-news", "calib")
    assert "did you mean 'calibration'?" in err.value.fix
    with pytest.raises(MPTError, match="is a directory, not a text file"):
        load_text(str(tmp_path))


def test_model_spec_must_be_a_name_or_path(tmp_path):
    with pytest.raises(MPTError, match="is not a name or path"):
        load_model(42)
    with pytest.raises(MPTError, match="does not exist"):
        load_model(tmp_path / "nothing.gguf")  # a Path works like its string


def _run_cli(exc: BaseException, capsys) -> tuple[int, list[str]]:
    @cli_main
    def entry() -> int:
        raise exc

    with pytest.raises(SystemExit) as exit_:
        entry()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_.value.code, err.strip().splitlines()


@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, "No space left on device (ENOSPC); free disk space"),
    (errno.EROFS, "Read-only file system (EROFS); choose a folder on a writable filesystem"),
    (errno.EACCES, "Permission denied (EACCES)"),
    (errno.ENOTDIR, "Not a directory (ENOTDIR)"),
    (errno.EISDIR, "Is a directory (EISDIR)"),
])
def test_filesystem_faults_are_one_line(capsys, code, words):
    exit_code, lines = _run_cli(OSError(code, os.strerror(code), "/some/path"), capsys)
    assert exit_code == 2 and len(lines) == 1
    assert lines[0].startswith("error: /some/path: ") and words in lines[0]


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    assert _run_cli(KeyboardInterrupt(), capsys) == (130, ["interrupted (Ctrl-C)"])
    assert _run_cli(KeyboardInterrupt("kept: x"), capsys) == (130, ["interrupted (Ctrl-C): kept: x"])


def test_mpt_error_still_exits_2(capsys):
    exit_code, lines = _run_cli(MPTError("bad input", "do this"), capsys)
    assert exit_code == 2 and lines == ["error: bad input", "  fix: do this"]


def test_os_error_without_errno_keeps_its_traceback():
    @cli_main
    def entry() -> None:
        raise OSError("a library's own message")

    with pytest.raises(OSError, match="library"):
        entry()
