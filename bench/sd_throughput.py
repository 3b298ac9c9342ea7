"""Memory and speed of Stable Diffusion 2 base in diffscore: the fine-tuning step and sampling, on one GPU.

    python bench/sd_throughput.py --out bench/sd_throughput_h100.jsonl          # batch 8/16/32, +/- checkpointing
    python bench/sd_throughput.py --tiny --device cpu --batches 2 --steps 2      # smoke test (CPU, tiny networks)
    python bench/sd_throughput.py --device cpu --parts sample --batches 1 --steps 1 --warmup 0   # SD 2 shapes, CPU

The networks have SD 2 base's shapes (diffusers' UNet2DConditionModel: 320/640/1280/1280 channels, linear
cross-attention on 1024-d text; OpenCLIP ViT-H/14's text tower as a 23-layer CLIPTextModel; the 8x AutoencoderKL)
with random weights: timing does not depend on the weights. What is timed, after ``--warmup`` untimed steps:
- train: StableDiffusionModule's step without Lightning: 77 random token ids -> frozen text encoder (no grad) ->
  diffscore.core.discrete_ddpm.ddpm_loss of DiscreteDDPMPrecond(StableDiffusionUNet) at uniform timesteps on
  4 x 64 x 64 latents -> backward -> AdamW (fused on CUDA), in bf16 autocast (trainer.precision bf16-mixed), with
  and without the U-Net's gradient checkpointing;
- sample: one guided Euler step (2 U-Net evaluations: conditional and unconditional, bf16 autocast, no grad), and
  the VAE decode of the final latents to 512 x 512 images; img/s of DDIM 250 with guidance (500 evaluations +
  1 decode) follow from them and are printed.
Each line: {"what", "batch", "checkpointing", "img_per_s" (or "evals_per_s"), "peak_gib"}; peak_gib is
torch.cuda.max_memory_allocated over the timed steps (CPU: null).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

UNET_SD2_BASE = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    norm_num_groups=32,
)
TEXT_SD2 = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)  # fmt: skip
VAE_SD = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)  # fmt: skip


def networks(tiny: bool, device: str):
    """(denoiser, text encoder, vae, token length) of SD 2 base's shapes (``tiny``: tests/sd_files.py's)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffscore.core.discrete_ddpm import DiscreteDDPMPrecond
    from diffscore.networks.sd_unet import StableDiffusionUNet

    if tiny:
        from tests.sd_files import MAX_TOKENS, tiny_text_encoder, tiny_unet, tiny_vae

        unet, text, vae, tokens = tiny_unet(), tiny_text_encoder(64), tiny_vae(), MAX_TOKENS
    else:
        unet, vae, tokens = UNet2DConditionModel(**UNET_SD2_BASE), AutoencoderKL(**VAE_SD), 77
        text = CLIPTextModel(CLIPTextConfig(**TEXT_SD2))
    backbone = StableDiffusionUNet(unet, text, tokenizer=None)
    schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    denoiser = DiscreteDDPMPrecond(backbone, **schedule).to(device)
    return denoiser, text.to(device), vae.to(device).eval().requires_grad_(False), tokens


def timed(fn, steps: int, warmup: int, device: str) -> tuple[float, float | None]:
    """(seconds per call, peak GiB) of ``fn`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return (time.perf_counter() - t0) / steps, peak


def bench_train(denoiser, text, tokens: int, batch: int, checkpointing: bool, args) -> dict:
    from diffscore.core.discrete_ddpm import UniformTimesteps, ddpm_loss

    unet = denoiser.backbone.unet.train()
    unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
    cuda = args.device.startswith("cuda")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2, fused=cuda)
    law = UniformTimesteps(denoiser.sigmas)
    shape = (batch, *denoiser.backbone.data_shape)

    def step() -> None:
        ids = torch.randint(text.config.vocab_size, (batch, tokens), device=args.device)
        x0, noise = torch.randn(shape, device=args.device), torch.randn(shape, device=args.device)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
            with torch.no_grad():
                cond = text(ids)[0]  # [B, L, D], frozen
            loss = ddpm_loss(denoiser, x0, law(batch, device=args.device), noise, cond).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, peak = timed(step, args.steps, args.warmup, args.device)
    return {"what": "train", "batch": batch, "checkpointing": checkpointing, "img_per_s": batch / seconds,
            "peak_gib": peak}  # fmt: skip


@torch.no_grad()
def bench_sample(denoiser, text, vae, tokens: int, batch: int, args) -> list[dict]:
    from diffscore.core.guidance import guided_denoiser
    from diffscore.data.latents import LatentDecoder

    denoiser.eval()
    cuda = args.device.startswith("cuda")
    shape = (batch, *denoiser.backbone.data_shape)
    ids = torch.randint(text.config.vocab_size, (batch, tokens), device=args.device)
    null = torch.zeros_like(ids)
    guided = guided_denoiser(denoiser, 4.0, uncond=text(null)[0])
    cond = text(ids)[0]
    sigma = torch.full((batch,), 1.0, device=args.device)
    x = torch.randn(shape, device=args.device)

    def euler_step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
            guided(x, sigma, cond)

    decoder = LatentDecoder(vae, 0.18215, batch_size=batch)
    step_s, step_peak = timed(euler_step, args.steps, args.warmup, args.device)
    decode_s, decode_peak = timed(lambda: decoder(x), max(1, args.steps // 2), min(1, args.warmup), args.device)
    ddim250 = batch / (250 * step_s + decode_s)
    print(f"  sample batch {batch}: DDIM 250 with guidance 4 -> {ddim250:.3g} img/s", flush=True)
    return [
        {"what": "sample_guided_step", "batch": batch, "evals_per_s": 2 * batch / step_s, "peak_gib": step_peak},
        {"what": "vae_decode", "batch": batch, "img_per_s": batch / decode_s, "peak_gib": decode_peak},
        {"what": "sample_ddim250_guided", "batch": batch, "img_per_s": ddim250},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tests/sd_files.py's tiny networks (a CPU smoke test)")
    ap.add_argument("--parts", nargs="+", choices=("train", "sample"), default=["train", "sample"])
    ap.add_argument("--out", default=None, help="append the results here as JSON lines")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    denoiser, text, vae, tokens = networks(args.tiny, args.device)
    rows = []
    for batch in args.batches:
        for checkpointing in (False, True) if "train" in args.parts else ():
            try:
                rows.append(bench_train(denoiser, text, tokens, batch, checkpointing, args))
            except torch.OutOfMemoryError:
                rows.append({"what": "train", "batch": batch, "checkpointing": checkpointing, "oom": True})
            torch.cuda.empty_cache() if args.device.startswith("cuda") else None
            print(json.dumps(rows[-1]), flush=True)
        if "sample" in args.parts:
            rows += bench_sample(denoiser, text, vae, tokens, batch, args)
            for row in rows[-3:]:
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps({**r, "device": device_name(args.device), "tiny": args.tiny}) + "\n" for r in rows)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


if __name__ == "__main__":
    main()
