"""How samples are drawn from any model, without Lightning: the options (defined once), per-seed randomness, the
diffusion sampler (Karras et al.'s grid, churn, guidance, teleportation) and the one-step generator's sampler.
Lightning's part (splitting seeds over devices) is diffscore.lit.predict."""

from diffscore.sampling.base import Sampler
from diffscore.sampling.diffusion import DiffusionSampler
from diffscore.sampling.one_step import OneStepSampler
from diffscore.sampling.options import SamplerDefaults, SamplingOptions, TeleportOptions
from diffscore.sampling.speed import Speed

__all__ = [
    "DiffusionSampler",
    "OneStepSampler",
    "Sampler",
    "SamplerDefaults",
    "SamplingOptions",
    "Speed",
    "TeleportOptions",
]
