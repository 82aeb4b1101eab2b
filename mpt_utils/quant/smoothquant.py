"""SmoothQuant: W8A8 with activation outliers migrated into the weights.

Reference: "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models",
G. Xiao, J. Lin, M. Seznec, H. Wu, J. Demouth, S. Han, arXiv:2211.10438; code
github.com/mit-han-lab/smoothquant (`smoothquant/smooth.py` `smooth_ln_fcs_llama_like`,
`smoothquant/fake_quant.py` `W8A8Linear` / `quantize_llama_like`, `smoothquant/ppl_eval.py`).

Per input channel j of the linears fed by a norm (q/k/v and gate/up in Llama-style blocks):
s_j = max|X_j|^α / max|W_j|^(1−α) (clamped to ≥ 1e-5, max|W_j| over the group's linears, ≥ 1e-5);
the norm's weight is divided by s and the weight columns are multiplied by s (an exact
equivalence). Then every decoder-block linear gets int8 symmetric per-output-channel weights and its
input activations are fake-quantized to int8 per token (dynamic absmax), as in `W8A8Linear` with
weight_quant="per_channel", act_quant="per_token" (the reference's Llama setting in `ppl_eval.py`).

The attention BMMs: with `quantize_bmm_input` (the reference's `quantize_bmm_input=True` in
`ppl_eval.py`, which produced its Llama/Mistral W8A8 numbers) the outputs of q/k/v are fake-quantized
too, with the activation scheme (int8 per token), which simulates int8 inputs of the Q·Kᵀ and P·V
matmuls (before RoPE, as the reference does). The reference's `quantize_llama_like` alone defaults it
to False; OPT's `quantize_opt` defaults to True with per-tensor activations (not reproduced here).

α: the paper uses 0.5 for OPT and BLOOM and a larger 0.75 for GLM-130B; the repository's
`examples/ppl_eval.sh` uses 0.85 for Llama-2-7B/13B and Llama-3-8B/70B, 0.9 for Llama-2-70B, 0.8 for
Mistral-7B / Mixtral, 0.6 / 0.7 for Falcon-7B / 40B. The default 0.85 is its Llama-2 setting.

max|X_j| comes from one calibration pass over the dense model with forward hooks, as in the
reference `get_act_scales` (a channel-wise maximum cannot be recovered from the engine's Gram).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.quant import GRID, QUANTIZERS
from mpt_utils.quant.awq import _fold_into_producer
from mpt_utils.quant.rtn import QuantSpec, check_bits, quantize_weight

NORM_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # OPT
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),  # Gemma 3
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("final_layer_norm", ("fc1",)),  # OPT
)


def fake_quant_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric absmax quantize–dequantize of each token (last dim) to `bits`."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / qmax
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


@torch.no_grad()
def activation_absmax(model: nn.Module, calib_ids: torch.Tensor, names: list[str],
                      device: torch.device) -> dict[str, torch.Tensor]:
    """Channel-wise max |input| of the named linears over the calibration windows."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_m, args, _o):  # returns None: never replaces the output
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            out[name] = x if name not in out else torch.maximum(out[name], x)
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        for window in calib_ids:
            model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1−α) per input channel, max|W| over all `weights` (smooth_ln_fcs)."""
    w_max = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (act_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def _act_quant_hook(bits: int):
    def pre_hook(_m, args):  # returning a tuple replaces the input: that is the point here
        return (fake_quant_per_token(args[0], bits), *args[1:])
    return pre_hook


def _output_quant_hook(bits: int):
    def hook(_m, _args, output):  # returning a value replaces the output: that is the point here
        return fake_quant_per_token(output, bits)
    return hook


BMM_INPUTS = ("q_proj", "k_proj", "v_proj")  # their outputs are the attention matmuls' inputs


# SmoothQuant quantizes activations to 8 bits too; Table 4 prints it "SmothQuant w8a8"
@QUANTIZERS.register("smoothquant", version=2, display="SmoothQuant W8A8", calibration=True,
                     paper_name="SmothQuant w8a8", sources=GRID)
@torch.no_grad()
def smoothquant(model: nn.Module, *, bits: int = 8, group_size: int | None = None, sym: bool = True,
                calib_ids: torch.Tensor | None = None, device: str | None = None, progress: bool = True,
                alpha: float = 0.85, act_bits: int = 8, quantize_bmm_input: bool = True):
    """W8A8 SmoothQuant in place: smoothing with migration strength `alpha` (0.85, the reference's
    Llama-2 setting; the paper's 0.5 for OPT/BLOOM), int8 per-channel weights, per-token int8
    activations (forward pre-hooks on every decoder-block linear) and, with `quantize_bmm_input`
    (default, as the reference's `ppl_eval.py`), int8 per-token q/k/v outputs (forward hooks)."""
    from mpt_utils.models import pick_device
    from mpt_utils.quant import QuantResult

    if calib_ids is None:
        raise MPTError("smoothquant needs calibration data", "pass calib_ids=calibration_windows(tokenizer, ...)")
    check_bits(bits, 8, 8, "smoothquant (W8A8)")
    check_bits(act_bits, 8, 8, "smoothquant activations")
    if not 0.0 <= alpha <= 1.0:
        raise MPTError(f"alpha={alpha} is outside [0, 1]",
                       "use 0.85 (the reference's Llama-2 setting) or the paper's 0.5 for OPT/BLOOM")
    if group_size not in (None, 0, -1) or not sym:
        raise MPTError("smoothquant uses symmetric per-channel int8 weights",
                       "call it with group_size=None, sym=True (the defaults)")
    spec = QuantSpec(8, None, True)
    start = time.perf_counter()
    dev = pick_device(device)
    home = next(model.parameters()).device
    model.to(dev)
    layers = decoder_layers(model)
    prefix = {id(layer): name for name, layer in model.named_modules() if any(layer is m for m in layers)}
    groups = []
    for layer in layers:
        mods = dict(layer.named_modules())
        taken: set[str] = set()
        for producer, consumers in NORM_GROUPS:
            if producer in mods and all(c in mods for c in consumers) and not taken & set(consumers):
                groups.append((f"{prefix[id(layer)]}.{producer}", [f"{prefix[id(layer)]}.{c}" for c in consumers]))
                taken |= set(consumers)
    act_max = activation_absmax(model, calib_ids, [g[1][0] for g in groups], dev)
    modules = dict(model.named_modules())
    for producer, consumers in groups:
        s = smoothing_scales(act_max[consumers[0]], [modules[c].weight.data for c in consumers], alpha)
        _fold_into_producer(modules[producer], s)
        for c in consumers:
            modules[c].weight.data.mul_(s.view(1, -1).to(modules[c].weight.dtype))
    quantized = {}
    for layer in layers:
        for name, lin in layer.named_modules():
            if isinstance(lin, nn.Linear):
                lin.weight.data = quantize_weight(lin.weight.data, spec)
                lin.register_forward_pre_hook(_act_quant_hook(act_bits))
                if quantize_bmm_input and name.endswith(BMM_INPUTS):
                    lin.register_forward_hook(_output_quant_hook(act_bits))
                quantized[f"{prefix[id(layer)]}.{name}"] = spec
    model.to(home)
    return QuantResult("smoothquant", spec, quantized, time.perf_counter() - start, act_bits=act_bits,
                       extra={"alpha": alpha, "quantize_bmm_input": quantize_bmm_input,
                              "smoothed_groups": len(groups)})
