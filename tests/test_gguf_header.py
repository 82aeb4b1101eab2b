"""The fast GGUF header reader equals gguf.GGUFReader on real files and fails clearly on damaged ones."""

import gguf
import pytest

from mpt_utils.errors import MPTError
from mpt_utils.quant.gguf import export_gguf, read_gguf
from mpt_utils.quant.gguf.export import _Writer
from mpt_utils.quant.gguf.header import read_header
from mpt_utils.quant.gguf.tokenizer import copy_from_gguf
from mpt_utils.testing import tiny_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    loaded = tiny_model("llama")
    return loaded, export_gguf(loaded.model, loaded.tokenizer, tmp_path_factory.mktemp("hdr") / "f16.gguf",
                               dtype="f16")


def _reference(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: (f.types[0], f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset) - reader.data_offset,
                int(t.n_bytes)) for t in reader.tensors]
    return fields, tensors, reader.data_offset


def test_header_equals_the_gguf_package_reader(exported):
    _, path = exported
    fields, tensors, data_offset = _reference(path)
    header = read_header(path)
    assert {k: (f.type, f.contents()) for k, f in header.fields.items()} == fields
    assert [(t.name, t.shape, t.ggml_type, t.offset, t.n_bytes) for t in header.tensors] == tensors
    assert header.data_offset == data_offset and len(fields["tokenizer.ggml.tokens"][1]) > 200


def test_copied_tokenizer_keys_are_the_source_bytes(exported, tmp_path):
    loaded, path = exported
    out = tmp_path / "copy.gguf"
    writer = _Writer(str(out), "llama")  # the tiny tokenizer has an empty merges array
    copy_from_gguf(writer, path, loaded.model.config.vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    source, copied = _reference(path)[0], _reference(out)[0]
    assert {k: v for k, v in source.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in copied.items() if k.startswith("tokenizer.")}
    with pytest.raises(MPTError, match="tokens but the model's vocabulary"):
        copy_from_gguf(gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama"), path, 7)


def test_damaged_files_raise_one_clear_error(exported, tmp_path):
    _, path = exported
    data = path.read_bytes()
    header = read_header(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: header.data_offset // 2])  # inside the metadata
    with pytest.raises(MPTError, match="not a readable GGUF"):
        read_header(cut)
    cut.write_bytes(data[: header.data_offset + 16])  # the header is whole, the tensors are not
    with pytest.raises(MPTError, match="truncated"):
        read_gguf(cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(MPTError, match="no GGUF magic"):
        read_header(bad)
    with pytest.raises(MPTError, match="does not exist"):
        read_header(tmp_path / "missing.gguf")
