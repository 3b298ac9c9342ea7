"""The sampling options, defined once: what `diffscore sample` / `evaluate`, the sampling callbacks and the benchmarks
may choose (``SamplingOptions``, None = the model's own setting), and a model's own settings (``SamplerDefaults``).

Both are checked when they are built, so a bad value is one line naming the option before anything is loaded;
what depends on the model (a class label's range, a text model for prompts, the teleport skip against the step
count) is checked when a sampler is made for a model (diffscore.sampling.diffusion / one_step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from diffscore.core.samplers import SAMPLERS
from diffscore.errors import DiffscoreError

PRECISIONS = ("bf16", "32")
GRIDS = ("karras", "ddim")  # Karras et al.'s Eq. 5; DDIM's timesteps of a discrete-time model (Stable Diffusion)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_sampler_kwargs(kwargs: Any, option: str) -> None:
    """Sampler options are a mapping of names to numbers (s_max may be infinite, nothing may be NaN)."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise DiffscoreError(f"{option} must be a JSON object of sampler options, e.g. '{{\"s_churn\": 40}}'")
    for key, value in kwargs.items():
        if not _number(value) or math.isnan(value) or (math.isinf(value) and key != "s_max"):
            raise DiffscoreError(f"{option}: {key} must be a finite number, got {value!r}")


def check_guidance_interval(interval: Any) -> None:
    """A guidance interval is two noise levels 0 <= lo < hi (hi may be infinite: no upper limit)."""
    if interval is None:
        return
    values = list(interval) if isinstance(interval, list | tuple) else None
    if values is None or len(values) != 2 or not all(_number(v) and not math.isnan(v) for v in values):
        raise DiffscoreError(f"--guidance_interval must be two noise levels [lo, hi], got {interval!r}")
    lo, hi = values
    if not 0 <= lo < hi or math.isinf(lo):
        raise DiffscoreError(f"--guidance_interval [{lo}, {hi}] needs 0 <= lo < hi (guidance for sigma in (lo, hi])")


