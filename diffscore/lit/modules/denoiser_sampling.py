"""Sampling from a diffusion model: diffscore.lit.sampling.Sampleable for a module holding a preconditioned
denoiser (``self.denoiser``) and its sampler settings in ``self.hparams`` (sampler, num_steps, sampler_kwargs,
sigma_min, sigma_max, rho)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffscore.core.gaussian import teleport
from diffscore.core.guidance import guided_denoiser
from diffscore.core.precond import Preconditioning
from diffscore.core.samplers import get_sampler, nfe
from diffscore.core.schedules import clip_sigma_range, karras_sigmas
from diffscore.errors import DiffscoreError
from diffscore.lit.sampling import (
    BackboneFacts,
    SamplingOptions,
    check_condition,
    condition,
    seed_generators,
    seeded_noise,
)


class DenoiserSampling(BackboneFacts):
    """generate / nfe / check of a diffusion model: Karras et al.'s sampler grid over ``self.denoiser``."""

    denoiser: Preconditioning
    hparams: Any
    device: torch.device

    @property
    def backbone(self) -> nn.Module:
        return self.denoiser.backbone

    one_step = False

    def sampler_of(self, options: SamplingOptions | None = None) -> tuple[str, int, dict[str, Any]]:
        """(sampler name, steps, sampler options) that ``options`` choose, the model's own where they don't:
        the checkpoint's sampler_kwargs apply to its own sampler only."""
        options = options or SamplingOptions()
        name = options.sampler or self.hparams.sampler
        steps = options.num_steps or self.hparams.num_steps
        extra = options.sampler_kwargs
        if extra is None:
            extra = (self.hparams.get("sampler_kwargs") or {}) if name == self.hparams.sampler else {}
        return name, steps, dict(extra)

    def sigmas(self, num_steps: int) -> Tensor:
        """The sampler's noise levels: Karras et al. Eq. 5 with the model's sigma_min, sigma_max and rho, clipped
        to the preconditioning's range and rounded to its levels, as EDM's sampler does."""
        net = self.denoiser
        lo, hi = clip_sigma_range(self.hparams.sigma_min, self.hparams.sigma_max, net.sigma_min, net.sigma_max)
        return karras_sigmas(num_steps, lo, hi, self.hparams.rho, round_sigma=net.round_sigma)

    def check(self, options: SamplingOptions) -> None:
        """Raise DiffscoreError, naming the option, for a choice this model cannot sample with."""
        name, steps, extra = self.sampler_of(options)
        try:
            nfe(name, steps)
        except ValueError as e:
            raise DiffscoreError(f"--sampler/--steps: {e}") from None
        unknown = set(extra) - set(inspect.signature(get_sampler(name)).parameters)
        if unknown:
            raise DiffscoreError(f"--sampler_kwargs {sorted(unknown)} are not options of the {name} sampler")
        if not 0 <= options.teleport_skip < steps:
            raise DiffscoreError(f"--teleport.skip must be in 0..{steps - 1} for {steps} steps")
        if options.teleport_skip and options.teleport_gaussian is None:
            raise DiffscoreError("teleportation needs the Gaussian of the training data (--teleport.gaussian)")
        if options.precision not in (None, "bf16", "32"):
            raise DiffscoreError(f"--precision must be bf16 or 32, got {options.precision!r}")
        if options.guidance != 1.0 and not self.conditional:
            raise DiffscoreError("--guidance needs a conditional model (class labels or text); this one is not")
        check_condition(self, options)

    def nfe(self, options: SamplingOptions | None = None) -> int:
        """Denoiser evaluations per sample, teleported steps excluded."""
        options = options or SamplingOptions()
        name, steps, _ = self.sampler_of(options)
        return nfe(name, steps - options.teleport_skip)

    def speed_of(self, options: SamplingOptions) -> tuple[bool, bool, bool]:
        """(bf16 autocast, channels-last, compiled) for sampling: on CUDA as the model trained unless ``options``
        say otherwise; the CPU samples eager in fp32."""
        if self.device.type != "cuda":
            return False, False, False
        precision = options.precision or self.hparams.get("sampling_precision") or "32"
        channels_last = (
            self.hparams.get("channels_last", False) if options.channels_last is None else options.channels_last
        )
        compiled = self.hparams.get("compile", False) if options.compile is None else options.compile
        return precision == "bf16", bool(channels_last), bool(compiled)

    def sampling_denoiser(self, options: SamplingOptions) -> Callable[..., Tensor]:
        """The denoiser the sampler calls, with the speed switches of ``speed_of``: compiled once per setting
        (static shapes: SeedSampler pads the last batch; sigma is a tensor input, so no recompile per step)."""
        bf16, channels_last, compiled = key = self.speed_of(options)
        if not any(key):
            return self.denoiser
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        cache = self.__dict__.setdefault("_sampling_fns", {})  # plain attribute: not in state_dict, not copied
        if key not in cache:
            denoiser = self.denoiser

            def forward(x: Tensor, sigma: Tensor, cond=None, aug_label=None) -> Tensor:
                if channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    return denoiser(x, sigma, cond, aug_label)

            cache[key] = torch.compile(forward, dynamic=False) if compiled else forward
        return cache[key]

    @torch.no_grad()
    def generate(self, seeds: Sequence[int], options: SamplingOptions | None = None) -> Tensor:
        """Samples x0 [len(seeds), *data_shape] from the current weights, each a function of its seed only.

        Per seed, as NVlabs/edm's generate.py: the initial noise, then the class label (unless ``options`` give
        one, or captions), then the churn noise of every Heun step, from the seed's own generator. Guidance w != 1
        applies classifier-free guidance against the null condition (diffscore.core.guidance); a teleport skip
        replaces the first steps by the closed-form flow of the data's Gaussian (Wang & Vastola 2024).
        """
        options = options or SamplingOptions()
        self.check(options)
        name, steps, extra = self.sampler_of(options)
        sigmas = self.sigmas(steps)
        generators = seed_generators(seeds, self.device)
        x = seeded_noise(generators, self.data_shape, self.device) * float(sigmas[0])
        cond = condition(self, seeds, options, generators)
        if options.teleport_skip:
            x, sigmas = teleport(options.teleport_gaussian.to(self.device), x, sigmas, options.teleport_skip)
        if extra.get("s_churn", 0) > 0:  # churn noise from each seed's own stream
            extra["generator"] = generators
        if "round_sigma" in inspect.signature(get_sampler(name)).parameters:
            extra["round_sigma"] = self.denoiser.round_sigma
        fast = self.sampling_denoiser(options)
        denoiser = fast if options.guidance == 1.0 else guided_denoiser(fast, options.guidance)
        bar = None
        if options.progress:  # one tick per network evaluation (host-side only: no sync)
            from tqdm.auto import tqdm

            bar = tqdm(total=self.nfe(options), desc="sampler", unit="eval", leave=False, dynamic_ncols=True)
            denoiser = _ticking(denoiser, bar)
        was_training = self.training
        self.eval()
        try:
            return get_sampler(name)(denoiser, x, sigmas, cond, **extra)
        finally:
            self.train(was_training)
            if bar is not None:
                bar.close()


def _ticking(denoiser, bar):
    """``denoiser`` that advances ``bar`` by one after each call."""

    def counted(*args, **kwargs):
        out = denoiser(*args, **kwargs)
        bar.update()
        return out

    return counted
