"""SliceGPT: rotate the residual stream into its PCA basis and delete the least-energetic directions,
shrinking the hidden size of every weight matrix.

Reference: "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", Ashkboos,
Croci, Nascimento, Hoefler and Hensman, arXiv:2401.15024 (ICLR 2024),
github.com/microsoft/TransformerCompression (`src/slicegpt/rotate.py` `rotate_and_slice_sequential`,
`layernorm_fusion.py`, `slicing_scheduler.py`).

RMSNorm is invariant to orthogonal rotations once its scale is folded into the next linear layers,
so a block computes the same function in any basis Q. Following the paper, each block gets its own
bases, computed from calibration signals of the already-sliced model (interleaved PCA and slicing):
Q_attn from the residual entering attention, Q_mlp from the residual after attention, Q_out from the
block output. The residual connections carry the change of basis as shortcut matrices Q_aᵀQ_b, which
are the price of per-block bases (they are counted in the achieved parameter reduction). The sliced
width is int((1 − ratio)·hidden) rounded down to a multiple of `round_to` (the reference's
`round_interval`, 8 in its experiments).

LM head, as in the reference: `fuse_modules` gives the head its own copy of a tied embedding matrix
(the two need different rotations, so they are untied), the final norm's scale is folded into it and
it is rotated by the last block's output basis, but it is not sliced (`do_slice_head=False`): the last
block writes the full hidden size back and the head keeps it. `slice_head=True` slices the head too
(smaller, not the reference).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mpt_utils.calibration import LayerStats, capture_block_inputs, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.progress import progress_bar
from mpt_utils.prune.structured import STRUCTURED, model_device
from mpt_utils.prune.structured.surgery import (
    FusedRMSNorm,
    finalize,
    llama_parts,
    new_linear,
    to_sliced_layer,
)


def sliced_dim(hidden: int, ratio: float, round_to: int = 8) -> int:
    """New hidden size: int((1 - ratio)·hidden) rounded down to a multiple of `round_to` (>= round_to),
    the reference's `new_embedding_dimension`."""
    if ratio == 0:
        return hidden
    keep = int((1 - ratio) * hidden)
    return max(round_to, keep - keep % round_to) if hidden >= round_to else max(1, keep)


def pca_basis(stats: LayerStats, damp: float = 0.01) -> torch.Tensor:
    """Eigenvectors of the (damped) uncentered covariance XᵀX, by decreasing eigenvalue, float64."""
    h = stats.gram.double().cpu()
    h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    vals, vecs = torch.linalg.eigh(h)
    return vecs[:, torch.argsort(vals, descending=True)]


def _gram(xs: list[torch.Tensor]) -> LayerStats:
    st = LayerStats(xs[0].shape[-1], xs[0].device)  # accumulate where the signals live (GPU for 7B)
    for x in xs:
        st.add(x.detach())
    return st


