"""GroupNorm's three paths (stock, channels-last torch, Triton kernels) against float64 F.group_norm."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from diffscore.lit.modules.diffusion import DiffusionModule
from diffscore.networks.group_norm import GroupNorm, group_norm, set_fused_norm
from diffscore.networks.unet import UNet

REPO = Path(__file__).resolve().parents[2]


def exact(x, groups, weight, bias, eps, shift=None, silu=False):  # float64 act(GroupNorm(x + shift))
    x = x.double() + (0 if shift is None else shift.double()[:, :, None, None])
    y = F.group_norm(x, groups, weight.double(), bias.double(), eps)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("offset", [1.0, 100.0])  # a large mean against a small spread: no cancellation
def test_group_norm_keeps_channels_last_and_is_as_accurate_as_the_stock_norm(offset):
    torch.manual_seed(0)
    norm = GroupNorm(4, 16, eps=1e-6)
    norm.weight.data.normal_(1, 0.3), norm.bias.data.normal_(0, 0.3)
    x = torch.randn(3, 16, 5, 5) * 2 + offset + torch.arange(16.0)[:, None, None] / 8  # channel means differ
    x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, dtype=torch.float64)

    def value_and_grads(fn, dtype):  # fn(x, weight, bias) and its gradients against g, in dtype
        args = [t.detach().to(dtype).requires_grad_() for t in (x, norm.weight, norm.bias)]
        out = fn(*args)
        return [out, *torch.autograd.grad(out, args, g.to(dtype))]

    ours = value_and_grads(lambda x, w, b: functional_call(norm, {"weight": w, "bias": b}, (x,)), torch.float32)
    stock = value_and_grads(lambda x, w, b: F.group_norm(x.contiguous(), 4, w, b, 1e-6), torch.float32)
    exact = value_and_grads(lambda x, w, b: F.group_norm(x, 4, w, b, 1e-6), torch.float64)
    assert ours[0].is_contiguous(memory_format=torch.channels_last) and not ours[0].is_contiguous()
    # value, d/dx, d/dweight, d/dbias as accurate as the stock float32 kernel's against float64 (a one-pass
    # E[x^2] - E[x]^2 is 100x worse at offset 100)
    for a, b, e in zip(ours, stock, exact, strict=True):
        assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-6 * e.abs().max()
    plain = GroupNorm(4, 16, eps=1e-6, affine=False)  # without weight and bias as well
    torch.testing.assert_close(plain(x), F.group_norm(x.contiguous(), 4, eps=1e-6), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 under autocast, CUDA autocast's group-norm policy
        assert norm(x.bfloat16()).dtype == torch.float32
    assert norm(x.bfloat16()).dtype == torch.bfloat16 == norm(x.bfloat16().contiguous()).dtype  # else the input's


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_shift_and_silu_are_the_same_function_on_both_cpu_paths(layout):
    torch.manual_seed(0)
    norm = group_norm(48)  # 12 groups of 4
    norm.weight.data.normal_(1, 0.3), norm.bias.data.normal_(0, 0.3)
    x = (torch.randn(2, 48, 6, 6) * 3 + 2).contiguous(memory_format=layout)
    shift = torch.randn(2, 48)
    ref = exact(x, norm.num_groups, norm.weight, norm.bias, norm.eps, shift, silu=True)
    torch.testing.assert_close(norm(x, shift, silu=True).double(), ref, rtol=1e-5, atol=1e-5)
    ref = exact(x, 12, norm.weight, norm.bias, 1e-6, shift)  # a [B, C, 1, 1] shift, no activation
    torch.testing.assert_close(norm(x, shift[:, :, None, None]).double(), ref, rtol=1e-5, atol=1e-5)


def test_set_fused_norm_reaches_every_group_norm():
    net = UNet(data_shape=[3, 8, 8], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    norms = [m for m in net.modules() if isinstance(m, GroupNorm)]
    assert len(norms) > 5 and not any(m.fused for m in norms)  # off by default (experimental)
    set_fused_norm(net, True)
    assert all(m.fused for m in norms)
    DiffusionModule(net)  # the module's option (default off) reaches them too
    assert not any(m.fused for m in norms)


def test_triton_kernels_match_float64_group_norm_under_the_interpreter():
    """The forward and backward kernels, run by Triton's CPU interpreter in a fresh process (it is chosen when
    the kernels are defined): several 64-pixel tiles and a partial one, channel counts that are not a multiple of
    the 64-channel tile, 12 channels per group (not a power of two), with and without shift and SiLU, float32 and
    bfloat16."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == len(KERNEL_CASES), proc.stdout


