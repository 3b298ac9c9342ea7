"""The Triton group norm (+ shift, SiLU) against the memory bandwidth and against inductor's compiled group norm,
per U-Net shape, forward and backward (issue 20).

    python bench/group_norm.py --out bench/group_norm.json

Times each kernel with CUDA events (median of 20 after a warm-up) for tile shapes BLOCK_HW x num_warps, and the
same act(GroupNorm(x + shift)) as ``GroupNorm``'s channels-last torch path under torch.compile (what the GPU
configs ran before). "GB/s" counts the bytes a kernel must move at least: forward x in, y out; backward x and dy
in, dx out (bf16); the ceiling is a bf16 copy's rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from diffscore.networks import group_norm_triton as gnt
from diffscore.networks.group_norm import GroupNorm

SHAPES = {  # (B, C, side): the DDPM++ CIFAR-10 (batch 256) and FFHQ-64 (batch 128) group norms' largest inputs
    "cifar 32x32x256": (256, 256, 32),
    "cifar 16x16x256": (256, 256, 16),
    "cifar 32x32x512": (256, 512, 32),
    "ffhq 64x64x128": (128, 128, 64),
    "ffhq 32x32x256": (128, 256, 32),
}
TILES = [(32, 4), (64, 4), (64, 8), (128, 8)]


def cuda_time(fn, repeats: int = 20) -> float:
    """Median seconds of fn() over repeats, CUDA events."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def case(name: str, B: int, C: int, side: int, copy_gbs: float) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(B, C, side, side, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    shift, dy = torch.randn(B, C, device="cuda"), torch.randn_like(x)
    norm = GroupNorm(32, C, eps=1e-6).cuda()
    weight, bias = norm.weight.detach(), norm.bias.detach()
    nbytes = x.numel() * x.element_size()
    rows = []
    for block_hw, warps in TILES:
        gnt.BLOCK_HW, gnt.NUM_WARPS = block_hw, warps
        _, mean, rstd = gnt._group_norm_act(x, shift, weight, bias, 32, 1e-6, True)
        fwd = cuda_time(lambda: gnt._group_norm_act(x, shift, weight, bias, 32, 1e-6, True))
        stats = (mean, rstd)
        bwd = cuda_time(lambda s=stats: gnt._group_norm_act_backward(dy, x, shift, weight, bias, *s, 32, True))
        rows.append(
            {"shape": name, "impl": f"triton {block_hw}x{warps}", "fwd_us": fwd * 1e6, "bwd_us": bwd * 1e6,
             "fwd_gbs": 2 * nbytes / fwd / 1e9, "bwd_gbs": 3 * nbytes / bwd / 1e9, "copy_gbs": copy_gbs}
        )  # fmt: skip
    norm.fused = False
    compiled = torch.compile(lambda x, s: norm(x, s, silu=True))
    xg, sg = x.detach().requires_grad_(), shift.detach().requires_grad_()
    fwd = cuda_time(lambda: compiled(x, shift))
    out = compiled(xg, sg)
    both = cuda_time(lambda: torch.autograd.grad(compiled(xg, sg), (xg, sg), dy))
    rows.append(
        {"shape": name, "impl": "inductor", "fwd_us": fwd * 1e6, "bwd_us": (both - fwd) * 1e6,
         "fwd_gbs": 2 * nbytes / fwd / 1e9, "bwd_gbs": 3 * nbytes / (both - fwd) / 1e9, "copy_gbs": copy_gbs}
    )  # fmt: skip
    del out
    return rows


def copy_rate() -> float:
    """GB/s (read + write) of cloning a 2 GiB bf16 tensor."""
    big = torch.empty(2**30, device="cuda", dtype=torch.bfloat16)
    return 2 * big.numel() * 2 / cuda_time(big.clone) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    copy_gbs = copy_rate()
    rows = []
    for name in args.shapes:
        for row in case(name, *SHAPES[name], copy_gbs):
            rows.append({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\\nbf16 copy: {copy_gbs:.0f} GB/s")
    print(f"{'shape':<18}{'impl':<16}{'fwd us':>8}{'GB/s':>7}{'bwd us':>8}{'GB/s':>7}")
    for r in rows:
        print(
            f"{r['shape']:<18}{r['impl']:<16}{r['fwd_us']:>8.0f}{r['fwd_gbs']:>7.0f}{r['bwd_us']:>8.0f}{r['bwd_gbs']:>7.0f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
