"""Size and CPU training cost of EDM2's U-Net (img64 XS and S, 1000 classes) next to diffscore's DDPM++ at 64x64.

    python bench/edm2_cost.py                 # parameters, forward GFLOP per image, CPU fwd+bwd time per image
    python bench/edm2_cost.py --steps 5 --batch 4 --threads 2

Parameters: EDM2UNet plus EDM2's logvar head (what EDM2's Precond holds); EDM2's paper lists 125M (XS) and 280M (S)
parameters for its ImageNet networks. A training step is one forward and backward pass of the loss at fp32 on the
CPU: edm2_loss through EDM2Precond(EDM2UNet, LogVarHead) for EDM2, edm_loss through EDMPrecond(UNet) for DDPM++ with
experiments/ffhq.yaml's backbone (128 channels, [1, 2, 2, 2], 4 blocks, attention at 16, dropout 0.05, augment_dim
9). The optimizer step is not timed. Median over ``--steps`` steps after one warm-up step, as wall time and as
the process's CPU time (summed over its threads; less disturbed by other processes on a shared machine).
GFLOP count 2 per multiply-add (torch.utils.flop_counter); EDM2's paper counts multiply-adds (half these).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffscore.core.losses import edm2_loss, edm_loss
from diffscore.core.precond import EDMPrecond
from diffscore.core.precond_edm2 import EDM2Precond
from diffscore.core.schedules import LogNormalSigma
from diffscore.networks import UNet
from diffscore.networks.edm2_unet import EDM2UNet
from diffscore.networks.logvar import LogVarHead

PUBLISHED_M = {"edm2-xs": 125, "edm2-s": 280}  # EDM2 paper (Karras et al. 2024), Mparams of its ImageNet networks
DDPMPP_FFHQ = dict(
    data_shape=[3, 64, 64],
    model_channels=128,
    channel_mult=[1, 2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.05,
    augment_dim=9,
)


def build(name: str) -> tuple[torch.nn.Module, dict]:
    """(denoiser, extra loss kwargs) for one configuration, in training mode."""
    if name.startswith("edm2-"):
        backbone = EDM2UNet([3, 64, 64], label_dim=1000, preset=name.removeprefix("edm2-"))
        return EDM2Precond(backbone, LogVarHead()).train(), {}
    return EDMPrecond(UNet(**DDPMPP_FFHQ)).train(), {"aug_label": torch.zeros(1, 9)}


def cond_for(name: str, batch: int) -> torch.Tensor | None:
    return torch.arange(batch) % 1000 if name.startswith("edm2-") else None


def size(name: str) -> dict:
    net, extra = build(name)
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        aug = extra.get("aug_label")
        net(torch.randn(1, 3, 64, 64), torch.ones(1), cond_for(name, 1), aug)
    params = sum(p.numel() for p in net.parameters())
    row = {"config": name, "params": params, "gflop_per_img": round(counter.get_total_flops() / 1e9, 2)}
    if name in PUBLISHED_M:
        row["published_M"] = PUBLISHED_M[name]
    return row


def step_time(name: str, batch: int, steps: int) -> dict:
    """Median seconds of one fp32 forward + backward of the loss on the CPU, per image."""
    torch.manual_seed(0)
    net, extra = build(name)
    x0 = torch.randn(batch, 3, 64, 64).clamp(-1, 1)
    cond = cond_for(name, batch)
    loss_fn = edm2_loss if name.startswith("edm2-") else edm_loss
    kwargs = {k: v.expand(batch, -1) for k, v in extra.items()}
    sigma_law = LogNormalSigma(-0.8, 1.6) if name.startswith("edm2-") else LogNormalSigma()
    wall, cpu = [], []
    for _ in range(steps + 1):
        sigma, noise = sigma_law(batch), torch.randn_like(x0)
        start, start_cpu = time.perf_counter(), time.process_time()
        loss_fn(net, x0, sigma, noise, cond, **kwargs).mean().backward()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        net.zero_grad(set_to_none=True)
    median, median_cpu = statistics.median(wall[1:]), statistics.median(cpu[1:])
    return {
        "config": name,
        "batch": batch,
        "s_per_step": round(median, 3),
        "s_per_img": round(median / batch, 3),
        "cpu_s_per_img": round(median_cpu / batch, 3),  # process CPU time (all threads): less hit by other load
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--configs", nargs="+", default=["edm2-xs", "edm2-s", "ddpmpp-ffhq-64"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        row = {**size(name), **step_time(name, args.batch, args.steps), "threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'config':<16} {'params':>13} {'paper (M)':>9} {'GFLOP/img':>9} {'wall s/img':>10} {'CPU s/img':>9}")
    for r in rows:
        paper, gflop = str(r.get("published_M", "-")), r["gflop_per_img"]
        print(
            f"{r['config']:<16} {r['params']:>13,} {paper:>9} {gflop:>9.2f} {r['s_per_img']:>10.3f} "
            f"{r['cpu_s_per_img']:>9.3f}"
        )


if __name__ == "__main__":
    main()