def test_torch_compile_sees_each_kernel_write_only_its_outputs(monkeypatch):
    """torch.compile reads which pointers a user kernel writes from its TTIR; where that analysis fails it takes
    every pointer as written, and the compiled backward copies into the weight and bias ("a leaf Variable that
    requires grad is being used in an in-place operation", as a v4 kernel did on the GPU). The analysis runs
    here for a Hopper target, without a GPU."""
    triton = pytest.importorskip("triton")
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from diffscore.networks import group_norm_triton as gnt

    class Hopper:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(driver, "_active", Hopper())
    x, bc, part, c = torch.randn(2, 64, 8, 8), torch.randn(2, 64), torch.randn(2, 1, 64), torch.randn(64)
    size = dict(HW=64, C=64, BLOCK_HW=64, BLOCK_C=64)
    stats = dict(x_ptr=x, shift_ptr=bc, sum_ptr=part, m2_ptr=part.clone(), HAS_SHIFT=True)
    apply = dict(x_ptr=x, scale_ptr=bc, offset_ptr=bc.clone(), y_ptr=x.clone(), SILU=True)
    inputs = dict(dy_ptr=x, x_ptr=x.clone(), rstd_ptr=bc, base_ptr=bc.clone(), w_ptr=c, bias_ptr=c.clone(), SILU=True)
    sums = dict(inputs, sum_dz_ptr=part, sum_dz_xhat_ptr=part.clone())
    grad = dict(inputs, k1_ptr=bc.clone(), k2_ptr=bc.clone(), dx_ptr=x.clone(), sum_dx_ptr=part.clone(), SUM_DX=True)
    for kernel, kwargs, written in [
        (gnt._tile_stats_kernel, stats, {"sum_ptr", "m2_ptr"}),
        (gnt._tile_apply_kernel, apply, {"y_ptr"}),
        (gnt._tile_grad_sums_kernel, sums, {"sum_dz_ptr", "sum_dz_xhat_ptr"}),
        (gnt._tile_grad_apply_kernel, grad, {"dx_ptr", "sum_dx_ptr"}),
    ]:
        assert isinstance(kernel, triton.runtime.jit.JITFunction)
        writes = identify_accessed_tensors(kernel, {**kwargs, **size}, {}).read_writes.writes
        assert {dep.name for dep in writes} == written, kernel.fn.__name__


KERNEL_CASES = [  # (B, C, side, groups, shift, silu, dtype)
    (2, 32, 9, 8, True, True, torch.float32),  # 81 pixels: a full 64-pixel tile and a partial one
    (3, 48, 4, 12, False, False, torch.float32),  # 48 channels: one part-filled 64-channel tile
    (2, 384, 3, 32, True, True, torch.float32),  # 12 channels per group, 6 channel tiles
    (2, 96, 11, 8, True, False, torch.bfloat16),  # bfloat16 in and out; 96 channels: 1.5 channel tiles
]


def check_kernels(device: str = "cpu") -> None:  # cpu: under TRITON_INTERPRET=1
    from diffscore.networks.group_norm_triton import group_norm_act

    for B, C, side, groups, with_shift, silu, dtype in KERNEL_CASES:
        torch.manual_seed(C)
        x = (torch.randn(B, C, side, side, device=device) * 2 + 50).to(dtype)  # a large mean: no cancellation allowed
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        shift = torch.randn(B, C, device=device, requires_grad=True) if with_shift else None
        weight, bias = (torch.randn(C, device=device, requires_grad=True) for _ in range(2))
        leaves = [x, weight, bias] + ([shift] if with_shift else [])
        dy = torch.randn(x.shape, dtype=torch.float64, device=device)
        ref = exact(x, groups, weight, bias, 1e-5, shift, silu)
        ref_grads = torch.autograd.grad(ref, leaves, dy)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the output's own rounding (2^-8)
        for compiled in [False, True] if device == "cuda" else [False]:  # compiled: as in training
            fn = torch.compile(group_norm_act, fullgraph=True) if compiled else group_norm_act
            y = fn(x, groups, weight, bias, 1e-5, shift, silu)
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
            grads = torch.autograd.grad(y, leaves, dy.to(dtype))
            for name, got, want in zip(["y", "dx", "dweight", "dbias", "dshift"], [y, *grads], [ref, *ref_grads]):
                err = ((got.double() - want).abs().max() / want.abs().max()).item()
                case = (B, C, side, groups, with_shift, silu, dtype, "compiled" if compiled else "eager")
                assert err < tol, f"{case}: {name} relative error {err:.2e}"
        print("ok", (B, C, side, groups, with_shift, silu, dtype), flush=True)


if __name__ == "__main__":
    check_kernels(*sys.argv[1:])  # python tests/networks/test_group_norm.py cuda: the same checks on a GPU
