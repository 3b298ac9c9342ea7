"""2x up/down-sampling of feature maps with a separable FIR filter, as EDM's SongUNet resamples
(NVlabs/edm ``training/networks.py``, class Conv2d; Song et al. 2021 for the [1, 3, 3, 1] filter of NCSN++)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffscore.networks.init import init_weights


def upsample_nearest(x: Tensor) -> Tensor:
    """2x nearest-neighbour upsampling [B, C, H, W] -> [B, C, 2H, 2W]. A channels-last input is upsampled as a
    broadcast of its [B, H, W, C] storage, which keeps the layout and makes the backward a 2x2 sum (the stock
    upsampling's backward is a scatter-add with atomics)."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return F.interpolate(x, scale_factor=2, mode="nearest")
    B, C, H, W = x.shape
    y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(B, H, 2, W, 2, C)  # [B, H, 2, W, 2, C]
    return y.reshape(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2)  # [B, C, 2H, 2W], channels-last


class Resample(nn.Module):
    """2x up- or down-sampling with a separable FIR filter; [1, 1] is a box filter (nearest / average pool).

    EDM's unfused resampling: down = depthwise stride-2 conv with the normalised filter f f^T / sum(f)^2 and
    padding (k - 1) // 2; up = the transposed conv with 4 times that filter, same padding."""

    def __init__(self, mode: str, resample_filter: list[int] | tuple[int, ...] = (1, 1)) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        self.mode = mode
        self.box = list(resample_filter) == [1, 1]
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f) / f.sum() ** 2  # [k, k], sums to 1
        self.register_buffer("filter", f, persistent=False)
        self.pad = (len(resample_filter) - 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.box:  # the fast path: no depthwise convolution needed
            return upsample_nearest(x) if self.mode == "up" else F.avg_pool2d(x, 2)
        C = x.shape[1]
        w = self.filter.to(x.dtype).tile(C, 1, 1, 1)  # [C, 1, k, k]
        if self.mode == "up":
            return F.conv_transpose2d(x, w * 4, groups=C, stride=2, padding=self.pad)
        return F.conv2d(x, w, groups=C, stride=2, padding=self.pad)


class ConvDown(nn.Sequential):
    """A 3x3 conv fused with 2x FIR downsampling: NCSN++'s residual input branch (``aux_residual``).

    EDM's ``Conv2d(kernel=3, down=True, fused_resample=True)``: the 3x3 conv without bias at padding
    1 + (k - 1) // 2, then the filter as a depthwise stride-2 conv without padding, then the bias. For a [1, 1]
    filter that is conv-then-average-pool; for [1, 3, 3, 1] the border pixels differ from conv-then-resample.
    Held as (conv, Resample) so the state-dict keys are "0.weight" and "0.bias", as they were when this branch
    was the plain Sequential(conv, Resample("down"))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resample_filter: list[int] | tuple[int, ...] = (1, 1),  # [1, 1] (box) or [1, 3, 3, 1] (NCSN++)
        init_mode: str = "xavier_uniform",  # init of the conv weight (the bias starts at zero)
    ) -> None:
        conv = init_weights(nn.Conv2d(in_channels, out_channels, 3, padding=1), init_mode)
        super().__init__(conv, Resample("down", resample_filter))

    def forward(self, x: Tensor) -> Tensor:
        conv, down = self[0], self[1]
        if down.box:  # no filter padding: conv (with bias) then the 2x2 average is the same function
            return F.avg_pool2d(conv(x), 2)
        h = F.conv2d(x, conv.weight, padding=1 + down.pad)  # [B, C, H + 2 pad, W + 2 pad], no bias yet
        C = h.shape[1]
        h = F.conv2d(h, down.filter.to(h.dtype).tile(C, 1, 1, 1), groups=C, stride=2)  # [B, C, H/2, W/2]
        return h + conv.bias.to(h.dtype).view(1, C, 1, 1)
