"""Preconditionings of Karras et al. 2022, Table 1 ("Network and preconditioning"): VP, VE, iDDPM and EDM.

Each wraps a raw backbone F as D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, cond, aug_label). The backbone
never sees sigma scalings: it is called as ``backbone(x_in, c_noise, cond, aug_label)`` with ``c_noise`` [B].
The coefficients are pure functions of sigma, computed in float32 whatever the backbone runs in (as EDM does).
Every preconditioning exposes the noise range it supports (``sigma_min``, ``sigma_max``) and ``round_sigma``,
which maps a noise level to the nearest one the network was trained on (the identity except for iDDPM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]  # (c_skip, c_out, c_in, c_noise), each of sigma's shape


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> Coefficients:
    """(c_skip, c_out, c_in, c_noise) for noise levels sigma, each of sigma's shape (Table 1, "EDM" column).

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sd^2 + sigma^2), c_noise = ln(sigma) / 4.
    """
    var = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = var.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def vp_sigma(t: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """VP schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (Table 1, "VP" column).

    Written as exp(.) - 1 and, in the inverse, ln(1 + sigma^2), not expm1/log1p: in float32 these are the values
    EDM's VP networks were trained with (at sigma = 0.002, ln(1 + sigma^2) is ~1% off in float32).
    """
    return ((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """The VP schedule's inverse t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
    return ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d


def vp_coefficients(sigma: Tensor, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000) -> Coefficients:
    """(c_skip, c_out, c_in, c_noise) of the VP preconditioning (Table 1): 1, -sigma, 1 / sqrt(sigma^2 + 1),
    (M - 1) t(sigma)."""
    c_in = (sigma**2 + 1).rsqrt()
    return torch.ones_like(sigma), -sigma, c_in, (M - 1) * vp_sigma_inv(sigma, beta_d, beta_min)


def ve_coefficients(sigma: Tensor) -> Coefficients:
    """(c_skip, c_out, c_in, c_noise) of the VE preconditioning (Table 1): 1, sigma, 1, ln(sigma / 2)."""
    one = torch.ones_like(sigma)
    return one, sigma, one, (0.5 * sigma).log()


