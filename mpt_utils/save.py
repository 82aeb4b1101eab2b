"""Compressed models as folders to take elsewhere: `save_compressed` and `load_compressed`.

Two layouts:
- "transformers": a plain folder (config.json + model.safetensors + tokenizer) that
  `transformers.AutoModelForCausalLM.from_pretrained` loads with no suite code. Unstructured / N:M
  pruned and fake-quantized models (weights hold their zeros and de-quantized values, so the file
  has the dense size; a real low-bit file is a GGUF, `mpt_utils.combined.export`), depth-pruned
  models (the config's layer count and per-layer lists follow the kept blocks), width-pruned models
  whose layers all kept the same widths (the config's sizes are updated), and low-rank models with
  `merge=True`.
- "suite": the suite's own folder (config.json, mpt_model.safetensors, mpt_artifact.json), read by
  `load_compressed` or `mpt_utils.models.load_model`. It keeps what a transformers config cannot
  say: factorized linears (`LowRankLinear`, so the size benefit stays), per-layer widths, FLAP's
  added biases, SliceGPT's sliced stream. Its weights file is not named model.safetensors, so plain
  `from_pretrained` fails loudly instead of building random layers.

Before anything is written, the folder's model is rebuilt on the meta device from the config it
will carry and compared tensor by tensor (names and shapes) with the weights it will hold: a model
the layout cannot describe is one MPTError, never a folder that loads wrong. The write goes to a
temporary sibling folder renamed into place, so a crash leaves no half-written artifact.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpt_utils.errors import MPTError

MANIFEST = "mpt_artifact.json"
SUITE_WEIGHTS = "mpt_model.safetensors"
LAYOUTS = ("auto", "transformers", "suite")
FORMAT_VERSION = 1
# Hooks from these packages record outputs or move devices; any other forward hook changes what the
# model computes (SmoothQuant's activation quantization) and no checkpoint stores it.
FRAMEWORK_HOOKS = ("torch", "transformers", "accelerate")
LOWRANK_NOTE = ("transformers has no factorized linear: AutoModelForCausalLM.from_pretrained cannot load "
                "this folder; load it with mpt_utils.save.load_compressed (or mpt_utils.models.load_model), or "
                "save with merge=True for a plain transformers folder of dense size")


@dataclass(frozen=True)
class SavedModel:
    """Where a compressed model was written, in which layout, and what loads it."""

    path: Path
    layout: str
    loads_with: str
    note: str = ""
    lowrank: dict[str, dict[str, Any]] = field(default_factory=dict)  # module name -> {rank, bias}


def _lowrank_layers(model: nn.Module) -> dict[str, nn.Module]:
    from mpt_utils.lowrank.factorized import LowRankLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _hook_origin(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return str(getattr(fn, "__module__", None) or type(fn).__module__)


def foreign_hooks(model: nn.Module) -> list[str]:
    """Modules carrying forward hooks that are not the frameworks' own (see FRAMEWORK_HOOKS), or whose
    own forward quantizes activations (`quantizes_activations`, e.g. LLM.int8()'s decomposed matmul)."""
    found = []
    for name, module in model.named_modules():
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        if getattr(module, "quantizes_activations", False) or \
                any(_hook_origin(h).partition(".")[0] not in FRAMEWORK_HOOKS for h in hooks):
            found.append(name or "<model>")
    return found


def _view(model: nn.Module, merge: bool) -> nn.Module:
    """A copy sharing every tensor with `model`, with a fresh config, whose low-rank layers are dense
    nn.Linear: multiplied out (`merge`) or empty on the meta device (only their shapes matter)."""
    from mpt_utils.combined.export import dense_linear
    from mpt_utils.lowrank.factorized import set_module

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    for name, layer in _lowrank_layers(view).items():
        dense = dense_linear(layer) if merge else nn.Linear(
            layer.in_features, layer.out_features, bias=layer.up.bias is not None, device="meta")
        set_module(view, name, dense)
    return view


def _structure_refusal(record: dict[str, Any]) -> MPTError:
    widths = [(s["heads"], s["kv_heads"], s["intermediate"]) for s in record.get("layers", [])]
    if record.get("slicegpt"):
        why = "SliceGPT rotated and sliced its residual stream (shortcut matrices between blocks)"
    elif len(set(widths)) > 1:
        why = (f"its layers have different widths ((heads, kv_heads, ffn) per layer: {widths}) and a "
               "transformers config holds one width for every layer")
    else:
        why = "pruning added output biases (o_proj / down_proj) that a transformers config cannot declare"
    return MPTError(f"cannot save this structured-pruned model as a plain transformers folder: {why}",
                    "save it in the suite's own format: save_compressed(model, tokenizer, out_dir, "
                    'layout="suite"), loaded by mpt_utils.save.load_compressed (or mpt_utils.models.load_model)')


def _check_per_layer_lists(config: Any) -> None:
    from mpt_utils.prune.structured.surgery import PER_LAYER_LISTS

    n = int(config.num_hidden_layers)
    for key in PER_LAYER_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) != n:
            raise MPTError(f"config.{key} has {len(values)} entries for {n} decoder layers: blocks were "
                           "removed without updating the config", "remove blocks with "
                           "mpt_utils.prune.structured.surgery.drop_blocks (or structured_prune), which keeps "
                           "the per-layer config lists in step")


