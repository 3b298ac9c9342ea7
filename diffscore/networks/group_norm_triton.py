"""Group norm with a per-sample channel shift before it and an optional SiLU after it, on channels-last CUDA
tensors: two Triton kernels (forward, backward) behind one torch custom op that torch.compile keeps whole.

    y = act((x + shift - mean_g) * rstd_g * weight + bias),  rstd_g = 1 / sqrt(var_g + eps)

over the groups g of Wu & He (2018), eq. (1)-(3), with the statistics of x + shift. ``shift`` [B, C] carries
what the U-Net adds before its second norm (the preceding conv's bias plus the noise embedding's projection), so
that sum is never written out. Why (issue 20): under torch.compile the channels-last group norm became reductions
over a strided axis that ran at a fifth of the memory bandwidth and stored float32 intermediates for the backward.

One program normalises ``GPB`` whole groups of one sample: it reads its [H*W, GPB*C/G] slice of x once for the
statistics (per channel, merged chunk by chunk with Chan et al.'s parallel update, then pooled per group as in
``GroupNorm``) and once more to write y. The backward recomputes z = x_hat * weight + bias from the saved
statistics (nothing but x and two [B, C] vectors is kept) and applies the group norm's gradient,

    dx = rstd * (dx_hat - mean_g(dx_hat) - x_hat * mean_g(dx_hat * x_hat)),  dx_hat = weight * dy * act'(z),

with the per-channel sums of dy * act'(z) and of that times x_hat giving the bias and weight gradients (summed
over the batch outside the kernel) and the per-channel sums of dx the shift's gradient.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton


@triton.jit
def _slice_index(HW, C, CPG, GPB, BLOCK_C: tl.constexpr):
    """(sample, first element of its [H*W, C] slab, channels [BLOCK_C], channel mask, group id per lane)."""
    b = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_C)
    c = tl.program_id(1) * GPB * CPG + lanes
    cmask = (lanes < GPB * CPG) & (c < C)
    return b, b.to(tl.int64) * HW * C, c, cmask, lanes // CPG


@triton.jit
def _group_sum(values, gid):
    """Per lane, the sum of ``values`` over the lanes of its group: [BLOCK_C] -> [BLOCK_C]."""
    same = gid[:, None] == gid[None, :]  # [BLOCK_C, BLOCK_C]
    return tl.sum(tl.where(same, values[None, :], 0.0), axis=1)


@triton.jit
def _act_grad(dy, z, SILU: tl.constexpr):
    """dy * act'(z): SiLU's derivative s * (1 + z * (1 - s)), s = sigmoid(z); the identity's is 1."""
    if SILU:
        s = tl.sigmoid(z)
        dy = dy * s * (1.0 + z * (1.0 - s))
    return dy


@triton.jit
def _group_norm_act_fwd_kernel(
    x_ptr, shift_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,  # x, y [B, H*W, C] (channels-last); rest per C
    HW, C, CPG, GPB, eps,
    HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    b, base, c, cmask, gid = _slice_index(HW, C, CPG, GPB, BLOCK_C)
    rows = tl.arange(0, BLOCK_HW)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    # Welford's update per (row lane, channel), no reduction inside the loop; the lanes merged after it (Chan)
    count = tl.zeros([BLOCK_HW, 1], dtype=tl.float32)
    mean = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)  # sum of squared deviations from mean
    for start in tl.range(0, HW, BLOCK_HW, num_stages=NUM_STAGES):
        rmask = ((start + rows) < HW)[:, None]
        m = rmask & cmask[None, :]
        offsets = base + (start + rows)[:, None] * C + c[None, :]
        xv = tl.load(x_ptr + offsets, mask=m, other=0.0).to(tl.float32) + shift[None, :]
        count += rmask.to(tl.float32)
        delta = tl.where(m, xv - mean, 0.0)
        mean += delta * (1.0 / tl.maximum(count, 1.0))
        m2 += delta * tl.where(m, xv - mean, 0.0)
    mean_c = tl.sum(mean * count, axis=0) / HW  # [BLOCK_C]
    dev = mean - mean_c[None, :]
    m2_c = tl.sum(m2 + count * dev * dev, axis=0)
    mean_g = _group_sum(mean_c, gid) / CPG
    dev_c = mean_c - mean_g
    rstd = tl.rsqrt(_group_sum(m2_c + HW * dev_c * dev_c, gid) / (HW * CPG) + eps)
    tl.store(mean_ptr + b * C + c, mean_g, mask=cmask)
    tl.store(rstd_ptr + b * C + c, rstd, mask=cmask)
    scale = rstd * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    offset = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32) + (shift - mean_g) * scale
    for start in tl.range(0, HW, BLOCK_HW, num_stages=NUM_STAGES):
        m = ((start + rows) < HW)[:, None] & cmask[None, :]
        offsets = base + (start + rows)[:, None] * C + c[None, :]
        z = tl.load(x_ptr + offsets, mask=m, other=0.0).to(tl.float32) * scale[None, :] + offset[None, :]
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(y_ptr + offsets, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _x_hat_and_dz(x_ptr, dy_ptr, offsets, m, shift, mean, rstd, w, bias, SILU: tl.constexpr):
    """(x_hat, dL/dz) of one [BLOCK_HW, BLOCK_C] tile, zero outside the mask m."""
    xhat = (tl.load(x_ptr + offsets, mask=m, other=0.0).to(tl.float32) + shift - mean) * rstd
    dy = tl.load(dy_ptr + offsets, mask=m, other=0.0).to(tl.float32)
    return xhat, tl.where(m, _act_grad(dy, xhat * w + bias, SILU), 0.0)


@triton.jit
def _group_norm_act_bwd_kernel(
    dy_ptr, x_ptr, shift_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,  # dy, x [B, H*W, C]; mean, rstd [B, C]
    dx_ptr, dshift_ptr, dw_ptr, db_ptr,  # dx [B, H*W, C]; the others [B, C] (summed over B outside)
    HW, C, CPG, GPB,
    HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    b, base, c, cmask, gid = _slice_index(HW, C, CPG, GPB, BLOCK_C)
    rows = tl.arange(0, BLOCK_HW)
    shift = tl.zeros([1, BLOCK_C], dtype=tl.float32)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    mean = tl.load(mean_ptr + b * C + c, mask=cmask, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + b * C + c, mask=cmask, other=0.0)[None, :]
    w_c = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    w = w_c[None, :]
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc_dz = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)  # sums over H*W of dL/dz, reduced after the loop
    acc_dz_xhat = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)  # ... of dL/dz * x_hat
    for start in tl.range(0, HW, BLOCK_HW, num_stages=NUM_STAGES):
        m = ((start + rows) < HW)[:, None] & cmask[None, :]
        offsets = base + (start + rows)[:, None] * C + c[None, :]
        xhat, dz = _x_hat_and_dz(x_ptr, dy_ptr, offsets, m, shift, mean, rstd, w, bias, SILU)
        acc_dz += dz
        acc_dz_xhat += dz * xhat
    sum_dz, sum_dz_xhat = tl.sum(acc_dz, axis=0), tl.sum(acc_dz_xhat, axis=0)  # [BLOCK_C]
    n = HW * CPG
    mean_dxhat = (_group_sum(sum_dz * w_c, gid) / n)[None, :]
    mean_dxhat_xhat = (_group_sum(sum_dz_xhat * w_c, gid) / n)[None, :]
    acc_dx = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for start in tl.range(0, HW, BLOCK_HW, num_stages=NUM_STAGES):
        m = ((start + rows) < HW)[:, None] & cmask[None, :]
        offsets = base + (start + rows)[:, None] * C + c[None, :]
        xhat, dz = _x_hat_and_dz(x_ptr, dy_ptr, offsets, m, shift, mean, rstd, w, bias, SILU)
        dx = tl.where(m, rstd * (dz * w - mean_dxhat - xhat * mean_dxhat_xhat), 0.0)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=m)
        acc_dx += dx
    tl.store(dw_ptr + b * C + c, sum_dz_xhat, mask=cmask)
    tl.store(db_ptr + b * C + c, sum_dz, mask=cmask)
    if HAS_SHIFT:
        tl.store(dshift_ptr + b * C + c, tl.sum(acc_dx, axis=0), mask=cmask)


