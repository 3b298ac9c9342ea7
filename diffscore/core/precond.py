"""EDM preconditioning (Karras et al. 2022, Table 1, "Network and preconditioning")."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) for noise levels sigma, each of sigma's shape.

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sd^2 + sigma^2), c_noise = ln(sigma) / 4.
    """
    var = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = var.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, cond, aug_label) around a raw backbone F.

    The backbone never sees sigma scalings; it is called as ``backbone(x_in, c_noise, cond, aug_label)``
    with ``c_noise`` of shape [B]. The coefficients are computed in float32 whatever the backbone runs in.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.backbone = backbone  # F: the raw network
        self.sigma_data = sigma_data  # standard deviation of the data

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])  # [B]
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        bshape = (-1,) + (1,) * (x.ndim - 1)  # broadcast [B] over the data dims
        x32 = x.to(torch.float32)
        F_x = self.backbone(x32 * c_in.view(bshape), c_noise, cond, aug_label)
        denoised = c_skip.view(bshape) * x32 + c_out.view(bshape) * F_x.to(torch.float32)
        return denoised.to(x.dtype)