def skeleton(config: Any, lowrank: dict[str, dict[str, Any]] | None = None,
             device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model a folder's config (and low-rank manifest) describes, before its weights are loaded:
    HF's class, reshaped by a recorded structure (`config.mpt_structure`), low-rank modules put in."""
    from transformers import AutoModelForCausalLM

    from mpt_utils.lowrank.factorized import LowRankLinear, set_module
    from mpt_utils.prune.structured.surgery import STRUCTURE_KEY, apply_structure

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
        record = getattr(config, STRUCTURE_KEY, None)
        if record:
            apply_structure(model, record)
        for name, spec in (lowrank or {}).items():
            dense = model.get_submodule(name)
            set_module(model, name, LowRankLinear(dense.in_features, dense.out_features, int(spec["rank"]),
                                                  bias=bool(spec["bias"]), dtype=dtype, allow_growth=True))
    return model


def _untie_if_apart(config: Any, weights: nn.Module) -> None:
    """A config that ties the LM head to the embeddings while the model holds two different matrices
    (SliceGPT keeps the full head) would save one of them: the saved config says untied instead."""
    emb, head = weights.get_input_embeddings(), weights.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and head is not None and emb is not None \
            and head.weight is not emb.weight:
        config.tie_word_embeddings = False


def _check_matches(config: Any, lowrank: dict[str, dict[str, Any]], weights: nn.Module, layout: str) -> None:
    """The layout's rebuilt model must hold exactly the tensors (names, shapes) that will be saved."""
    want = {k: tuple(v.shape) for k, v in skeleton(config, lowrank).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in weights.state_dict().items()}
    if want == have:
        return
    diff = sorted({k for k in want.keys() | have.keys() if want.get(k) != have.get(k)})
    shown = "; ".join(f"{k}: model {have.get(k, 'absent')}, rebuilt {want.get(k, 'absent')}" for k in diff[:3])
    raise MPTError(f"the {layout} layout cannot describe this model ({len(diff)} tensors differ: {shown})",
                   "fold adapters into their base layers and replace custom modules first (a LoRALinear: "
                   "its .merged()); per-layer structured shapes need layout=\"suite\"")


def _prepare(out_dir: Path) -> Path:
    """A fresh temporary folder next to `out_dir`; refuses to replace a folder that is not an artifact."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MPTError(f"{out_dir} is a file, not a folder", "pass a folder path (created if missing)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise MPTError(f"{out_dir} is not empty and holds no saved model ({MANIFEST})",
                       "pass a new or empty folder, or the folder of an earlier save_compressed to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))


def _publish(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _resolve_layout(layout: str, lowrank: dict[str, nn.Module], merge: bool) -> str:
    if layout not in LAYOUTS:
        raise MPTError(f"unknown layout {layout!r}", f"use one of {LAYOUTS}")
    if layout == "auto":
        return "suite" if lowrank and not merge else "transformers"
    if layout == "transformers" and lowrank and not merge:
        raise MPTError(f"{len(lowrank)} low-rank layers (e.g. {next(iter(lowrank))}) cannot be written as a "
                       "plain transformers folder: transformers has no factorized linear",
                       'pass merge=True (dense weights, no size benefit) or layout="suite" (factors kept)')
    return layout


@torch.no_grad()
def save_compressed(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, *, merge: bool = False,
                    layout: str = "auto", ignore_hooks: bool = False) -> SavedModel:
    """Write a compressed `model` (and `tokenizer`, unless None) into `out_dir`; `model` is unchanged.

    `layout="auto"` writes a plain transformers folder whenever the model allows it, the suite's own
    for low-rank models (their factors are the size benefit); a structured model transformers cannot
    describe (per-layer widths) is an MPTError that offers `layout="suite"`. `merge=True` multiplies
    every low-rank factor pair back into a dense weight U·V: plain transformers loads the result, but
    the file is as large as the dense model's (no size benefit; the approximation error stays).

    Forward hooks that change the computation (SmoothQuant's activation quantization) and modules
    whose forward quantizes activations (LLM.int8()) are not weights: they are refused unless
    `ignore_hooks=True`, which saves the weights alone (the reloaded model computes activations in
    full precision)."""
    out_dir = Path(out_dir)
    lowrank = _lowrank_layers(model)
    layout = _resolve_layout(layout, lowrank, merge)
    hooked = foreign_hooks(model)
    if hooked and not ignore_hooks:
        raise MPTError(f"forward hooks on {len(hooked)} modules (e.g. {hooked[0]}) change what this model "
                       "computes (activation quantization?); a checkpoint stores weights only",
                       "pass ignore_hooks=True to save the weights alone (the reloaded model then runs float "
                       "activations), or save a model compressed without activation hooks")
    from mpt_utils.prune.structured.surgery import finalize

    view = _view(model, merge)
    record = finalize(view)  # the view's config now describes its tensors (layer count, widths)
    if record and layout == "transformers":
        raise _structure_refusal(record)
    _check_per_layer_lists(view.config)
    kept = {} if merge else {n: {"rank": int(m.rank), "bias": m.up.bias is not None}
                             for n, m in lowrank.items()}
    weights = model if kept else view
    _untie_if_apart(view.config, weights)
    _check_matches(view.config, kept, weights, layout)
    if layout == "transformers":
        saved = SavedModel(out_dir, layout, "transformers.AutoModelForCausalLM.from_pretrained",
                           "dense-size file: low-rank factors were multiplied out" if lowrank else "")
    else:
        saved = SavedModel(out_dir, layout, "mpt_utils.save.load_compressed", LOWRANK_NOTE if kept else
                           "per-layer structure a transformers config cannot hold: load with "
                           "mpt_utils.save.load_compressed (or mpt_utils.models.load_model)", kept)
    tmp = _prepare(out_dir)
    try:
        _write(tmp, view, weights, tokenizer, saved)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return saved


def _write(folder: Path, view: nn.Module, weights: nn.Module, tokenizer: Any, saved: SavedModel) -> None:
    from safetensors.torch import save_model

    if saved.layout == "transformers":
        view.save_pretrained(folder)
    else:
        view.config.save_pretrained(folder)
        if getattr(view, "generation_config", None) is not None:
            view.generation_config.save_pretrained(folder)
        save_model(weights, str(folder / SUITE_WEIGHTS), metadata={"format": "pt"}, force_contiguous=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    manifest = {"format_version": FORMAT_VERSION, **{k: v for k, v in asdict(saved).items() if k != "path"}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def load_compressed(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None):
    """Load a folder written by `save_compressed` (either layout) -> LoadedModel."""
    from mpt_utils.models import LoadedModel, load_model, model_info, pick_device

    path = Path(path)
    if not (path / SUITE_WEIGHTS).exists():  # a plain transformers folder (or none): the usual loader
        return load_model(str(path), device=None if device is None else str(device), dtype=dtype)
    from safetensors.torch import load_model as load_weights
    from transformers import AutoConfig, AutoTokenizer

    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise MPTError(f"{path} has {SUITE_WEIGHTS} but no readable {MANIFEST}",
                       "save the model again with mpt_utils.save.save_compressed") from None
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise MPTError(f"{path} was written by a newer suite (format {manifest['format_version']})",
                       "update the MPT suite to load it")
    config = AutoConfig.from_pretrained(path)
    model = skeleton(config, manifest.get("lowrank") or {}, device="cpu", dtype=dtype or torch.float32)
    missing, unexpected = load_weights(model, str(path / SUITE_WEIGHTS), strict=False)
    if missing or unexpected:
        raise MPTError(f"weights in {path} do not match its config (missing {list(missing)[:3]}, "
                       f"unexpected {list(unexpected)[:3]})", "save the model again with save_compressed")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(pick_device(device)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    info = model_info(model, path.name, "local", str(path), note="compressed (suite layout)")
    return LoadedModel(model, tokenizer, info)


__all__ = ["SavedModel", "foreign_hooks", "load_compressed", "save_compressed", "skeleton"]
