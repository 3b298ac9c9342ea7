"""The Triton group norm (+ shift, SiLU) against the memory bandwidth and against inductor's compiled group norm,
per U-Net shape, forward and backward (issue 20).

    python bench/group_norm.py --out bench/group_norm.json

GPU time per call is the sum of the CUDA kernels' own times under torch.profiler (20 calls), so host overhead
(an eager custom op's Python, a compiled function's guards) does not count: a first version of this script timed
with CUDA events around single eager calls and measured the host. Tile shapes BLOCK_HW x BLOCK_C x num_warps are
swept; "inductor" is the same act(GroupNorm(x + shift)) through ``GroupNorm``'s channels-last torch path under
torch.compile (the GPU configs' path). "GB/s" counts the bytes a step must move at least: forward x in, y out;
backward x and dy in, dx out (bf16); the ceiling is a bf16 copy's rate in the same run.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from diffscore.networks import group_norm_triton as gnt
from diffscore.networks.group_norm import GroupNorm

SHAPES = {  # (B, C, side): the DDPM++ CIFAR-10 (batch 256) and FFHQ-64 (batch 128) group norms' largest inputs
    "cifar 32x32x256": (256, 256, 32),
    "cifar 16x16x256": (256, 256, 16),
    "cifar 32x32x512": (256, 512, 32),
    "ffhq 64x64x128": (128, 128, 64),
    "ffhq 32x32x256": (128, 256, 32),
}
TILES = [(64, 64, 4), (32, 64, 4), (128, 64, 8), (64, 128, 8), (32, 32, 2)]  # BLOCK_HW, BLOCK_C, num_warps


def gpu_time(fn, calls: int = 20) -> float:
    """Seconds of CUDA kernel time per call of fn (the kernels' own times summed under the profiler)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return sum(e.self_device_time_total for e in kernels) / calls / 1e6


def row(name: str, impl: str, fwd: float, both: float, nbytes: int, copy_gbs: float) -> dict:
    bwd = both - fwd
    return {
        "shape": name, "impl": impl, "fwd_us": fwd * 1e6, "bwd_us": bwd * 1e6, "fwd_gbs": 2 * nbytes / fwd / 1e9,
        "bwd_gbs": 3 * nbytes / bwd / 1e9, "copy_gbs": copy_gbs,
    }  # fmt: skip


def case(name: str, B: int, C: int, side: int, copy_gbs: float) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(B, C, side, side, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    shift, dy = torch.randn(B, C, device="cuda"), torch.randn_like(x)
    norm = GroupNorm(32, C, eps=1e-6).cuda()
    xg, sg = x.detach().requires_grad_(), shift.detach().requires_grad_()
    nbytes = x.numel() * x.element_size()
    rows = []

    def forward(x, s):
        return norm(x, s, silu=True)

    def both(fn):
        return lambda: torch.autograd.grad(fn(xg, sg), (xg, sg, norm.weight, norm.bias), dy)

    norm.fused = True
    for block_hw, block_c, warps in TILES:
        gnt.BLOCK_HW, gnt.BLOCK_C, gnt.NUM_WARPS = block_hw, block_c, warps
        fwd = gpu_time(lambda: forward(x, shift))
        rows.append(row(name, f"triton {block_hw}x{block_c}x{warps}", fwd, gpu_time(both(forward)), nbytes, copy_gbs))
    norm.fused = False
    torch._dynamo.reset()  # two compiles per shape (with and without grad): stay inside dynamo's recompile limit
    compiled = torch.compile(forward)
    fwd = gpu_time(lambda: compiled(x, shift))
    rows.append(row(name, "inductor", fwd, gpu_time(both(compiled)), nbytes, copy_gbs))
    return rows


def copy_rate() -> float:
    """GB/s (read + write) of cloning a 2 GiB bf16 tensor."""
    big = torch.empty(2**30, device="cuda", dtype=torch.bfloat16)
    return 2 * big.numel() * 2 / gpu_time(big.clone, calls=5) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    copy_gbs = copy_rate()
    rows = []
    for name in args.shapes:
        for r in case(name, *SHAPES[name], copy_gbs):
            rows.append({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nbf16 copy: {copy_gbs:.0f} GB/s")
    print(f"{'shape':<18}{'impl':<20}{'fwd us':>8}{'GB/s':>7}{'bwd us':>8}{'GB/s':>7}")
    for r in rows:
        print(
            f"{r['shape']:<18}{r['impl']:<20}{r['fwd_us']:>8.0f}{r['fwd_gbs']:>7.0f}{r['bwd_us']:>8.0f}{r['bwd_gbs']:>7.0f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
