"""The suite's LoRA adapter (recovery fine-tuning, SVD-LLM's update, RFT of the compression laws) is
peft's LoRA: same initialisation rule, same forward with the same adapters, same merged weight."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mpt_utils.prune.structured.recovery import LoRALinear


def test_lora_layer_equals_peft_forward_and_merge():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(24, 12)
    ours = LoRALinear(copy.deepcopy(base), rank=4, alpha=8, dropout=0.0)
    assert torch.count_nonzero(ours.lora_b) == 0  # B starts at zero: training starts from the base layer
    bound = 1 / 24 ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in], peft's default initialisation of A
    assert ours.lora_a.abs().max() <= bound
    wrapped = peft.get_peft_model(nn.Sequential(OrderedDict(lin=copy.deepcopy(base))),
                                  peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lin"]))
    layer = wrapped.base_model.model.lin
    with torch.no_grad():
        ours.lora_b.normal_()
        layer.lora_A["default"].weight.copy_(ours.lora_a)
        layer.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert torch.allclose(ours(x), wrapped(x), atol=1e-5)
        merged = wrapped.merge_and_unload().lin.weight
        assert torch.allclose(ours.merged().weight, merged, atol=1e-5)
