"""The sampler a command draws with: the loaded model's sampler under the user's options, with the Gaussian of the
training data that teleportation needs (Wang & Vastola 2024) fitted once and cached in a file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from diffscore.core.gaussian import GaussianDenoiser
from diffscore.lit.datamodules.base import train_images
from diffscore.lit.datamodules.from_file import training_data
from diffscore.loading.model import LoadedModel
from diffscore.sampling.base import Sampler
from diffscore.sampling.options import SamplingOptions, TeleportOptions


def teleport_gaussian(model: LoadedModel, opts: TeleportOptions) -> GaussianDenoiser:
    """The Gaussian (mean, covariance) of the model's training data, from the cache file if there is one."""
    if opts.gaussian and Path(opts.gaussian).is_file():
        return GaussianDenoiser.load(opts.gaussian)
    hint = "--teleport.gaussian FILE (a fitted Gaussian) or --teleport.data PATH (an EDM dataset ZIP or folder)"
    train = train_images(training_data(model, opts.data, what_to_pass=hint))
    gaussian = GaussianDenoiser.from_data(train, rank=opts.rank)
    if opts.gaussian:
        gaussian.save(opts.gaussian)
    return gaussian


def command_sampler(
    model: LoadedModel, options: SamplingOptions, prompts: Sequence[str] | None = None, progress: bool = False
) -> Sampler:
    """``model.sampler(options)``, with the teleport Gaussian if asked for; says which level teleportation starts
    at and the evaluations it saves (a --teleport.sigma between grid levels moves to the next level down)."""
    if not options.teleport.wanted or model.one_step:  # (a one-step generator refuses --teleport)
        return model.sampler(options, prompts=prompts, progress=progress)
    plain = model.sampler(replace(options, teleport=TeleportOptions()), prompts=prompts)
    plain.teleport_skip_for(options.teleport)  # every option checked before any data is read
    gaussian = teleport_gaussian(model, options.teleport)
    sampler = model.sampler(options, prompts=prompts, gaussian=gaussian, progress=progress)
    skip, level = sampler.teleport_skip, float(sampler.sigmas[sampler.teleport_skip])
    asked = f" (asked {options.teleport.sigma:g})" if options.teleport.sigma is not None else ""
    print(
        f"diffscore: teleporting to sigma {level:.3g}{asked}: {sampler.name} with {sampler.steps - skip} of "
        f"{sampler.steps} steps, {sampler.nfe} instead of {sampler.full_nfe} evaluations",
        flush=True,
    )
    return sampler