def iddpm_alpha_bar(j: Tensor, C_2: float = 0.008, M: int = 1000) -> Tensor:
    """iDDPM's cosine schedule alpha_bar(j) = sin^2(pi/2 j / (M (C_2 + 1))) (Table 1, "iDDPM" column)."""
    return (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2


def iddpm_u(C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> Tensor:
    """iDDPM's discrete noise levels u_0 > u_1 > ... > u_M = 0, float32 [M + 1] (Table 1, "iDDPM" column):

    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1).

    Evaluated one float32 scalar at a time from j = M down, the order and precision EDM's table has.
    """
    if M < 1 or not 0 < C_1 <= 1 or C_2 < 0:
        raise ValueError(f"iDDPM needs M >= 1, 0 < C_1 <= 1 and C_2 >= 0, got M={M}, C_1={C_1}, C_2={C_2}")
    u = torch.zeros(M + 1, dtype=torch.float32)
    for j in range(M, 0, -1):
        ratio = iddpm_alpha_bar(torch.tensor(j - 1), C_2, M) / iddpm_alpha_bar(torch.tensor(j), C_2, M)
        u[j - 1] = ((u[j] ** 2 + 1) / ratio.clip(min=C_1) - 1).sqrt()
    return u


def iddpm_index(sigma: Tensor, u: Tensor) -> Tensor:
    """Index j of the u_j nearest to each sigma (long, sigma's shape, on u's device); ties take the smaller j.

    Distances are |u_j - sigma| in float32.
    """
    s = sigma.to(device=u.device, dtype=torch.float32).reshape(-1, 1)  # [N, 1]
    return (u.to(torch.float32).view(1, -1) - s).abs().argmin(dim=1).reshape(sigma.shape)


def iddpm_coefficients(sigma: Tensor, u: Tensor) -> Coefficients:
    """(c_skip, c_out, c_in, c_noise) of the iDDPM preconditioning (Table 1): 1, -sigma, 1 / sqrt(sigma^2 + 1),
    M - 1 - argmin_j |u_j - sigma|, with M = len(u) - 1."""
    M = u.shape[0] - 1
    c_noise = (M - 1 - iddpm_index(sigma, u)).to(torch.float32)
    return torch.ones_like(sigma), -sigma, (sigma**2 + 1).rsqrt(), c_noise


class Preconditioning(nn.Module):
    """The shared wrapper: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, cond, aug_label)[:, :C].

    Subclasses provide ``coefficients(sigma)``; ``out_factor`` is how many times x's channels the backbone
    returns (2 for iDDPM, whose backbone also predicts a variance that D does not use).
    """

    out_factor = 1

    def __init__(self, backbone: nn.Module, sigma_min: float, sigma_max: float) -> None:
        super().__init__()
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.backbone = backbone  # F: the raw network
        self.sigma_min = float(sigma_min)  # smallest supported noise level (samplers clip their grid to it)
        self.sigma_max = float(sigma_max)  # largest supported noise level

    def coefficients(self, sigma: Tensor) -> Coefficients:
        raise NotImplementedError

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        """The noise level the network is evaluated at for ``sigma``: the identity here."""
        return torch.as_tensor(sigma)

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])  # [B]
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        bshape = (-1,) + (1,) * (x.ndim - 1)  # broadcast [B] over the data dims
        x32 = x.to(torch.float32)
        F_x = self.backbone(x32 * c_in.view(bshape), c_noise, cond, aug_label)
        channels = x.shape[1]
        if F_x.shape[1] != self.out_factor * channels:
            raise ValueError(
                f"{type(self).__name__}: the backbone must return {self.out_factor} x {channels} channels, "
                f"got output shape {tuple(F_x.shape)}"
            )
        F_x = F_x[:, :channels].to(torch.float32)  # [B, C, ...]
        denoised = c_skip.view(bshape) * x32 + c_out.view(bshape) * F_x
        return denoised.to(x.dtype)


class EDMPrecond(Preconditioning):
    """EDM's preconditioning (Karras et al. 2022, Table 1, "EDM" column; Sec. 5): unit-variance inputs and
    targets for F at every sigma, c_noise = ln(sigma) / 4. Supports every sigma by default (0, inf)."""

    def __init__(
        self,
        backbone: nn.Module,
        sigma_data: float = 0.5,  # standard deviation of the data
        sigma_min: float = 0.0,  # smallest supported noise level (EDM: 0)
        sigma_max: float = float("inf"),  # largest supported noise level (EDM: inf)
    ) -> None:
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        super().__init__(backbone, sigma_min, sigma_max)
        self.sigma_data = sigma_data

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return edm_coefficients(sigma, self.sigma_data)


class VPPrecond(Preconditioning):
    """The variance-preserving preconditioning of Song et al. 2021 as written in EDM's Table 1 ("VP" column):
    D = x - sigma F(x / sqrt(sigma^2 + 1); (M - 1) t(sigma)), supported on [sigma(epsilon_t), sigma(1)]."""

    def __init__(
        self,
        backbone: nn.Module,
        beta_d: float = 19.9,  # extent of the noise level schedule
        beta_min: float = 0.1,  # initial slope of the noise level schedule
        M: int = 1000,  # number of timesteps of the original DDPM formulation
        epsilon_t: float = 1e-5,  # smallest t used in training
    ) -> None:
        if beta_d <= 0 or beta_min < 0 or M < 2 or not 0 < epsilon_t < 1:
            raise ValueError(f"VPPrecond: bad schedule beta_d={beta_d}, beta_min={beta_min}, M={M}, eps={epsilon_t}")
        # the range in float32, as EDM computes it
        t = torch.tensor([epsilon_t, 1.0], dtype=torch.float32)
        sigma_min, sigma_max = vp_sigma(t, beta_d, beta_min).tolist()
        super().__init__(backbone, sigma_min, sigma_max)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return vp_coefficients(sigma, self.beta_d, self.beta_min, self.M)


