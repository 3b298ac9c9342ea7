"""Sampling a diffusion model: Karras et al.'s sampler grid over a preconditioned denoiser, with optional churn,
guidance (classifier-free, or by a second network: autoguidance, Karras et al. 2024; optionally only in a noise
interval) and analytical teleportation (Wang & Vastola 2024).

A ``DiffusionSampler`` is made for one model and one choice of options; it checks the choice against the model
when it is made (sampler name and steps, sampler options, teleport skip, guidance, condition) and then draws
any seeds: per seed, as NVlabs/edm's generate.py, the initial noise, the class label, and the churn noise of every
Heun step come from the seed's own generator.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffscore.core.discrete_ddpm import DiscreteDDPMPrecond, ddim_sigmas
from diffscore.core.gaussian import GaussianDenoiser, skip_for_sigma, teleport
from diffscore.core.guidance import guided_denoiser
from diffscore.core.precond import Preconditioning
from diffscore.core.samplers import get_sampler, nfe
from diffscore.core.schedules import clip_sigma_range, karras_sigmas
from diffscore.errors import DiffscoreError
from diffscore.sampling.base import Sampler, ticking
from diffscore.sampling.options import SamplerDefaults, SamplingOptions, TeleportOptions
from diffscore.sampling.speed import Speed, fast_denoiser


def sampler_grid(denoiser: Preconditioning, defaults: SamplerDefaults, options: SamplingOptions, steps: int) -> Tensor:
    """The noise levels [steps + 1] (last 0): Karras et al. Eq. 5 with the chosen sigma_min, sigma_max and rho,
    clipped to the preconditioning's range and rounded to its levels, as EDM's sampler does; or, for the "ddim"
    grid, the trained levels of DDIM's timesteps (diffscore.core.discrete_ddpm.ddim_sigmas)."""
    if (options.grid or defaults.grid) == "ddim":
        return ddim_grid(denoiser, options, steps)
    lo = defaults.sigma_min if options.sigma_min is None else options.sigma_min
    hi = defaults.sigma_max if options.sigma_max is None else options.sigma_max
    rho = defaults.rho if options.rho is None else options.rho
    try:
        lo, hi = clip_sigma_range(lo, hi, denoiser.sigma_min, denoiser.sigma_max)
    except ValueError as e:
        raise DiffscoreError(f"--sigma_min/--sigma_max: {e}") from None
    return karras_sigmas(steps, lo, hi, rho, round_sigma=denoiser.round_sigma)


def ddim_grid(denoiser: Preconditioning, options: SamplingOptions, steps: int) -> Tensor:
    """DDIM's levels [steps + 1] of a discrete-time denoiser; one line for any other model or a Karras option."""
    if not isinstance(denoiser, DiscreteDDPMPrecond):
        raise DiffscoreError("--grid ddim needs a discrete-time model (a Stable Diffusion U-Net); use --grid karras")
    if any(v is not None for v in (options.sigma_min, options.sigma_max, options.rho)):
        raise DiffscoreError("--grid ddim takes the model's timestep levels: leave out --sigma_min/max and --rho")
    try:
        return ddim_sigmas(denoiser.sigmas, steps)
    except ValueError as e:
        raise DiffscoreError(f"--steps: {e}") from None