def launch_shape(batch: int, channels: int, groups: int) -> tuple[tuple[int, int], int, int]:
    """(grid, groups per program, BLOCK_C): whole groups per program, at most 64 lanes, enough programs to fill the
    GPU (>= ~4 per multiprocessor) where narrower programs allow it."""
    cpg = channels // groups
    block_c = 64
    while block_c > 16 and block_c // 2 >= cpg and batch * triton.cdiv(channels, block_c) < 512:
        block_c //= 2
    block_c = max(block_c, triton.next_power_of_2(cpg))
    gpb = max(1, block_c // cpg)
    return (batch, triton.cdiv(groups, gpb)), gpb, block_c


BLOCK_HW = 64
NUM_WARPS = 8
NUM_STAGES = 3  # tiles of x (and dy) loaded ahead inside the H*W loops


@triton_op("diffscore::group_norm_act", mutates_args=())
def _group_norm_act(
    x: Tensor,
    shift: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    groups: int,
    eps: float,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y like x (channels-last, x's dtype); mean and rstd [B, C] float32 (per channel, its
    group's)."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(B, C, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    grid, gpb, block_c = launch_shape(B, C, groups)
    wrap_triton(_group_norm_act_fwd_kernel)[grid](
        x, x if shift is None else shift, weight, bias, y, mean, rstd,
        H * W, C, C // groups, gpb, eps,
        HAS_SHIFT=shift is not None, SILU=silu,
        BLOCK_HW=BLOCK_HW, BLOCK_C=block_c, NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS,
    )  # fmt: skip
    return y, mean, rstd


@triton_op("diffscore::group_norm_act_backward", mutates_args=())
def _group_norm_act_backward(
    dy: Tensor, x: Tensor, shift: Tensor | None, weight: Tensor,
    bias: Tensor, mean: Tensor, rstd: Tensor,
    groups: int, silu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dshift [B, C] (empty without a shift), dweight [C], dbias [C])."""
    B, C, H, W = x.shape
    dy = dy.contiguous(memory_format=torch.channels_last)
    dx = torch.empty_like(x)
    partial = torch.empty(3, B, C, device=x.device, dtype=torch.float32)  # dweight, dbias, dshift per sample
    grid, gpb, block_c = launch_shape(B, C, groups)
    wrap_triton(_group_norm_act_bwd_kernel)[grid](
        dy, x, x if shift is None else shift, weight, bias, mean, rstd,
        dx, partial[2], partial[0], partial[1],
        H * W, C, C // groups, gpb,
        HAS_SHIFT=shift is not None, SILU=silu,
        BLOCK_HW=BLOCK_HW, BLOCK_C=block_c, NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS,
    )  # fmt: skip
    dshift = partial[2].to(shift.dtype) if shift is not None else partial.new_empty(0)
    return dx, dshift, partial[0].sum(0).to(weight.dtype), partial[1].sum(0).to(bias.dtype)


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
