"""A callback that draws a fixed-seed sample grid from the EMA weights: PNG on disk and to the logger."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from diffscore.io import atomic_write, pyplot
from diffscore.lit.callbacks.ema import ema_module
from diffscore.lit.callbacks.status import say
from diffscore.lit.datamodules.tensor import TensorDataModule
from diffscore.lit.run_dir import run_dir
from diffscore.loading.model import LoadedModel
from diffscore.loading.open import open_guide
from diffscore.sampling.options import SamplingOptions


def save_png_atomic(path: Path, fig_or_tensor, nrow: int = 8) -> None:
    """Write an image grid [N, C, H, W] in [-1, 1] (or a matplotlib figure) to ``path`` via a temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        if isinstance(fig_or_tensor, Tensor):
            from torchvision.utils import save_image

            images = (fig_or_tensor.float() + 1) / 2  # [N, C, H, W] in [0, 1]
            if images.shape[-1] < 32:  # blow tiny images (8x8 digits) up so that a person can see them
                images = torch.nn.functional.interpolate(images, scale_factor=32 // images.shape[-1], mode="nearest")
            save_image(images, tmp, nrow=nrow, padding=2, pad_value=0.5, format="png")
        else:
            fig_or_tensor.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def scatter_figure(samples: Tensor, reference: Tensor | None, title: str):
    """A 2-D scatter (first two coordinates) of samples over reference data."""
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    if reference is not None:
        ref = reference[:4096].float()
        ax.scatter(ref[:, 0], ref[:, 1] if ref.shape[1] > 1 else ref[:, 0] * 0, s=2, alpha=0.3, label="data")
    ax.scatter(samples[:, 0], samples[:, 1] if samples.shape[1] > 1 else samples[:, 0] * 0, s=4, label="samples")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=3)
    ax.set_aspect("equal", adjustable="datalim")
    return fig


class CallbackGuide:
    """The guiding network of a sampling callback (``guide``: a model file, opened once, on first use) and the
    options it samples with; the guide follows the module's device."""

    def __init__(self, guide: str | None, guidance: float, **options) -> None:
        self.options = SamplingOptions(guidance=guidance, guide=guide, **options)  # checked here, at config time
        self._model: LoadedModel | None = None

    def sampler(self, module: LightningModule):
        """``module.sampler`` under the options, with the guide on the module's device."""
        if self.options.guide is None:
            return module.sampler(self.options)
        if self._model is None:
            self._model = open_guide(self.options.guide)
        return module.sampler(self.options, guide=self._model.network.to(module.device))


class SampleGrid(Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of fit, sample ``num_samples`` fixed seeds with the
    module's default sampler on the EMA weights (the raw weights if no EMA callback) and write
    ``<log_dir>/samples/grid_step<N>.png``; image data give an image grid, vector data a scatter plot. ``guidance``
    with ``guide`` samples with guidance by a second network (a model file; autoguidance), with ``guidance`` alone
    classifier-free guidance."""

    def __init__(
        self,
        every_n_steps: int = 1000,  # 0 = only at the end of fit
        num_samples: int = 64,  # grid size (a square number looks best)
        seed: int = 0,  # first seed; the same seeds every time, so grids are comparable over training
        num_steps: int | None = None,  # sampler steps (default: the module's num_steps)
        sampler: str | None = None,  # sampler name (default: the module's sampler)
        guidance: float = 1.0,  # guidance scale w (1: none)
        guide: str | None = None,  # the guiding network's file (as --guide; None: classifier-free guidance)
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.num_steps = num_steps
        self.sampler = sampler
        self.guiding = CallbackGuide(guide, guidance, steps=num_steps, sampler=sampler)
        self.last_path: Path | None = None
        self._last_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.write(trainer, pl_module)

    def write(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        step = self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return None
        module = ema_module(trainer, pl_module)
        seeds = range(self.seed, self.seed + self.num_samples)
        sampler = self.guiding.sampler(module)
        say(trainer, f"step {step}: sampling the {self.num_samples}-sample grid ({sampler.nfe} evaluations each)")
        samples = sampler.images(seeds).float().cpu()
        path = run_dir(trainer) / "samples" / f"grid_step{step:07d}.png"
        if samples.ndim == 4:
            save_png_atomic(path, samples.clamp(-1, 1), nrow=max(1, math.isqrt(len(samples))))
        else:
            dm = trainer.datamodule
            ref = dm.splits["train"][0] if isinstance(dm, TensorDataModule) and dm.splits else None
            fig = scatter_figure(samples, ref, f"samples at step {step}")
            save_png_atomic(path, fig)
            pyplot().close(fig)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[str(path)], step=step)
        self.last_path = path
        return path