class DiffusionSampler(Sampler):
    """Samples of ``denoiser`` (a preconditioned network D(x; sigma, cond)) under ``options`` over ``defaults``.

    ``trained``: the speed switches the model trained with (the default on CUDA); ``prompts``: captions of a text
    model (seed s gets prompts[s % n]; default: options.prompt); ``gaussian``: the data's Gaussian for a teleport
    skip; ``progress``: a bar over the network evaluations of each batch; ``guide``: the opened --guide network
    (a denoiser of the same data; conditioned like this one, or unconditional), which moves with ``networks``.
    """

    def __init__(
        self,
        denoiser: Preconditioning,
        defaults: SamplerDefaults,
        options: SamplingOptions | None = None,
        *,
        trained: Speed = Speed(),
        prompts: Sequence[str] | None = None,
        gaussian: GaussianDenoiser | None = None,
        progress: bool = False,
        guide: Preconditioning | None = None,
    ) -> None:
        options = options or SamplingOptions()
        networks = nn.ModuleDict({"denoiser": denoiser} | ({"guide": guide} if guide is not None else {}))
        super().__init__(networks, denoiser.backbone, options, prompts)
        self.guide = guide
        self._check_guide()
        self.denoiser, self.defaults, self.trained, self.progress = denoiser, defaults, trained, progress
        self.name = options.sampler or defaults.sampler
        self.steps = options.steps or defaults.steps
        extra = options.sampler_kwargs
        if extra is None:  # the model's own options belong to its own sampler
            extra = (defaults.sampler_kwargs or {}) if self.name == defaults.sampler else {}
        self.sampler_kwargs = dict(extra)
        self._check_sampler()
        self.sigmas = sampler_grid(denoiser, defaults, options, self.steps)  # [steps + 1]
        self.gaussian = gaussian
        self.teleport_skip = self.teleport_skip_for(options.teleport)
        if self.teleport_skip and gaussian is None:
            raise DiffscoreError("teleportation needs the Gaussian of the training data (--teleport.gaussian)")
        if options.guidance != 1.0 and not self.conditional and guide is None:
            raise DiffscoreError(
                "--guidance without --guide needs a conditional model (class labels or text; classifier-free "
                "guidance); this one is not: give a guiding network with --guide"
            )

    def _check_guide(self) -> None:
        """The guide models the same data: the same shape, and the same labels or captions (or none: an
        unconditional guide, EDM2's classifier-free guidance by a separate network)."""
        where = f"--guide {self.options.guide}" if self.options.guide else "the guide"
        if self.guide is None:
            if self.options.guide is not None:
                raise DiffscoreError(f"{where} was not opened: pass the opened model to the sampler as guide=")
            return
        facts = self.guide.backbone
        if tuple(facts.data_shape) != self.data_shape:
            raise DiffscoreError(
                f"{where} makes {list(facts.data_shape)} samples, the model {list(self.data_shape)}; "
                "guide with a model of the same data"
            )
        if facts.label_dim not in (0, self.label_dim):
            raise DiffscoreError(
                f"{where} has {facts.label_dim} classes, the model {self.label_dim}; guide with a model of the same "
                "classes or an unconditional one"
            )
        if facts.text_encoder is not None and not self.text_conditioned:
            raise DiffscoreError(f"{where} reads captions, the model does not; guide with a model of the same kind")

    def _check_sampler(self) -> None:
        try:
            nfe(self.name, self.steps)
        except ValueError as e:
            raise DiffscoreError(f"--sampler/--steps: {e}") from None
        unknown = set(self.sampler_kwargs) - set(inspect.signature(get_sampler(self.name)).parameters)
        if unknown:
            raise DiffscoreError(f"--sampler_kwargs {sorted(unknown)} are not options of the {self.name} sampler")

    def teleport_skip_for(self, opts: TeleportOptions) -> int:
        """The leading steps ``opts`` skip on this grid (--teleport.sigma: those whose start lies above it)."""
        if not opts.wanted:
            return 0
        skip = opts.skip if opts.skip is not None else skip_for_sigma(self.sigmas, opts.sigma)
        if not 0 <= skip < self.steps:
            raise DiffscoreError(f"--teleport.skip must be in 0..{self.steps - 1} for {self.steps} steps, got {skip}")
        return skip

    @property
    def nfe(self) -> int:
        """Denoiser evaluations per sample, teleported steps excluded (classifier-free guidance counts once)."""
        return nfe(self.name, self.steps - self.teleport_skip)

    @property
    def full_nfe(self) -> int:
        """Evaluations without teleportation."""
        return nfe(self.name, self.steps)

    def speed(self) -> Speed:
        """(bf16, channels-last, compiled) for this run: on CUDA as the model trained unless the options say
        otherwise; the CPU samples eager in fp32."""
        if self.device.type != "cuda":
            return Speed()
        o, t = self.options, self.trained
        return Speed(
            bf16=t.bf16 if o.precision is None else o.precision == "bf16",
            channels_last=t.channels_last if o.channels_last is None else o.channels_last,
            compiled=t.compiled if o.compile is None else o.compile,
        )

    @torch.no_grad()
    def generate(self, seeds: Sequence[int]) -> Tensor:
        """Samples x0 [len(seeds), *data_shape] (Karras et al. 2022, Algorithm 2 for heun; generate.py's seeds)."""
        generators, noise, cond = self.start(seeds)
        sigmas = self.sigmas
        x = noise * float(sigmas[0])
        if self.teleport_skip:
            x, sigmas = teleport(self.gaussian.to(self.device), x, sigmas, self.teleport_skip)
        extra = dict(self.sampler_kwargs)
        if extra.get("s_churn", 0) > 0:  # churn noise from each seed's own stream
            extra["generator"] = generators
        sampler = get_sampler(self.name)
        if "round_sigma" in inspect.signature(sampler).parameters:
            extra["round_sigma"] = self.denoiser.round_sigma
        denoiser = self._guided(fast_denoiser(self.denoiser, self.speed()))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.nfe, desc="sampler", unit="eval", leave=False, dynamic_ncols=True)
            denoiser = ticking(denoiser, bar)
        try:
            with self.evaluating():
                return sampler(denoiser, x, sigmas, cond, **extra)
        finally:
            if bar is not None:
                bar.close()

    def _guided(self, denoiser):
        """``denoiser`` under the options' guidance: by the guide network if there is one (an unconditional guide
        is called without the condition), else classifier-free; only in the guidance interval if one is given."""
        w, interval = self.options.guidance, self.options.guidance_interval
        if w == 1.0:
            return denoiser
        guiding = None
        if self.guide is not None:
            guide_net = fast_denoiser(self.guide, self.speed())
            conditional = self.guide.backbone.label_dim > 0 or self.guide.backbone.text_encoder is not None

            def guiding(x, sigma, cond=None, aug_label=None):
                return guide_net(x, sigma, cond if conditional else None, aug_label)

        return guided_denoiser(denoiser, w, guiding=guiding, interval=tuple(interval) if interval else None)
