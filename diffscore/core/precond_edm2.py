"""EDM2's preconditioning (Karras et al. 2024, arXiv 2312.02696; NVlabs/edm2 ``training/networks_edm2.py``,
class Precond): EDM's coefficients (Karras et al. 2022, Table 1) with sigma_data 0.5 and c_noise = ln(sigma) / 4,
plus the learned uncertainty u(sigma) of EDM2's loss (Eq. 21), returned on request.

D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, cond, aug_label); logvar = u(c_noise). The uncertainty network is
any nn.Module mapping c_noise [B] to [B] (EDM2's: ``diffscore.networks.logvar.LogVarHead``); it is handed in, so
this floor imports no network. The loss asks for it through ``forward(..., return_logvar=True)`` rather than a
second method: a DistributedDataParallel wrapper synchronises gradients only through ``forward``, which is also
why EDM2's Precond does the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffscore.core.precond import EDMPrecond, edm_coefficients


class EDM2Precond(EDMPrecond):
    """EDM's preconditioning around ``backbone`` with EDM2's uncertainty network ``logvar`` beside it."""

    def __init__(
        self,
        backbone: nn.Module,
        logvar: nn.Module | None = None,  # u: c_noise [B] -> log-variance [B] (None: no uncertainty, as EDM)
        sigma_data: float = 0.5,  # standard deviation of the data (EDM2: 0.5)
        sigma_min: float = 0.0,  # smallest supported noise level
        sigma_max: float = float("inf"),  # largest supported noise level
    ) -> None:
        super().__init__(backbone, sigma_data, sigma_min, sigma_max)
        self.logvar = logvar

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        cond: Tensor | None = None,
        aug_label: Tensor | None = None,
        return_logvar: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The denoised x; with ``return_logvar``, (denoised, logvar [B]) with logvar = u(ln(sigma) / 4)."""
        denoised = super().forward(x, sigma, cond, aug_label)
        if not return_logvar:
            return denoised
        if self.logvar is None:
            raise ValueError("EDM2Precond has no logvar network; pass logvar= (e.g. LogVarHead()) to train with it")
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])  # [B]
        c_noise = edm_coefficients(sigma, self.sigma_data)[3]  # ln(sigma) / 4, [B]
        return denoised, self.logvar(c_noise).reshape(x.shape[0]).to(torch.float32)
