"""Discrete-time DDPM models (Ho et al. 2020; Stable Diffusion) in EDM's convention x = x0 + sigma n.

A DDPM is trained on T discrete timesteps i = 0 .. T-1 with betas beta_i and alphabar_i = prod_{j <= i} (1 - beta_j);
its noisy input is x_vp = sqrt(alphabar_i) x0 + sqrt(1 - alphabar_i) n. Dividing by sqrt(alphabar_i) gives EDM's
x = x0 + sigma_i n with sigma_i = sqrt((1 - alphabar_i) / alphabar_i) (Karras et al. 2022, Sec. 2 and Appendix C.1),
so the network sees c_in x = x / sqrt(sigma^2 + 1) at a timestep. Between the trained levels, the timestep is
interpolated linearly in ln(sigma) (k-diffusion's DiscreteSchedule.sigma_to_t; diffusers' ``_sigma_to_t``), which
lets EDM's samplers run on any grid inside [sigma_0, sigma_{T-1}].

The betas follow diffusers' definitions exactly (float32, as its schedulers compute them): "linear" =
linspace(beta_start, beta_end, T); "scaled_linear" = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (latent
diffusion); "squaredcos_cap_v2" = 1 - abar((i+1)/T) / abar(i/T) capped at 0.999, abar(t) = cos((t + 0.008) / 1.008
pi/2)^2 (Nichol & Dhariwal 2021, Eq. 17). The defaults are diffusers' scheduler defaults (a config that omits a key
means these); Stable Diffusion 1/2 use "scaled_linear", 0.00085, 0.012, T = 1000.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffscore.core.precond import Coefficients, Preconditioning

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddpm_betas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> Tensor:
    """The betas beta_0 .. beta_{T-1} of a named schedule, float32 [T] (diffusers' definitions; module docstring).

    beta_start / beta_end do not enter "squaredcos_cap_v2".
    """
    T = num_train_timesteps
    if int(T) != T or T < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        t = torch.arange(T + 1, dtype=torch.float64) / T  # [T + 1]
        abar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999).to(torch.float32)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def ddpm_alphas_cumprod(betas: Tensor) -> Tensor:
    """alphabar_i = prod_{j <= i} (1 - beta_j), in the betas' dtype (float32 for ``ddpm_betas``), [T]."""
    return torch.cumprod(1 - betas, dim=0)


def ddpm_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """EDM noise levels of the timesteps, sigma_i = sqrt((1 - alphabar_i) / alphabar_i), increasing in i, [T]."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def schedule_sigmas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> Tensor:
    """sigma_0 .. sigma_{T-1} of a named schedule, float32 [T] (the values diffusers' schedulers hold)."""
    return ddpm_sigmas(ddpm_alphas_cumprod(ddpm_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)))


def sigma_to_timestep(sigma: Tensor, sigmas: Tensor) -> Tensor:
    """The fractional timestep of noise levels ``sigma`` (any shape) on the levels ``sigmas`` [T] (increasing).

    With i the largest index with ln sigma_i <= ln sigma (clamped to 0 .. T-2), t = i + w,
    w = (ln sigma_i - ln sigma) / (ln sigma_i - ln sigma_{i+1}) clamped to [0, 1]: linear interpolation in ln(sigma),
    so a sigma below sigma_0 gives t = 0 and one above sigma_{T-1} gives t = T - 1 (k-diffusion's
    DiscreteSchedule.sigma_to_t, diffusers' ``_sigma_to_t``). Computed in float64 (a level maps to exactly its
    integer index), returned in float64 on sigma's device.
    """
    log_levels = sigmas.to(device=sigma.device, dtype=torch.float64).log()  # [T]
    log_sigma = sigma.to(torch.float64).clamp(min=1e-10).log()
    low = (torch.searchsorted(log_levels, log_sigma.flatten(), right=True) - 1).clamp(0, len(log_levels) - 2)
    lo, hi = log_levels[low], log_levels[low + 1]  # [N] each
    w = ((lo - log_sigma.flatten()) / (lo - hi)).clamp(0, 1)
    return (low + w).reshape(sigma.shape)


def timestep_to_sigma(t: Tensor, sigmas: Tensor) -> Tensor:
    """The inverse of ``sigma_to_timestep`` on [0, T-1]: sigma(t) = exp of ln(sigma) interpolated linearly between
    the levels around t (k-diffusion's DiscreteSchedule.t_to_sigma); float64, t's shape and device."""
    log_levels = sigmas.to(device=t.device, dtype=torch.float64).log()  # [T]
    t = t.to(torch.float64).clamp(0, len(log_levels) - 1)
    low = t.floor().long().clamp(max=len(log_levels) - 2)
    w = t - low
    return ((1 - w) * log_levels[low] + w * log_levels[low + 1]).exp()


def discrete_ddpm_coefficients(
    sigma: Tensor, sigmas: Tensor, prediction_type: str = "epsilon", quantize: bool = False
) -> Coefficients:
    """(c_skip, c_out, c_in, c_noise) of a discrete DDPM network, each of sigma's shape, float32.

    "epsilon" (F predicts the noise n): D = x - sigma F, so c_skip = 1, c_out = -sigma (EDM Table 1, "VP" column).
    "v_prediction" (F predicts v = alpha n - sigma_vp x0 of the VP process, Salimans & Ho 2022):
    D = x / (sigma^2 + 1) - sigma F / sqrt(sigma^2 + 1). Both: c_in = 1 / sqrt(sigma^2 + 1), c_noise = the
    fractional timestep t(sigma); ``quantize``: the nearest trained timestep round(t(sigma)) instead (k-diffusion's
    ``quantize``; what diffusers' DPMSolverMultistepScheduler feeds its U-Net).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    t = sigma_to_timestep(sigma, sigmas)
    c_noise = (t.round() if quantize else t).to(torch.float32)
    var = sigma**2 + 1
    c_in = var.rsqrt()
    if prediction_type == "epsilon":
        return torch.ones_like(sigma), -sigma, c_in, c_noise
    return 1 / var, -sigma * c_in, c_in, c_noise


class DiscreteDDPMPrecond(Preconditioning):
    """A network trained as a discrete DDPM (Stable Diffusion's U-Net) as an EDM denoiser:
    D = c_skip x + c_out F(x / sqrt(sigma^2 + 1); t(sigma)), supported on the schedule's [sigma_0, sigma_{T-1}].

    ``sigmas`` (the T levels, float32) is a non-persistent buffer: it follows the schedule's arguments and moves
    with the module; the state dict holds only ``backbone.*``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        beta_schedule: str = "linear",  # "linear", "scaled_linear" or "squaredcos_cap_v2" (diffusers' names)
        num_train_timesteps: int = 1000,  # T, the number of trained timesteps
        beta_start: float = 0.0001,  # beta_0
        beta_end: float = 0.02,  # beta_{T-1}
        prediction_type: str = "epsilon",  # what F predicts: "epsilon" (noise) or "v_prediction"
        quantize: bool = False,  # call F at the nearest trained timestep instead of the fractional one
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        sigmas = schedule_sigmas(beta_schedule, num_train_timesteps, beta_start, beta_end)  # [T], increasing
        if not bool((sigmas[1:] > sigmas[:-1]).all()) or not bool(sigmas[0] > 0):
            raise ValueError(f"the {beta_schedule} schedule ({beta_start}, {beta_end}) has no increasing noise levels")
        super().__init__(backbone, float(sigmas[0]), float(sigmas[-1]))
        self.beta_schedule, self.num_train_timesteps = beta_schedule, num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.prediction_type, self.quantize = prediction_type, quantize
        self.register_buffer("sigmas", sigmas, persistent=False)

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return discrete_ddpm_coefficients(sigma, self.sigmas, self.prediction_type, self.quantize)


def ddim_sigmas(sigmas: Tensor, num_steps: int, steps_offset: int = 1) -> Tensor:
    """The noise levels [num_steps + 1] (float64, last 0) of DDIM's timesteps on the trained levels ``sigmas`` [T].

    DDIM (Song et al. 2021) with eta 0 steps through the "leading" timesteps t_i = (num_steps - 1 - i) * (T //
    num_steps) + steps_offset (diffusers' DDIMScheduler; LDM's "uniform" DDIM discretisation, which SD 1/2 and
    MusicScore's script use); its update is the Euler step of the PF-ODE in x = x0 + sigma n (Karras et al. 2022,
    Sec. 4), so diffscore's euler sampler on these levels is DDIM. The last step goes to sigma = 0 (diffusers'
    set_alpha_to_one=True; LDM and SD's shipped config stop at alphabar_0, sigma_0 ~ 0.029, instead).
    """
    T = len(sigmas)
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    ratio = T // num_steps
    if ratio < 1 or (num_steps - 1) * ratio + steps_offset > T - 1 or steps_offset < 0:
        raise ValueError(f"{num_steps} DDIM steps (offset {steps_offset}) do not fit {T} trained timesteps")
    t = torch.arange(num_steps - 1, -1, -1) * ratio + steps_offset  # [num_steps], decreasing
    levels = sigmas.to(device="cpu", dtype=torch.float64)[t]  # [num_steps]
    return torch.cat([levels, levels.new_zeros(1)])


class UniformTimesteps:
    """Training noise levels of a discrete DDPM: t ~ U{0, ..., T-1}, sigma = sigma_t (Ho et al. 2020, Algorithm 1;
    how Stable Diffusion was trained). Called as diffscore.core.schedules.LogNormalSigma is."""

    def __init__(self, sigmas: Tensor) -> None:
        self.sigmas = sigmas.to(torch.float32)  # [T], the trained levels

    def __call__(
        self, batch: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        t = torch.randint(len(self.sigmas), (batch,), device=device, generator=generator)  # [B]
        return self.sigmas.to(device)[t]

    def __repr__(self) -> str:
        return f"UniformTimesteps(T={len(self.sigmas)})"


def ddpm_loss(denoiser: Preconditioning, x0: Tensor, sigma: Tensor, noise: Tensor, cond=None) -> Tensor:
    """Per-sample loss [B] of a discrete DDPM as Stable Diffusion trains it: mean_d (F - target)^2, with F the
    network's output and target the noise (epsilon prediction) or v = alpha n - sigma_vp x0 (v prediction).

    In EDM's terms (Karras et al. 2022, Eq. 8 with lambda = 1 / c_out^2): x = x0 + sigma n, D = c_skip x +
    c_out F, and F - target = (D - x0) / c_out for both parameterisations (epsilon: c_out = -sigma; v: c_out =
    -sigma / sqrt(sigma^2 + 1)), so the loss is mean_d ((D(x; sigma) - x0) / c_out(sigma))^2.
    """
    bshape = (-1,) + (1,) * (x0.ndim - 1)
    x = x0 + sigma.view(bshape) * noise  # [B, C, h, w]
    denoised = denoiser(x, sigma, cond)
    c_out = denoiser.coefficients(sigma.to(torch.float32))[1].view(bshape)  # [B, 1, 1, 1]
    return ((denoised.float() - x0.float()) / c_out).square().flatten(1).mean(1)
