"""Tokenizer metadata for an exported GGUF, so llama.cpp can load (and tokenize with) the file.

Two sources: the tokenizer.* keys of an existing GGUF (the embedded model's own file, copied
verbatim), or a transformers tokenizer read through the `gguf` package's own vocab loaders
(GPT-2 style byte-level BPE -> "gpt2", SentencePiece-converted -> "llama").
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np

from mpt_utils.errors import MPTError
from mpt_utils.quant.gguf.header import read_header

# transformers model_type -> llama.cpp pre-tokenizer name (llama.cpp rejects unknown names)
PRE_TOKENIZERS = {"qwen2": "qwen2"}


def copy_from_gguf(writer: gguf.GGUFWriter, source: str | Path, vocab_size: int) -> None:
    """Copy every tokenizer.* key of `source` into `writer`, types and bytes preserved."""
    try:
        fields = read_header(source).fields
    except MPTError as err:
        raise MPTError(f"cannot read tokenizer from {source}: {err.args[0]}",
                       "pass a valid .gguf as tokenizer_gguf") from None
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise MPTError(f"{source} has no tokenizer", "pass a GGUF that carries tokenizer.ggml.* keys")
    if len(tokens.value) != vocab_size:
        raise MPTError(f"{source} has {len(tokens.value)} tokens but the model's vocabulary is {vocab_size}",
                       "pass the tokenizer GGUF of this model family")
    for key, field in fields.items():
        if not key.startswith("tokenizer."):
            continue
        if field.type == gguf.GGUFValueType.ARRAY:  # numbers as Python scalars, strings as their raw bytes
            value = field.value.tolist() if isinstance(field.value, np.ndarray) else field.value
            writer.add_key_value(key, value, field.type, sub_type=field.item_type)
        else:
            writer.add_key_value(key, field.value, field.type)


def _vocab_from_dir(path: Path):
    errors = []
    for cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab, gguf.vocab.SentencePieceVocab):
        try:
            return cls(path)
        except (FileNotFoundError, ValueError, ImportError, KeyError, TypeError) as err:
            errors.append(f"{cls.__name__}: {err}")
    raise MPTError("the tokenizer is neither byte-level BPE nor SentencePiece: " + "; ".join(errors),
                   "pass tokenizer_gguf=<a GGUF of the same model family> to copy its tokenizer")


def write_from_hf(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, model_type: str) -> None:
    """Tokens, types, scores, merges and special ids of a transformers tokenizer; padded with
    UNUSED [PADi] tokens up to the embedding's row count, as llama.cpp's converter does."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        vocab = _vocab_from_dir(Path(tmp))
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(ttype))
        if len(tokens) > vocab_size:
            raise MPTError(f"tokenizer has {len(tokens)} tokens, more than the model's {vocab_size} embeddings",
                           "export with the tokenizer the model was trained with")
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        is_bpe = vocab.tokenizer_model == "gpt2"
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(PRE_TOKENIZERS.get(model_type, "default"))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if not is_bpe:
            writer.add_token_scores(scores)
        special = gguf.SpecialVocab(tmp, load_merges=is_bpe, n_vocab=vocab_size)
        if is_bpe and not special.merges:
            # a byte-level BPE without merges (our tiny test tokenizer) is valid; llama.cpp still wants the key
            writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.STRING)
            special.load_merges = False  # written above; stops the package warning about missing merges
        special.add_to_gguf(writer, quiet=True)
