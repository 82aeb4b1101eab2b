"""Compressed copies of a dense model, one call per setting, for diagnosing them side by side.

The dense model is never touched: each setting deep-copies it and compresses the copy with the
suite's own registered methods (quantizers of `mpt_utils.quant`, pruning methods of
`mpt_utils.prune`, low-rank methods of `mpt_utils.lowrank`). Calibration statistics of the dense
model (`collect_stats`) can be shared by every pruning and low-rank setting.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpt_utils.errors import MPTError

FAMILIES = ("quantization", "pruning", "lowrank")


@dataclass(frozen=True)
class Setting:
    """One compression setting: `family` and registered `method`, with `bits` (quantization) or
    `ratio` (sparsity / parameter reduction), `group_size` and method options."""

    family: str
    method: str
    bits: int | None = None
    ratio: float | None = None
    group_size: int | None = 128
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.family == "quantization":
            return f"{self.method.upper()} {self.bits}-bit g{self.group_size}"
        return f"{self.method} {self.ratio:.0%}"

    def config(self) -> dict[str, Any]:
        """The setting as results-store config keys."""
        return {"family": self.family, "method": self.method, "bits": self.bits, "ratio": self.ratio,
                "group_size": self.group_size if self.family == "quantization" else None,
                "options": dict(self.options)}


def quant(method: str = "rtn", bits: int = 4, group_size: int | None = 128, **options: Any) -> Setting:
    return Setting("quantization", method, bits=bits, group_size=group_size, options=options)


def prune(method: str = "wanda", sparsity: float = 0.5, **options: Any) -> Setting:
    return Setting("pruning", method, ratio=sparsity, options=options)


def lowrank(method: str = "svd_llm", ratio: float = 0.2, **options: Any) -> Setting:
    return Setting("lowrank", method, ratio=ratio, options=options)


def compressed_copy(model: nn.Module, setting: Setting, *, calib_ids: torch.Tensor | None = None,
                    stats: dict | None = None, device: str | None = None) -> nn.Module:
    """A compressed deep copy of `model` under `setting`. `calib_ids` (windows) feed calibrated
    quantizers and the ASVD search; `stats` (dense `collect_stats`) feed pruning and low rank."""
    if setting.family not in FAMILIES:
        raise MPTError(f"unknown compression family {setting.family!r}", f"use one of {FAMILIES}")
    out = copy.deepcopy(model).eval()
    if setting.family == "quantization":
        from mpt_utils.quant import quantize

        quantize(out, setting.method, bits=setting.bits, group_size=setting.group_size, calib_ids=calib_ids,
                 device=device, progress=False, **setting.options)
    elif setting.family == "pruning":
        from mpt_utils.prune import prune_model

        prune_model(out, setting.method, setting.ratio, calib_ids=calib_ids, stats=stats, device=device,
                    **setting.options)
    else:
        from mpt_utils.lowrank import prepare

        plan = prepare(out, setting.method, calib_ids, stats=stats, device=device, progress=False,
                       **setting.options)
        plan.apply(out, setting.ratio)
    return out