def _set(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    dt, dev = lin.weight.dtype, lin.weight.device
    return new_linear(weight.to(dev, dt), None if bias is None else bias.to(dev, dt))


def _rotate_in(lin: nn.Linear, q: torch.Tensor, keep: int) -> nn.Linear:
    """Input side: W <- (W Q)[:, :keep], in float64 on the weight's device."""
    w = lin.weight.detach().double() @ q.to(lin.weight.device)
    return _set(lin, w[:, :keep], lin.bias)


def _rotate_out(lin: nn.Linear, q: torch.Tensor, keep: int) -> nn.Linear:
    """Output side: W <- (Qᵀ W)[:keep], b <- (Qᵀ b)[:keep]."""
    qt = q.t().to(lin.weight.device)
    w = qt @ lin.weight.detach().double()
    b = None if lin.bias is None else (qt @ lin.bias.detach().double())[:keep]
    return _set(lin, w[:keep], b)


def _linear_from(weight: torch.Tensor, like: nn.Linear) -> nn.Linear:
    return new_linear(weight.to(like.weight.device, like.weight.dtype), None)



@STRUCTURED.register("slicegpt", version=2, display="SliceGPT", calibration=True, paper_name="slicegpt",
                     sources=("mpt_utils.prune.structured.recovery",))
@torch.no_grad()
def slicegpt(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None,
             round_to: int = 8, slice_head: bool = False, damp: float = 0.01, seed: int = 0,
             device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Slice `ratio` of the hidden size after per-block PCA rotations (ratio 0: rotate only). The LM
    head keeps the full hidden size unless `slice_head=True` (the reference's default is False)."""
    layers = decoder_layers(model)
    base = getattr(model, "model", None)
    final_norm = getattr(base, "norm", None)
    if final_norm is None or not hasattr(final_norm, "weight"):
        raise MPTError(f"SliceGPT needs a final RMSNorm at model.model.norm ({type(model).__name__})",
                       "use a Llama, Qwen2 or Mistral model")
    for block in layers:
        llama_parts(block)
    dev = model_device(model, device)
    model.to(dev)
    was_training = model.training
    model.eval()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    slice_head = bool(slice_head)
    d = emb.weight.shape[1]
    d_new = sliced_dim(d, ratio, round_to)
    eps = float(getattr(layers[0].input_layernorm, "variance_epsilon", getattr(model.config, "rms_norm_eps", 1e-6)))

    n_tokens = int(calib_ids.numel())
    if n_tokens < 4 * d:  # a PCA from fewer samples than dimensions slices arbitrary directions
        warnings.warn(f"SliceGPT: {n_tokens} calibration tokens for a {d}-dim residual stream; the PCA is "
                      f"unreliable below ~{4 * d} tokens (use more or longer calibration windows)", stacklevel=2)
    inputs, kwargs = capture_block_inputs(model, calib_ids, dev)
    head_w = head.weight.detach().double() * final_norm.weight.detach().double()[None, :]
    q = pca_basis(_gram(inputs), damp)
    new_emb = nn.Embedding(emb.num_embeddings, d_new, padding_idx=emb.padding_idx, device="meta")
    new_emb.weight = nn.Parameter((emb.weight.detach().double() @ q.to(emb.weight.device))[:, :d_new]
                                  .to(dev, emb.weight.dtype))
    model.set_input_embeddings(new_emb)
    dt = inputs[0].dtype
    inputs = [(x.double() @ q[:, :d_new].to(x.device)).to(dt) for x in inputs]

    d_out = d_new
    for i in progress_bar(range(len(layers)), desc="SliceGPT", disable=not progress, leave=False):
        layer = to_sliced_layer(layers[i], d, eps)
        layers[i] = layer
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = (_rotate_in(lin, q, d_new) for lin in (attn.q_proj, attn.k_proj,
                                                                                     attn.v_proj))
        layer.attn_shortcut = _linear_from(q[:, :d_new], attn.o_proj)  # sliced basis -> original basis
        mids = [layer.attention_part(x, **kwargs) for x in inputs]
        q_mid = pca_basis(_gram(mids), damp)
        layer.attn_shortcut = _linear_from(q_mid[:, :d_new].t() @ q[:, :d_new], attn.o_proj)
        attn.o_proj = _rotate_out(attn.o_proj, q_mid, d_new)
        mlp.gate_proj, mlp.up_proj = _rotate_in(mlp.gate_proj, q_mid, d_new), _rotate_in(mlp.up_proj, q_mid, d_new)
        layer.mlp_shortcut = _linear_from(q_mid[:, :d_new], mlp.down_proj)
        del mids
        outs = [layer(x, **kwargs) for x in inputs]
        q_out = pca_basis(_gram(outs), damp)
        d_out = d if (i == len(layers) - 1 and not slice_head) else d_new
        layer.mlp_shortcut = _linear_from(q_out[:, :d_out].t() @ q_mid[:, :d_new], mlp.down_proj)
        mlp.down_proj = _rotate_out(mlp.down_proj, q_out, d_out)
        inputs = [(o.double() @ q_out[:, :d_out].to(o.device)).to(dt) for o in outs]
        q = q_out
        del outs

    new_head = new_linear((head_w @ q.to(head_w.device))[:, :d_out].to(dev, head.weight.dtype),
                          None if head.bias is None else head.bias.detach())
    model.set_output_embeddings(new_head)
    base.norm = FusedRMSNorm(d, eps)
    model.config.tie_word_embeddings = False
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_cfg.tie_word_embeddings = False
    model.train(was_training)
    record = {"mean_dim": d, "eps": eps, "embed_dim": d_new, "head_in": d_out}
    finalize(model, slicegpt=record)
    return {"hidden_size": d, "sliced_hidden": d_new, "slice_head": slice_head, "untied_head": tied,
            "calib_windows": int(calib_ids.shape[0]), "calib_tokens": n_tokens}
