"""Per-prompt quantities read off answer-position logits: answer probability and rank, KL, recovery."""

from __future__ import annotations

import math

import torch


def kl_to(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || Q) per row, in nats, of the next-token distributions behind two logit tensors [B, V]."""
    ref = torch.log_softmax(reference.double(), dim=-1)
    other = torch.log_softmax(logits.double(), dim=-1)
    return (ref.exp() * (ref - other)).sum(-1).clamp_min(0).float()


def answer_prob(logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Probability of each row's answer token."""
    probs = torch.softmax(logits.double(), dim=-1)
    return probs.gather(-1, answer_ids.view(-1, 1).to(probs.device)).squeeze(-1).float()


def answer_rank(logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's answer token (1 = the model's top prediction; ties count in its favour)."""
    target = logits.gather(-1, answer_ids.view(-1, 1).to(logits.device))
    return (logits > target).sum(-1) + 1


def normalized_recovery(p_patched: float, p_base: float, p_target: float, eps: float = 1e-6) -> float:
    """(p_patched − p_base) / (p_target − p_base): 0 = no change from the base run, 1 = the target
    reached. NaN when the base and target runs do not differ (nothing to recover)."""
    gap = p_target - p_base
    return (p_patched - p_base) / gap if abs(gap) > eps else math.nan


def kl_recovery(kl_patched: float, kl_base: float, eps: float = 1e-9) -> float:
    """1 − KL(dense ‖ patched) / KL(dense ‖ compressed): the share of the output divergence removed."""
    return 1.0 - kl_patched / kl_base if kl_base > eps else math.nan
