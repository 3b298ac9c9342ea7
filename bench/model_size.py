"""Parameter count and forward GFLOP per image of the shipped U-Net configurations (CPU, seconds).

    python bench/model_size.py        # or: make bench

GFLOP are counted by torch.utils.flop_counter (2 x multiply-adds of convolutions, matmuls and attention).
"""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffscore.networks import ADMUNet, UNet

CONFIGS = {
    "adm-imagenet-64": dict(cls=ADMUNet, data_shape=[3, 64, 64], label_dim=1000),
    "ddpmpp-cifar10-32": dict(data_shape=[3, 32, 32], channel_mult=[2, 2, 2]),
    "ncsnpp-cifar10-32": dict(
        data_shape=[3, 32, 32],
        channel_mult=[2, 2, 2],
        embedding_type="fourier",
        channel_mult_noise=2,
        encoder_type="residual",
        resample_filter=[1, 3, 3, 1],
    ),
    "ddpmpp-ffhq-64": dict(data_shape=[3, 64, 64], channel_mult=[1, 2, 2, 2]),
    "quickstart-digits-8": dict(
        data_shape=[1, 8, 8],
        model_channels=32,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
    ),
}


def measure(name: str, kwargs: dict) -> dict:
    cls = kwargs.pop("cls", UNet)
    net = cls(**kwargs).eval()
    res, ch = net.resolution, net.in_channels
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(1, ch, res, res), torch.zeros(1))
    params = sum(p.numel() for p in net.parameters())
    return {
        "config": name,
        "params_M": round(params / 1e6, 3),
        "gflop_per_img": round(counter.get_total_flops() / 1e9, 3),
    }


def main() -> None:
    rows = [measure(name, kw) for name, kw in CONFIGS.items()]
    for row in rows:
        print(json.dumps(row))
    print(f"\n{'config':<22} {'params (M)':>11} {'GFLOP/img':>10}")
    for r in rows:
        print(f"{r['config']:<22} {r['params_M']:>11.3f} {r['gflop_per_img']:>10.3f}")


if __name__ == "__main__":
    main()
