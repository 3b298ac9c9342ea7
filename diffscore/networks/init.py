"""Weight initialisation as EDM's networks use it (xavier/kaiming, uniform/normal, scaled; zero bias)."""

from __future__ import annotations

import math

import torch
from torch import nn


def init_weights(
    module: nn.Linear | nn.Conv2d, mode: str = "xavier_uniform", scale: float = 1.0, bias_scale: float = 0.0
) -> nn.Module:
    """Re-initialise ``module.weight`` by ``mode`` times ``scale``, and its bias by the same law times
    ``bias_scale`` (0: zero bias, as DDPM++; ADM uses sqrt(1/3) for both); returns the module."""
    w = module.weight
    fan_in = w[0].numel()
    fan_out = w.shape[0] * w[0][0].numel()
    with torch.no_grad():
        if mode == "xavier_uniform":
            w.uniform_(-1, 1).mul_(math.sqrt(6 / (fan_in + fan_out)) * scale)
        elif mode == "xavier_normal":
            w.normal_().mul_(math.sqrt(2 / (fan_in + fan_out)) * scale)
        elif mode == "kaiming_uniform":
            w.uniform_(-1, 1).mul_(math.sqrt(3 / fan_in) * scale)
        elif mode == "kaiming_normal":
            w.normal_().mul_(math.sqrt(1 / fan_in) * scale)
        else:
            raise ValueError(f"unknown init mode {mode!r}")
        if module.bias is not None:
            bound = {"xavier_uniform": math.sqrt(6 / (fan_in + fan_out)), "kaiming_uniform": math.sqrt(3 / fan_in)}
            if bias_scale and mode in bound:
                module.bias.uniform_(-1, 1).mul_(bound[mode] * bias_scale)
            elif bias_scale:
                module.bias.normal_().mul_(math.sqrt(1 / fan_in) * bias_scale)
            else:
                module.bias.zero_()
    return module
