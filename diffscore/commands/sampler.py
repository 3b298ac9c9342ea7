"""The sampler a command draws with: the loaded model's sampler under the user's options, with the Gaussian of the
training data that teleportation needs (Wang & Vastola 2024) fitted once and cached in a file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from diffscore.core.gaussian import GaussianDenoiser
from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.base import train_images
from diffscore.lit.datamodules.from_file import training_data
from diffscore.loading.files import read_torch_file
from diffscore.loading.model import LoadedModel
from diffscore.sampling.base import Sampler
from diffscore.sampling.options import SamplingOptions, TeleportOptions
from diffscore.sampling.speed import COMPILE_PAYS_AFTER, worth_compiling


def read_gaussian(path: Path) -> GaussianDenoiser:
    """A Gaussian cache file (what ``GaussianDenoiser.save`` writes), read safely: finite float tensors of matching
    shapes, or one line naming the file."""
    state = read_torch_file(path, what="Gaussian (--teleport.gaussian)")
    keys = ("mean", "eigvecs", "eigvals")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), torch.Tensor) for k in keys):
        raise DiffscoreError(f"--teleport.gaussian {path} is not a fitted Gaussian (mean, eigvecs, eigvals); remove it")
    if not all(torch.isfinite(state[k]).all() for k in keys):
        raise DiffscoreError(f"--teleport.gaussian {path} holds non-finite values; remove it and fit it again")
    try:
        return GaussianDenoiser.low_rank(state["mean"], state["eigvecs"], state["eigvals"])
    except (ValueError, RuntimeError) as e:
        raise DiffscoreError(f"--teleport.gaussian {path}: {e}; remove it and fit it again") from None


def teleport_gaussian(model: LoadedModel, opts: TeleportOptions) -> GaussianDenoiser:
    """The Gaussian (mean, covariance) of the model's training data, from the cache file if there is one."""
    if opts.gaussian and Path(opts.gaussian).exists():
        return read_gaussian(Path(opts.gaussian))
    hint = "--teleport.gaussian FILE (a fitted Gaussian) or --teleport.data PATH (an EDM dataset ZIP or folder)"
    train = train_images(training_data(model, opts.data, what_to_pass=hint))
    gaussian = GaussianDenoiser.from_data(train, rank=opts.rank)
    if opts.gaussian:
        gaussian.save(opts.gaussian)
    return gaussian


def compile_for(model: LoadedModel, options: SamplingOptions, samples_per_device: int) -> SamplingOptions:
    """``options`` with --compile decided where the user left it to the model: a model that trained compiled samples
    compiled on a GPU only when the run is long enough to pay for the compile (sampling.speed.worth_compiling)."""
    if options.compile is not None or not model.trained.compiled or model.one_step or not torch.cuda.is_available():
        return options
    nfe = model.sampler(replace(options, teleport=TeleportOptions())).nfe
    if worth_compiling(samples_per_device, nfe):
        return options
    print(
        f"diffscore: sampling eager: {samples_per_device} samples x {nfe} evaluations per device are too few for a "
        f"compile to pay (from {COMPILE_PAYS_AFTER:,}); --compile true compiles anyway",
        flush=True,
    )
    return replace(options, compile=False)


def command_sampler(
    model: LoadedModel,
    options: SamplingOptions,
    prompts: Sequence[str] | None = None,
    progress: bool = False,
    samples_per_device: int | None = None,
) -> Sampler:
    """``model.sampler(options)``, with the teleport Gaussian if asked for; says which level teleportation starts
    at and the evaluations it saves (a --teleport.sigma between grid levels moves to the next level down). With
    ``samples_per_device``, a compile is skipped when the run is too short for it to pay (compile_for)."""
    if samples_per_device is not None:
        options = compile_for(model, options, samples_per_device)
    if not options.teleport.wanted or model.one_step:  # (a one-step generator refuses --teleport)
        return model.sampler(options, prompts=prompts, progress=progress)
    plain = model.sampler(replace(options, teleport=TeleportOptions()), prompts=prompts)
    plain.teleport_skip_for(options.teleport)  # every option checked before any data is read
    gaussian = teleport_gaussian(model, options.teleport)
    if gaussian.mean.numel() != math.prod(model.data_shape):
        raise DiffscoreError(
            f"--teleport.gaussian {options.teleport.gaussian} is a Gaussian of {gaussian.mean.numel()} values, but the "
            f"model makes {list(model.data_shape)}; fit it to this model's data (another file name)"
        )
    sampler = model.sampler(options, prompts=prompts, gaussian=gaussian, progress=progress)
    skip, level = sampler.teleport_skip, float(sampler.sigmas[sampler.teleport_skip])
    asked = f" (asked {options.teleport.sigma:g})" if options.teleport.sigma is not None else ""
    print(
        f"diffscore: teleporting to sigma {level:.3g}{asked}: {sampler.name} with {sampler.steps - skip} of "
        f"{sampler.steps} steps, {sampler.nfe} instead of {sampler.full_nfe} evaluations",
        flush=True,
    )
    return sampler
