"""Magnitude-preserving layers of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", arXiv 2312.02696, Sec. 2 and Appendix B; NVlabs/edm2 ``training/networks_edm2.py``).

Every layer keeps unit-variance inputs at unit variance on expectation: weights are normalised to unit norm per
output channel and scaled by 1/sqrt(fan_in) (Eq. 47), stored weights are re-normalised before each training step
("forced weight normalisation", Eq. 66), and nonlinearities, sums and concatenations carry the constants that undo
their change of magnitude (Eqs. 81, 88, 103). Normalisation norms are taken in float32 (float64 for a float64
tensor), as EDM2 does, whatever the tensor's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-4  # EDM2's epsilon in normalize()
SILU_GAIN = 0.596  # E[silu(x)^2]^(1/2) for x ~ N(0, 1), EDM2 Eq. 81


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 tensors, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


def normalize(x: Tensor, dim: int | list[int] | None = None, eps: float = EPS) -> Tensor:
    """x / (eps + ||x|| / sqrt(N)) with the norm over ``dim`` (default: all but the first) and N the number of
    elements the norm runs over: unit RMS along ``dim`` (EDM2 Eq. 47's normalisation, and its pixel norm).

    The norm is computed in float32 (float64 for float64 input); the result has x's dtype."""
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=_compute_dtype(x.dtype))
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())  # ||x|| / sqrt(N), N = x.numel() / norm.numel()
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """Magnitude-preserving SiLU, silu(x) / 0.596 (EDM2 Eq. 81)."""
    return F.silu(x) / SILU_GAIN


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving weighted sum ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (EDM2 Eq. 88): unit
    variance for independent unit-variance a and b; t = 0 gives a, t = 1 gives b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Magnitude-preserving concatenation along ``dim`` (EDM2 Eq. 103): a scaled by C (1 - t) / sqrt(Na), b by
    C t / sqrt(Nb), C = sqrt((Na + Nb) / ((1 - t)^2 + t^2)); t sets b's share of the output's magnitude."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features sqrt(2) cos(2 pi (f x + phi)) of a scalar, [B] -> [B, num_channels]
    (EDM2 Eq. 75), f ~ N(0, bandwidth^2), phi ~ U(0, 1). ``freqs`` and ``phases`` (times 2 pi) are buffers, saved
    with the weights. Computed in float32 (float64 for float64 input), returned in the input's dtype."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)  # [C]
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))  # [C]

    def forward(self, x: Tensor) -> Tensor:
        dtype = _compute_dtype(x.dtype)
        y = torch.outer(x.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)  # [B, C]
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or fully-connected layer (kernel []) without bias
    (EDM2 Eq. 47): y = conv(x, gain * normalize(w) / sqrt(fan_in)), 'same' padding for odd kernels.

    Forced weight normalisation (EDM2 Eq. 66): in training mode with gradients enabled, the stored weight is first
    overwritten by normalize(w) (in place, outside autograd), as EDM2 does on every training forward; the output
    then uses normalize of that stored weight. :func:`normalize_mp_weights_` does the same for every MPConv of a
    module, for a training loop that re-normalises after each optimizer step instead; with the in-forward copy
    turned off (:func:`set_forced_normalization`, e.g. for torch.compile) and one call before the first step,
    that loop runs through the same weights as EDM2's. In eval mode, or under ``torch.no_grad()``, the stored
    weight is left alone.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        if len(kernel) not in (0, 2):
            raise ValueError(f"MPConv kernel must be [] (linear) or [k, k] (conv), got {list(kernel)}")
        self.in_channels = in_channels  # input channels (features for a linear layer)
        self.out_channels = out_channels  # output channels (features)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))  # [out, in, *kernel]
        self.forced_normalization = True  # overwrite the stored weight by normalize(w) in training forwards

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        if self.training and self.forced_normalization and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))  # forced weight normalisation
        w = self.weight.to(_compute_dtype(self.weight.dtype))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))  # unit norm per output channel, then 1/sqrt(fan_in)
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()  # [B, out]
        return F.conv2d(x, w, padding=w.shape[-1] // 2)  # [B, out, H, W]

    def extra_repr(self) -> str:
        kernel = list(self.weight.shape[2:])
        return f"{self.in_channels}, {self.out_channels}, kernel={kernel}"


@torch.no_grad()
def normalize_mp_weights_(module: nn.Module) -> int:
    """Overwrite the weight of every :class:`MPConv` in ``module`` by normalize(weight), in place (EDM2 Eq. 66,
    forced weight normalisation); returns how many were normalised. Call it before training and after each
    optimizer step."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, MPConv):
            w = layer.weight
            w.copy_(normalize(w.to(_compute_dtype(w.dtype))))
            count += 1
    return count


def set_forced_normalization(module: nn.Module, enabled: bool) -> int:
    """Turn the in-forward forced weight normalisation of every :class:`MPConv` in ``module`` on or off (for a
    training loop that calls :func:`normalize_mp_weights_` after each optimizer step); returns how many."""
    layers = [m for m in module.modules() if isinstance(m, MPConv)]
    for layer in layers:
        layer.forced_normalization = bool(enabled)
    return len(layers)


def pixel_norm(x: Tensor, dim: int = 1, eps: float = EPS) -> Tensor:
    """Pixel normalisation: unit RMS over the channels ``dim`` at every position (EDM2 Sec. 2.5 / Fig. 21)."""
    return normalize(x, dim=dim, eps=eps)
