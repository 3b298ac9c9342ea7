"""EDM2's uncertainty head: the learned log-variance u(sigma) of the denoising error (Karras et al. 2024,
arXiv 2312.02696, Eq. 21; the loss weighting by learned uncertainty of Kendall & Gal 2017).

It is a function of the noise level alone, kept apart from the backbone F: EDM2's ``Precond`` owns it
(``logvar_fourier``, ``logvar_linear``), sampling never runs it, and any backbone can be trained with
:func:`diffscore.core.losses.edm2_loss` by pairing it with one (``diffscore.core.precond_edm2.EDM2Precond``).
Like a backbone it sees ``c_noise`` = ln(sigma) / 4, never sigma.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffscore.networks.mp_layers import MPConv, MPFourier


class LogVarHead(nn.Module):
    """u(c_noise) = MPConv_linear(MPFourier(c_noise)) -> [B]: EDM2's ``logvar_fourier`` then ``logvar_linear``."""

    def __init__(self, logvar_channels: int = 128) -> None:  # width of the Fourier features (EDM2: 128)
        super().__init__()
        self.fourier = MPFourier(logvar_channels)
        self.linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, c_noise: Tensor) -> Tensor:
        return self.linear(self.fourier(c_noise.flatten())).squeeze(1)  # [B]
