"""Group normalisation (Wu & He 2018) for the U-Nets: nn.GroupNorm's parameters and function, plus a per-sample
channel shift before it and a SiLU after it, computed the fastest way the input's device and layout allow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm(nn.GroupNorm):
    """act(GroupNorm(x + shift)): nn.GroupNorm (same parameters, same function), a channels-last input kept
    channels-last.

    Three paths, one function:
    - contiguous input (the CPU quickstart): the stock kernel, then the activation.
    - channels-last on CUDA with ``fused`` (opt-in, experimental): ``group_norm_triton``, the shift, the norm and
      the SiLU in tiled Triton kernels (issue 20: the compiled step's norms ran far below memory bandwidth).
    - other channels-last input: the stock group norm views its input as [B, G, C/G * H * W], which a
      channels-last tensor is not (under torch.compile a layout copy before and after every norm, issue 10), so
      the statistics are reduced per channel over H, W and combined per group exactly, as the pooled variance of
      equal-sized parts: var_g = mean_c(var_c) + mean_c((mean_c - mean_g)^2); the normalisation is elementwise.
    Computed in float32. The output is x's dtype on the fused path, else float32 under autocast (CUDA autocast's
    policy for group norm), else x's dtype."""

    fused: bool = False  # the Triton kernels where they apply (DiffusionModule's fused_norm; experimental, off)

    def forward(self, x: Tensor, shift: Tensor | None = None, silu: bool = False) -> Tensor:
        # x [B, C, H, W] (or any shape nn.GroupNorm takes); shift [B, C] or [B, C, 1, 1]
        if x.ndim != 4 or x.is_contiguous():
            y = super().forward(x if shift is None else x + shift.reshape(*shift.shape[:2], 1, 1))
        elif self.fused and self.affine and x.is_cuda and x.is_contiguous(memory_format=torch.channels_last):
            from diffscore.networks.group_norm_triton import group_norm_act

            return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, shift, silu)
        else:
            y = self._channels_last(x if shift is None else x + shift.reshape(*shift.shape[:2], 1, 1))
        return F.silu(y) if silu else y

    def _channels_last(self, x: Tensor) -> Tensor:
        out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        B, C = x.shape[:2]
        x32 = x.float()
        var_c, mean_c = torch.var_mean(x32, dim=(2, 3), correction=0)  # [B, C] each
        var_c, mean_c = var_c.view(B, self.num_groups, -1), mean_c.view(B, self.num_groups, -1)  # [B, G, C/G]
        mean_g = mean_c.mean(2, keepdim=True)  # [B, G, 1]
        var_g = var_c.mean(2, keepdim=True) + (mean_c - mean_g).square().mean(2, keepdim=True)
        scale = torch.rsqrt(var_g + self.eps).expand(-1, -1, C // self.num_groups).reshape(B, C, 1, 1)
        mean = mean_g.expand(-1, -1, C // self.num_groups).reshape(B, C, 1, 1)
        y = (x32 - mean) * scale  # [B, C, H, W], x's layout
        if self.affine:
            y = y * self.weight.view(C, 1, 1) + self.bias.view(C, 1, 1)
        return y.to(out_dtype)


def group_norm(channels: int, eps: float = 1e-6) -> GroupNorm:
    """GroupNorm with at most 32 groups and at least 4 channels per group (EDM's choice), groups dividing C."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return GroupNorm(groups, channels, eps=eps)


def set_fused_norm(module: nn.Module, fused: bool) -> None:
    """Turn the Triton group norm on or off in every GroupNorm of ``module`` (``--model.init_args.fused_norm true``)."""
    for layer in module.modules():
        if isinstance(layer, GroupNorm):
            layer.fused = fused
