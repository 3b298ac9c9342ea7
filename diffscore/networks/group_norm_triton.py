"""Group norm with a per-sample channel shift before it and an optional SiLU after it, on channels-last CUDA
tensors: Triton kernels over [H*W, C] tiles behind one torch custom op that torch.compile keeps whole.

    y = act((x + shift - mean_g) * rstd_g * weight + bias),  rstd_g = 1 / sqrt(var_g + eps)

over the groups g of Wu & He (2018), eq. (1)-(3), with the statistics of x + shift. ``shift`` [B, C] carries
what the U-Net adds before its second norm (the preceding conv's bias plus the noise embedding's projection), so
that sum is never written out. Why (issue 20): under torch.compile the channels-last group norm became reductions
over a strided axis that ran far below the memory bandwidth and stored float32 intermediates for the backward.

Every kernel handles one [BLOCK_HW, BLOCK_C] tile of one sample and loops over nothing, so many tiles are in
flight per multiprocessor (a first design that looped over H*W in one program per group ran latency-bound at a
third of the bandwidth). The statistics are merged outside the kernels on [B, tiles, C] partials:

- forward: per tile and channel, the sum and the squared deviations from the tile's mean; merged exactly
  (Chan et al.'s pairwise update, then the pooled variance of each group's channels, as ``GroupNorm``); then
  y = act(x * scale + offset) with per-(sample, channel) scale and offset.
- backward, from x and the saved statistics (z = x_hat * weight + bias recomputed):
  dx = rstd * (dx_hat - mean_g(dx_hat) - x_hat * mean_g(dx_hat * x_hat)),  dx_hat = weight * dy * act'(z);
  one pass for the per-tile sums of dL/dz and dL/dz * x_hat (which also give the bias and weight gradients),
  one for dx and its per-tile sums (the shift's gradient).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

BLOCK_HW = 64  # rows (pixels) per tile
BLOCK_C = 64  # channels per tile
NUM_WARPS = 4


@triton.jit
def _tile(HW, C, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """(offsets [BLOCK_HW, BLOCK_C] into a [B, H*W, C] tensor, mask, channels [BLOCK_C], channel mask, offset of
    this tile's row in a [B, tiles, C] partial tensor, sample) of program (sample, channel block, row block)."""
    b, t = tl.program_id(0), tl.program_id(2)
    rows = t * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (rows < HW)[:, None] & cmask[None, :]
    offsets = b.to(tl.int64) * HW * C + rows[:, None] * C + c[None, :]
    return offsets, mask, c, cmask, (b * tl.num_programs(2) + t) * C, b


@triton.jit
def _tile_stats_kernel(
    x_ptr, shift_ptr, sum_ptr, m2_ptr, HW, C,
    HAS_SHIFT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per channel of one tile of x + shift: the sum and the sum of squared deviations from the tile's mean."""
    offsets, mask, c, cmask, part, b = _tile(HW, C, BLOCK_HW, BLOCK_C)
    xv = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        xv += tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    n = tl.minimum(HW - tl.program_id(2) * BLOCK_HW, BLOCK_HW).to(tl.float32)
    total = tl.sum(tl.where(mask, xv, 0.0), axis=0)  # [BLOCK_C]
    dev = tl.where(mask, xv - (total / n)[None, :], 0.0)
    tl.store(sum_ptr + part + c, total, mask=cmask)
    tl.store(m2_ptr + part + c, tl.sum(dev * dev, axis=0), mask=cmask)


@triton.jit
def _tile_apply_kernel(
    x_ptr, scale_ptr, offset_ptr, y_ptr, HW, C,
    SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """y = act(x * scale + offset) on one tile; scale and offset [B, C]."""
    offsets, mask, c, cmask, _part, b = _tile(HW, C, BLOCK_HW, BLOCK_C)
    scale = tl.load(scale_ptr + b * C + c, mask=cmask, other=0.0)[None, :]
    offset = tl.load(offset_ptr + b * C + c, mask=cmask, other=0.0)[None, :]
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * scale + offset
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + offsets, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _x_hat_and_dz(
    x_ptr, dy_ptr, rstd_ptr, base_ptr, w_ptr, bias_ptr, offsets, mask, bc, c, cmask, SILU: tl.constexpr
):  # fmt: skip
    """(x_hat, dL/dz (zero outside the tile), rstd, weight) of the tile at offsets (from ``_tile``; bc = b * C + c);
    x_hat = x * rstd + base, base = (shift - mean) * rstd, z = x_hat * weight + bias. Only loads: a store's
    address must not derive from a call that takes pointers, or torch.compile's analysis of the kernel counts
    every pointer as written (and copies into the parameters)."""
    rstd = tl.load(rstd_ptr + bc, mask=cmask, other=0.0)[None, :]
    base = tl.load(base_ptr + bc, mask=cmask, other=0.0)[None, :]
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    xhat = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * rstd + base
    dz = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if SILU:  # SiLU's derivative: s * (1 + z * (1 - s)), s = sigmoid(z)
        z = xhat * w + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        s = tl.sigmoid(z)
        dz = dz * s * (1.0 + z * (1.0 - s))
    return xhat, tl.where(mask, dz, 0.0), rstd, w


@triton.jit
def _tile_grad_sums_kernel(
    dy_ptr, x_ptr, rstd_ptr, base_ptr, w_ptr, bias_ptr, sum_dz_ptr, sum_dz_xhat_ptr, HW, C,
    SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per channel of one tile: the sums of dL/dz and of dL/dz * x_hat."""
    offsets, mask, c, cmask, part, b = _tile(HW, C, BLOCK_HW, BLOCK_C)
    xhat, dz, _rstd, _w = _x_hat_and_dz(
        x_ptr, dy_ptr, rstd_ptr, base_ptr, w_ptr, bias_ptr, offsets, mask, b * C + c, c, cmask, SILU
    )
    tl.store(sum_dz_ptr + part + c, tl.sum(dz, axis=0), mask=cmask)
    tl.store(sum_dz_xhat_ptr + part + c, tl.sum(dz * xhat, axis=0), mask=cmask)


@triton.jit
def _tile_grad_apply_kernel(
    dy_ptr, x_ptr, rstd_ptr, base_ptr, w_ptr, bias_ptr, k1_ptr, k2_ptr, dx_ptr, sum_dx_ptr, HW, C,
    SILU: tl.constexpr, SUM_DX: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dx = rstd * (dz * weight - k1 - x_hat * k2) on one tile (k1, k2 [B, C]: the group means of dx_hat and of
    dx_hat * x_hat), and, with SUM_DX, dx's per-channel sums."""
    offsets, mask, c, cmask, part, b = _tile(HW, C, BLOCK_HW, BLOCK_C)
    xhat, dz, rstd, w = _x_hat_and_dz(
        x_ptr, dy_ptr, rstd_ptr, base_ptr, w_ptr, bias_ptr, offsets, mask, b * C + c, c, cmask, SILU
    )
    k1 = tl.load(k1_ptr + b * C + c, mask=cmask, other=0.0)[None, :]
    k2 = tl.load(k2_ptr + b * C + c, mask=cmask, other=0.0)[None, :]
    dx = tl.where(mask, rstd * (dz * w - k1 - xhat * k2), 0.0)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if SUM_DX:
        tl.store(sum_dx_ptr + part + c, tl.sum(dx, axis=0), mask=cmask)


def _grid(x: Tensor) -> tuple[int, int, int]:
    B, C, H, W = x.shape
    return B, triton.cdiv(C, BLOCK_C), triton.cdiv(H * W, BLOCK_HW)


def _group_mean(per_channel: Tensor, groups: int) -> Tensor:
    """[B, C] -> [B, C]: each channel's value replaced by the mean over its group's channels."""
    B, C = per_channel.shape
    return per_channel.view(B, groups, C // groups).mean(2, keepdim=True).expand(B, groups, C // groups).reshape(B, C)


def merge_tile_stats(sums: Tensor, m2s: Tensor, hw: int, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd) [B, C] of each channel's group from per-tile sums and squared deviations [B, T, C] (tiles of
    BLOCK_HW rows, the last one partial): Chan et al.'s exact merge per channel, then the groups' pooled variance
    var_g = mean_c(var_c) + mean_c((mean_c - mean_g)^2) (equal-sized channels)."""
    counts = (hw - BLOCK_HW * torch.arange(sums.shape[1], device=sums.device)).clamp(max=BLOCK_HW).float()[:, None]
    mean_c = sums.sum(1) / hw  # [B, C]
    var_c = (m2s + counts * (sums / counts - mean_c[:, None]).square()).sum(1) / hw
    mean_g = _group_mean(mean_c, groups)
    var_g = _group_mean(var_c + (mean_c - mean_g).square(), groups)
    return mean_g, torch.rsqrt(var_g + eps)


@triton_op("diffscore::group_norm_act", mutates_args=())
def _group_norm_act(
    x: Tensor, shift: Tensor | None, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y like x (channels-last, x's dtype); mean (of x + shift) and rstd [B, C] float32, per
    channel its group's."""
    B, C, H, W = x.shape
    grid = _grid(x)
    sums = torch.empty(B, grid[2], C, device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(sums)
    wrap_triton(_tile_stats_kernel)[grid](
        x, x if shift is None else shift, sums, m2s, H * W, C,
        HAS_SHIFT=shift is not None, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
    )  # fmt: skip
    mean, rstd = merge_tile_stats(sums, m2s, H * W, groups, eps)
    scale = rstd * weight.float()
    offset = bias.float() + ((0.0 if shift is None else shift.float()) - mean) * scale
    y = torch.empty_like(x)
    wrap_triton(_tile_apply_kernel)[grid](
        x, scale.contiguous(), offset.contiguous(), y, H * W, C,
        SILU=silu, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
    )  # fmt: skip
    return y, mean, rstd


@triton_op("diffscore::group_norm_act_backward", mutates_args=())
def _group_norm_act_backward(
    dy: Tensor, x: Tensor, shift: Tensor | None, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
    groups: int, silu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dshift [B, C] (empty without a shift), dweight [C], dbias [C])."""
    B, C, H, W = x.shape
    grid = _grid(x)
    dy = dy.contiguous(memory_format=torch.channels_last)
    base = (((0.0 if shift is None else shift.float()) - mean) * rstd).contiguous()  # x_hat = x * rstd + base
    # per-tile sums of dz, dz * x_hat and dx [B, tiles, C]: three allocations, not views of one, as torch.compile
    # may clone a view a kernel writes into a buffer without the view's storage offset
    tile_dz, tile_dz_xhat, tile_dx = (x.new_empty(B, grid[2], C, dtype=torch.float32) for _ in range(3))
    args = (dy, x, rstd, base, weight, bias)
    wrap_triton(_tile_grad_sums_kernel)[grid](
        *args, tile_dz, tile_dz_xhat, H * W, C, SILU=silu, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS
    )
    sum_dz, sum_dz_xhat = tile_dz.sum(1), tile_dz_xhat.sum(1)  # [B, C]
    k1 = _group_mean(sum_dz * weight.float(), groups) / (H * W)  # the group mean of dx_hat
    k2 = _group_mean(sum_dz_xhat * weight.float(), groups) / (H * W)  # ... of dx_hat * x_hat
    dx = torch.empty_like(x)
    wrap_triton(_tile_grad_apply_kernel)[grid](
        *args, k1.contiguous(), k2.contiguous(), dx, tile_dx, H * W, C,
        SILU=silu, SUM_DX=shift is not None, BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
    )  # fmt: skip
    dshift = tile_dx.sum(1).to(shift.dtype) if shift is not None else tile_dx.new_empty(0)
    return dx, dshift, sum_dz_xhat.sum(0).to(weight.dtype), sum_dz.sum(0).to(bias.dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, shift, weight, bias, groups, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, shift, weight, bias, mean, rstd)
    ctx.groups, ctx.silu = groups, silu


def _backward(ctx, dy: Tensor, _dmean: Tensor, _drstd: Tensor):
    x, shift, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dshift, dweight, dbias = _group_norm_act_backward(dy, x, shift, weight, bias, mean, rstd, ctx.groups, ctx.silu)
    return dx, (dshift if shift is not None else None), dweight, dbias, None, None, None


_group_norm_act.register_autograd(_backward, setup_context=_setup_context)


def group_norm_act(
    x: Tensor,  # [B, C, H, W], channels-last, on CUDA
    groups: int,
    weight: Tensor,  # [C]
    bias: Tensor,  # [C]
    eps: float,
    shift: Tensor | None = None,  # [B, C], added to x before the statistics
    silu: bool = False,
) -> Tensor:
    """act(GroupNorm(x + shift)) in x's dtype and layout, through the Triton kernels."""
    if shift is not None:
        shift = shift.reshape(x.shape[0], x.shape[1]).contiguous()
    return _group_norm_act(x, shift, weight.contiguous(), bias.contiguous(), groups, eps, silu)[0]
