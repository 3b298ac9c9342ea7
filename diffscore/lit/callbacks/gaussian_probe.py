"""The GaussianScoreProbe callback: every N steps, the EV of the EMA network's score against the Gaussian, GMM and
delta-mixture scores of the training data (Wang & Vastola 2024, Fig. 2), measured by diffscore.probes.gaussian."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from diffscore.lit.callbacks.ema import ema_module
from diffscore.lit.callbacks.run_log import append_jsonl
from diffscore.lit.datamodules.base import train_images
from diffscore.lit.run_dir import run_dir
from diffscore.probes.gaussian import NetworkDenoiser, build_references, explained_variance_table, plot_table


class GaussianScoreProbe(Callback):
    """Every ``every_n_steps`` steps: EV of the EMA network's score against the references, per sigma."""

    def __init__(self, every_n_steps: int = 1000, gmm_components: list[int] = [10], num_points: int = 256) -> None:  # noqa: B006
        self.every_n_steps = every_n_steps
        self.gmm_components = gmm_components
        self.num_points = num_points
        self.refs = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not (self.every_n_steps and step % self.every_n_steps == 0) or not trainer.is_global_zero:
            return
        if self.refs is None:
            self.train = train_images(trainer.datamodule)
            self.refs = build_references(self.train.flatten(1).double(), self.gmm_components)
        module = ema_module(trainer, pl_module)
        was_training = module.training
        module.eval()
        table = explained_variance_table(
            NetworkDenoiser(module.denoiser), self.train, self.refs, num_points=self.num_points
        )
        module.train(was_training)
        scalars = {f"probe/ev_{ref}_s{s:g}": v for ref, row in table.items() for s, v in row.items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        append_jsonl(trainer, {"step": step, **scalars})
        plot_table(table, run_dir(trainer) / "probes" / f"gaussian_step{step:07d}.png", f"step {step}")