@dataclass(frozen=True)
class TeleportOptions:
    """Skip the first sampler steps with the closed-form PF-ODE of the data's Gaussian (Wang & Vastola 2024).

    Args:
        skip: skip this many leading steps (Heun 18 with skip k: 2(18 - k) - 1 evaluations).
        sigma: or start the network at the first grid level <= this (the level used is printed).
        gaussian: cache file of the fitted Gaussian (read if it exists, else fitted and written).
        rank: keep the top-r principal components of the covariance (default: all).
        data: fit the Gaussian to this data set, an EDM ZIP or folder of PNGs (default: the checkpoint's data).
    """

    skip: int | None = None
    sigma: float | None = None
    gaussian: str | None = None
    rank: int | None = None
    data: str | None = None

    def __post_init__(self) -> None:
        if self.skip is not None and self.sigma is not None:
            raise DiffscoreError("give --teleport.skip or --teleport.sigma, not both")
        if self.skip is not None and (isinstance(self.skip, bool) or not isinstance(self.skip, int) or self.skip < 0):
            raise DiffscoreError(f"--teleport.skip must be an integer >= 0, got {self.skip!r}")
        if self.sigma is not None and not (_number(self.sigma) and 0 < self.sigma < math.inf):
            raise DiffscoreError(f"--teleport.sigma must be a positive number, got {self.sigma!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise DiffscoreError(f"--teleport.rank must be an integer >= 1, got {self.rank!r}")

    @property
    def wanted(self) -> bool:
        """Whether teleportation was asked for."""
        return self.skip is not None or self.sigma is not None


@dataclass(frozen=True)
class SamplingOptions:
    """How samples are drawn; a value left out (None) is the model's own.

    Args:
        sampler: heun (EDM Algorithm 2, with churn), euler, dpmpp_2m (DPM-Solver++(2M)) or unipc (UniPC-2).
        steps: sampler steps (Heun 18 -> 35 network evaluations).
        sampler_kwargs: sampler options as JSON, e.g. '{"s_churn": 40, "s_min": 0.05, "s_max": 50, "s_noise":
            1.003}' (EDM's ImageNet-64 Heun); the model's own apply to its own sampler only.
        sigma_min: smallest noise level of the sampler grid (Karras et al. Eq. 5), clipped to the network's range.
        sigma_max: largest noise level of the grid (the start), clipped to the network's range.
        rho: the grid's exponent.
        grid: "karras" (Eq. 5 over [sigma_min, sigma_max]) or "ddim": the trained levels of DDIM's timesteps,
            for a discrete-time model (Stable Diffusion; with --sampler euler this is DDIM with eta 0).
        class_label: one class for every sample of a class-conditional model (default: a label drawn per seed).
        prompt: the caption of every sample of a text-conditioned model (default: the empty caption).
        guidance: guidance scale w: D = D_ref + w (D - D_ref) (1 = the model as trained). D_ref is the --guide
            network's output if one is given (autoguidance: a smaller or shorter-trained model, Karras et al. 2024;
            EDM2's img64-s + xs: w 1.7), else the model's own unconditional output (classifier-free guidance,
            Ho & Salimans 2022; MusicScore: 4).
        guide: the guiding network: any model file --ckpt_path takes (a diffscore checkpoint, an NVlabs/edm or
            edm2 pickle) of the same data shape; conditioned on the same labels or unconditional.
        guidance_interval: guide only at noise levels sigma in (lo, hi], e.g. [0.28, 5.42] (Kynkaanniemi et al.
            2024); elsewhere D is the model's own (default: guide at every level).
        teleport: skip the first steps with the Gaussian model of the training data.
        precision: on a GPU, "bf16" (autocast) or "32" (default: as the model trained; NVlabs/edm pickles: 32).
        compile: on a GPU, torch.compile the denoiser (default: as the model trained).
        channels_last: on a GPU, channels-last memory (default: as the model trained).
        batch_size: samples per forward pass on each device.
    """

    sampler: str | None = None
    steps: int | None = None
    sampler_kwargs: dict[str, float] | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float | None = None
    grid: str | None = None
    class_label: int | None = None
    prompt: str | None = None
    guidance: float = 1.0
    guide: str | None = None
    guidance_interval: tuple[float, float] | None = None
    teleport: TeleportOptions = field(default_factory=TeleportOptions)
    precision: str | None = None
    compile: bool | None = None
    channels_last: bool | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise DiffscoreError(f"--sampler {self.sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DiffscoreError(f"--{name} must be an integer >= 1, got {value!r}")
        check_sampler_kwargs(self.sampler_kwargs, "--sampler_kwargs")
        for name in ("sigma_min", "sigma_max", "rho"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and 0 < value < math.inf):
                raise DiffscoreError(f"--{name} must be a positive number, got {value!r}")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise DiffscoreError(f"--sigma_min {self.sigma_min} must be below --sigma_max {self.sigma_max}")
        if self.grid is not None and self.grid not in GRIDS:
            raise DiffscoreError(f"--grid must be one of {GRIDS}, got {self.grid!r}")
        if self.class_label is not None and (not isinstance(self.class_label, int) or self.class_label < 0):
            raise DiffscoreError(f"--class_label must be an integer >= 0, got {self.class_label!r}")
        if not _number(self.guidance) or not math.isfinite(self.guidance):
            raise DiffscoreError(f"--guidance must be a finite number, got {self.guidance!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise DiffscoreError(f"--precision must be bf16 or 32, got {self.precision!r}")
        if self.guide is not None and (not isinstance(self.guide, str) or not self.guide.strip()):
            raise DiffscoreError(f"--guide must name a model file, got {self.guide!r}")
        check_guidance_interval(self.guidance_interval)
        if not isinstance(self.teleport, TeleportOptions):
            raise DiffscoreError("--teleport takes its options as --teleport.skip, --teleport.sigma, ...")


@dataclass(frozen=True)
class SamplerDefaults:
    """A model's own sampler settings: what SamplingOptions left out means. Saved with every checkpoint.

    Args:
        sampler: sampler name (diffscore.core.samplers).
        steps: sampler steps (Heun 18 -> 35 network evaluations).
        sampler_kwargs: options of that sampler (e.g. Heun's s_churn, s_min, s_max, s_noise).
        sigma_min: smallest noise level of the grid (Karras et al. Eq. 5).
        sigma_max: largest noise level of the grid.
        rho: the grid's exponent.
        precision: on a GPU, "bf16" or "32" (None: set from the trainer's precision when fit starts).
        grid: "karras" or "ddim" (see SamplingOptions).
    """

    sampler: str = "heun"
    steps: int = 18
    sampler_kwargs: dict[str, float] | None = None
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    precision: str | None = None
    grid: str = "karras"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise DiffscoreError(f"sampler {self.sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise DiffscoreError(f"sampler steps must be an integer >= 1, got {self.steps!r}")
        check_sampler_kwargs(self.sampler_kwargs, "sampler_kwargs")
        for name in ("sigma_min", "sigma_max", "rho"):
            value = getattr(self, name)
            if not (_number(value) and 0 < value < math.inf):
                raise DiffscoreError(f"sampler {name} must be a positive number, got {value!r}")
        if self.sigma_min >= self.sigma_max:
            raise DiffscoreError(f"sampler sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise DiffscoreError(f"sampling precision must be bf16, 32 or null, got {self.precision!r}")
        if self.grid not in GRIDS:
            raise DiffscoreError(f"sampling grid must be one of {GRIDS}, got {self.grid!r}")
