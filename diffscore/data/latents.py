"""Latent-diffusion data: images encoded once by a VAE into posterior statistics, latents drawn at load time.

As EDM2 prepares its latent datasets (Karras et al. 2024, Sec. 5 / NVlabs/edm2 dataset_tool.py ``encode``): each
image keeps the VAE encoder's diagonal Gaussian posterior q(z | x) = N(mean, std^2), stored as float32 [2C, h, w]
(the C mean channels, then the C std channels); every time the image is used a fresh z ~ q(z | x) is drawn and
scaled by the VAE's ``scaling_factor`` (Rombach et al. 2022, Sec. 4.3.2: latents of roughly unit variance; SD's
0.18215), the data the U-Net is trained on. The VAE is any module with diffusers' AutoencoderKL interface:
``vae.encode(images).latent_dist`` with ``.mean`` and ``.std``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def encode_latent_stats(vae: nn.Module, images: Tensor, batch_size: int = 16) -> Tensor:
    """Posterior statistics [N, 2C, h, w] (float32, on the images' device) of images [N, 3, H, W] in [-1, 1]:
    channels 0 .. C-1 the posterior mean, C .. 2C-1 its standard deviation."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float [N, C, H, W] in [-1, 1], got {images.dtype} {tuple(images.shape)}")
    if images.numel() and (images.min() < -1 or images.max() > 1):
        raise ValueError("images must lie in [-1, 1] (scale uint8 pixels by x / 127.5 - 1)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    param = next(vae.parameters())
    stats = []
    for batch in images.split(batch_size):
        posterior = vae.encode(batch.to(device=param.device, dtype=param.dtype)).latent_dist
        mean_std = torch.cat([posterior.mean, posterior.std], dim=1)  # [b, 2C, h, w]
        stats.append(mean_std.to(device=images.device, dtype=torch.float32))
    return torch.cat(stats)


def sample_latents(stats: Tensor, scaling_factor: float, generator: torch.Generator | None = None) -> Tensor:
    """Latents [N, C, h, w] = scaling_factor * (mean + std * n), n ~ N(0, I), from statistics [N, 2C, h, w]
    (``encode_latent_stats``); float32, on the statistics' device."""
    if stats.ndim != 4 or stats.shape[1] % 2:
        raise ValueError(f"latent statistics must be [N, 2C, h, w], got {tuple(stats.shape)}")
    if scaling_factor <= 0:
        raise ValueError(f"scaling_factor must be positive, got {scaling_factor}")
    stats = stats.to(torch.float32)
    mean, std = stats.chunk(2, dim=1)  # [N, C, h, w] each
    noise = torch.randn(mean.shape, generator=generator, device=stats.device)  # [N, C, h, w]
    return (mean + std * noise) * scaling_factor


class LatentDecoder(nn.Module):
    """Images [B, 3, H, W] (in [-1, 1], unclamped) of latents [B, C, h, w] as the U-Net sees them:
    vae.decode(latents / scaling_factor), as diffusers' StableDiffusionPipeline decodes (Rombach et al. 2022,
    Sec. 3), in chunks of ``batch_size`` latents (the VAE decoder's activations at 512 x 512 are large)."""

    def __init__(
        self,
        vae: nn.Module,  # diffusers AutoencoderKL (frozen here)
        scaling_factor: float,  # the VAE's latent scale (SD: 0.18215)
        batch_size: int = 8,  # latents per decoder call
    ) -> None:
        super().__init__()
        if scaling_factor <= 0 or batch_size < 1:
            raise ValueError(f"need scaling_factor > 0 and batch_size >= 1, got {scaling_factor}, {batch_size}")
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor, self.batch_size = float(scaling_factor), int(batch_size)

    @property
    def downsampling(self) -> int:
        """How many pixels a latent cell spans per side: 2 ^ (VAE levels - 1) (SD: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """[C, H, W] of the images of latents [C, h, w]."""
        f = self.downsampling
        return (int(self.vae.config.out_channels), latent_shape[-2] * f, latent_shape[-1] * f)

    @torch.no_grad()
    def forward(self, latents: Tensor) -> Tensor:
        param = next(self.vae.parameters())
        images = [
            self.vae.decode(chunk.to(param.dtype) / self.scaling_factor, return_dict=False)[0].float()
            for chunk in latents.split(self.batch_size)
        ]
        return torch.cat(images)  # [B, 3, H, W]
