"""`--teleport.*` of `diffscore sample` / `evaluate`: the Gaussian model of the training data that replaces the first
sampler steps (Wang & Vastola 2024), fitted once from the checkpoint's data and cached in a file."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from diffscore.core.gaussian import GaussianDenoiser, skip_for_sigma
from diffscore.errors import DiffscoreError
from diffscore.lit.checkpoint import training_data
from diffscore.lit.data.base import train_images
from diffscore.lit.sampling import SamplingOptions


@dataclass
class TeleportOptions:
    """Skip the first sampler steps with the closed-form Gaussian PF-ODE."""

    skip: int | None = None  # skip this many leading steps (Heun 18 with skip k: 2(18 - k) - 1 evaluations)
    sigma: float | None = None  # or: start the network at the first grid sigma <= this
    gaussian: str | None = None  # cache file of the fitted Gaussian (fitted and written if missing)
    rank: int | None = None  # keep the top-r principal components (None: the full covariance)
    data: str | None = None  # fit it to this data set (EDM ZIP or folder; default: the checkpoint's data)

    @property
    def wanted(self) -> bool:
        return self.skip is not None or self.sigma is not None


def gaussian_for_checkpoint(
    opts: TeleportOptions, ckpt_path: str | Path, trust: bool = False, shape: tuple[int, ...] | None = None
) -> GaussianDenoiser:
    """The Gaussian (mean, covariance) of the checkpoint's training data, from the cache file if there is one."""
    if opts.skip is not None and opts.sigma is not None:
        raise DiffscoreError("give --teleport.skip or --teleport.sigma, not both")
    if opts.gaussian and Path(opts.gaussian).is_file():
        return GaussianDenoiser.load(opts.gaussian)
    hint = "--teleport.gaussian FILE (a fitted Gaussian) or --teleport.data PATH (an EDM dataset ZIP or folder)"
    train = train_images(training_data(ckpt_path, opts.data, trust, shape, what_to_pass=hint))
    gaussian = GaussianDenoiser.from_data(train, rank=opts.rank)
    if opts.gaussian:
        gaussian.save(opts.gaussian)
    return gaussian


def with_teleport(
    model, options: SamplingOptions, opts: TeleportOptions | None, ckpt_path: str, trust: bool = False
) -> SamplingOptions:
    """``options`` with the teleport skip and the Gaussian filled in; prints the evaluations it saves."""
    if opts is None or not opts.wanted:
        return options
    if model.one_step:
        raise DiffscoreError("this checkpoint is a one-step generator (NFE = 1): leave out --teleport")
    name, steps, _ = model.sampler_of(options)
    sigmas = model.sigmas(steps)
    skip = opts.skip if opts.skip is not None else skip_for_sigma(sigmas, opts.sigma)
    if not 0 <= skip < steps:
        raise DiffscoreError(f"--teleport.skip must be in 0..{steps - 1} for {steps} steps, got {skip}")
    gaussian = gaussian_for_checkpoint(opts, ckpt_path, trust, model.data_shape)
    options = replace(options, teleport_skip=skip, teleport_gaussian=gaussian)
    print(
        f"diffscore: teleporting to sigma {float(sigmas[skip]):.3g}: {name} with {steps - skip} of {steps} steps, "
        f"{model.nfe(options)} instead of {model.nfe(SamplingOptions(sampler=name, num_steps=steps))} evaluations",
        flush=True,
    )
    return options