class VEPrecond(Preconditioning):
    """The variance-exploding preconditioning of Song et al. 2021 as written in EDM's Table 1 ("VE" column):
    D = x + sigma F(x; ln(sigma / 2)), supported on [sigma_min, sigma_max] = [0.02, 100]."""

    def __init__(
        self,
        backbone: nn.Module,
        sigma_min: float = 0.02,  # smallest supported noise level
        sigma_max: float = 100.0,  # largest supported noise level
    ) -> None:
        super().__init__(backbone, sigma_min, sigma_max)

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return ve_coefficients(sigma)


class iDDPMPrecond(Preconditioning):  # noqa: N801 (the paper's name)
    """The improved-DDPM preconditioning (Nichol & Dhariwal 2021) as written in EDM's Table 1 ("iDDPM" column):
    D = x - sigma F(x / sqrt(sigma^2 + 1); M - 1 - j(sigma))[:, :C], with j(sigma) the index of the nearest of
    the M + 1 discrete levels u_j; supported on [u_{M-1}, u_0]. The backbone returns 2C channels (mean and
    variance); only the first C enter D. ``u`` is a non-persistent buffer: it follows (C_1, C_2, M) and moves
    with the module, and the state dict holds only ``backbone.*``.
    """

    out_factor = 2

    def __init__(
        self,
        backbone: nn.Module,
        C_1: float = 0.001,  # timestep adjustment at low noise levels
        C_2: float = 0.008,  # timestep adjustment at high noise levels
        M: int = 1000,  # number of timesteps of the original DDPM formulation
    ) -> None:
        u = iddpm_u(C_1, C_2, M)  # [M + 1], decreasing, u[M] = 0
        super().__init__(backbone, float(u[M - 1]), float(u[0]))
        self.C_1, self.C_2, self.M = C_1, C_2, M
        self.register_buffer("u", u, persistent=False)

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return iddpm_coefficients(sigma, self.u)

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        """The nearest u_j to each sigma, in sigma's shape, dtype and device."""
        sigma = torch.as_tensor(sigma)
        rounded = self.u[iddpm_index(sigma, self.u).flatten()]
        return rounded.to(device=sigma.device, dtype=sigma.dtype).reshape(sigma.shape)


PRECONDS: dict[str, type[Preconditioning]] = {
    "edm": EDMPrecond,
    "vp": VPPrecond,
    "ve": VEPrecond,
    "iddpm": iDDPMPrecond,
}


@dataclass(frozen=True)
class PrecondSpec:
    """Which preconditioning wraps the backbone (Karras et al. 2022, Table 1) and its constants.

    Args:
        name: edm (the default), or vp / ve / iddpm (EDM's baselines, as imported from NVlabs/edm's pickles).
        kwargs: its constants, e.g. VP's beta_d/beta_min, VE's sigma_min/sigma_max (EDM's sigma_data is the
            module's own setting).
    """

    name: str = "edm"
    kwargs: dict[str, float] | None = None


def build_precond(spec: PrecondSpec, backbone: nn.Module, sigma_data: float) -> Preconditioning:
    """The preconditioning ``spec`` names around ``backbone`` (EDM's takes sigma_data, the others their constants);
    raises ValueError naming what is wrong."""
    if spec.name not in PRECONDS:
        raise ValueError(f"precond must be one of {sorted(PRECONDS)}, got {spec.name!r}")
    kwargs = dict(spec.kwargs or {})
    if spec.name == "edm":
        kwargs.setdefault("sigma_data", sigma_data)
    try:
        return PRECONDS[spec.name](backbone, **kwargs)
    except TypeError as e:
        raise ValueError(f"precond kwargs for {spec.name}: {e}") from None
