"""Teleportation for `diffscore sample` / `evaluate`: the Gaussian model of the training data that replaces
the first sampler steps (Wang & Vastola 2024), fitted once from the checkpoint's data and cached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffscore.core.gaussian import GaussianDenoiser
from diffscore.errors import DiffscoreError


@dataclass
class TeleportOptions:
    """Skip the first sampler steps with the closed-form Gaussian PF-ODE."""

    skip: int | None = None  # skip this many leading steps (Heun 18 with skip k: 2(18 - k) - 1 evaluations)
    sigma: float | None = None  # or: start the network at the first grid sigma <= this
    gaussian: str | None = None  # cache file of the fitted Gaussian (fitted and written if missing)
    rank: int | None = None  # keep the top-r principal components (None: the full covariance)


def gaussian_for_checkpoint(opts: TeleportOptions, ckpt_path: str | Path) -> GaussianDenoiser:
    """The Gaussian (mean, covariance) of the checkpoint's training data, from the cache file if there is one."""
    if opts.skip is None and opts.sigma is None:
        raise DiffscoreError("--teleport needs --teleport.skip K or --teleport.sigma S")
    if opts.skip is not None and opts.sigma is not None:
        raise DiffscoreError("give --teleport.skip or --teleport.sigma, not both")
    if opts.gaussian and Path(opts.gaussian).is_file():
        return GaussianDenoiser.load(opts.gaussian)
    from diffscore.lit.checkpoint import load_checkpoint_datamodule
    from diffscore.lit.evaluate import train_images

    dm = load_checkpoint_datamodule(ckpt_path)
    if dm is None:
        raise DiffscoreError(f"{ckpt_path} does not name its data; pass --teleport.gaussian with a fitted file")
    gaussian = GaussianDenoiser.from_data(train_images(dm), rank=opts.rank)
    if opts.gaussian:
        gaussian.save(opts.gaussian)
    return gaussian
