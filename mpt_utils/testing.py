"""Tiny random models and a self-contained byte-level tokenizer, for fast deterministic tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mpt_utils.models import LoadedModel, model_info

ARCHS = ("llama", "qwen2", "mistral", "gemma3_text", "opt")


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + <s>, </s>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"] = len(vocab)
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_config(arch: str = "llama", vocab_size: int = 258, hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, intermediate: int = 128):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=512)
    if arch == "opt":
        return AutoConfig.for_model("opt", **common, ffn_dim=intermediate, word_embed_proj_dim=hidden,
                                    enable_bias=True, do_layer_norm_before=True)
    extra = dict(num_key_value_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=False)
    if arch == "gemma3_text":
        extra.update(head_dim=hidden // heads, sliding_window=64, query_pre_attn_scalar=hidden // heads)
    return AutoConfig.for_model(arch, **common, **extra)


def tiny_model(arch: str = "llama", seed: int = 0, **config_overrides) -> LoadedModel:
    """A randomly initialised decoder of architecture `arch` with the tiny byte tokenizer."""
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"tiny_model supports {ARCHS}")
    torch.manual_seed(seed)
    config = tiny_config(arch, **config_overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(model, tiny_tokenizer(), model_info(model, f"tiny-{arch}", "memory"))


@dataclass(frozen=True)
class TinyLoader:
    """`tiny_model(arch, seed)` as a picklable loader: a Ray worker imports it by name and builds
    the same model as the driver (`GridBench(setup, TinyLoader())`)."""

    arch: str = "llama"
    seed: int = 0

    def __call__(self) -> LoadedModel:
        return tiny_model(self.arch, self.seed)


@dataclass(frozen=True)
class CrashOnceLoader(TinyLoader):
    """A tiny model whose process dies (`os._exit`, as the OOM killer or a preemption would end it)
    the first time any process runs block 0's first linear with pruned (zero) weights, i.e. in the
    middle of a compression, after the dense reference. `marker`: a file created by the crash, so
    exactly one process of all those sharing it crashes."""

    marker: str = ""

    def __call__(self) -> LoadedModel:
        loaded = super().__call__()
        from mpt_utils.calibration import decoder_layers, linear_layers

        first = next(iter(linear_layers(decoder_layers(loaded.model)[0]).values()))
        marker = self.marker

        def crash(module: torch.nn.Module, _args: Any, _output: Any) -> None:
            if not bool((module.weight == 0).any()):
                return
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(1)

        first.register_forward_hook(crash)
        return loaded
