"""The NTKProbe callback: the NTK measurements of score regression (Han, Razaviyayn & Xu 2024; measured by
diffscore.probes.ntk) every N optimizer steps of a run, logged as ``ntk/*``, with the early-stopping point."""

from __future__ import annotations

import math

from lightning.pytorch import Callback, LightningModule, Trainer

from diffscore.errors import DiffscoreError
from diffscore.io import write_json
from diffscore.lit.callbacks.run_log import append_jsonl
from diffscore.lit.datamodules.base import split_images
from diffscore.lit.datamodules.tensor import GMMDataModule
from diffscore.lit.modules.diffusion import optimizer_config
from diffscore.lit.modules.regression import RegressionDiffusionModule
from diffscore.lit.run_dir import run_dir
from diffscore.probes.ntk import SIGMAS, BackboneOutput, NTKMeasurer, NTKSettings, plain_sgd_eta


def measurer_of(trainer: Trainer, pl_module: LightningModule, settings: NTKSettings) -> NTKMeasurer:
    """The NTK measurer of a run: its data module's train/held-out points, exact mixture and regression set."""
    dm = trainer.datamodule
    heldout = split_images(dm, "val")
    if heldout is None or len(heldout) == 0:
        raise DiffscoreError(f"{type(dm).__name__} has no 'val' split; the NTK probe needs held-out points")
    regression_set = pl_module.regression_set() if isinstance(pl_module, RegressionDiffusionModule) else None
    mixture = dm.mixture if isinstance(dm, GMMDataModule) else None
    coefficients = pl_module.denoiser.coefficients
    return NTKMeasurer(split_images(dm, "train"), heldout, coefficients, settings, mixture, regression_set)


class NTKProbe(Callback):
    """Every ``every_n_steps`` optimizer steps (and at the start): the NTK measurements of the module's raw
    weights (the ones gradient descent moves), logged as ``ntk/*`` to the loggers and metrics.jsonl; at the end,
    ``<run>/probes/ntk.json`` with the early-stopping point."""

    def __init__(
        self,
        every_n_steps: int = 100,  # probe cadence in optimizer steps
        sigmas: list[float] = list(SIGMAS),  # noqa: B006 - noise levels of the probe points
        num_points: int = 32,  # training and held-out points each, noised at every sigma
        kernel: str = "auto",  # "full" Gram (vector data), "trace_estimate" (random projections), or "auto"
        num_kernel_points: int = 128,  # kernel-set size when the module has no regression set
        num_projections: int = 8,  # projections of the trace estimate
        top_k: int = 5,  # logged eigenvalues
        twin: bool = True,  # compare with the kernel twin (full-batch plain SGD on a RegressionDiffusionModule)
        stop_at_minimum: bool = False,  # stop training once the criterion has not improved for `patience` probes
        patience: int = 10,  # probes without improvement before stopping
        seed: int = 0,  # seed of the probe points and their noise
    ) -> None:
        if every_n_steps < 1 or patience < 1:
            raise DiffscoreError("NTKProbe: every_n_steps and patience must be >= 1")
        try:
            self.settings = NTKSettings(
                tuple(sigmas), num_points, kernel, num_kernel_points, num_projections, top_k, seed
            )
        except DiffscoreError as e:
            raise DiffscoreError(f"NTKProbe.{e}") from None
        self.every_n_steps, self.use_twin = every_n_steps, twin
        self.stop_at_minimum, self.patience = stop_at_minimum, patience
        self.measurer: NTKMeasurer | None = None
        self.best_step: int | None = None
        self.best_value = math.inf
        self.stopped_at: int | None = None
        self.history: list[dict[str, float]] = []
        self._K0 = self._twin = None
        self._step0 = 0
        self._last = -1
        self._since_best = 0

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.measurer = measurer_of(trainer, pl_module, self.settings)
        self.eta, why = None, "twin is off"
        if self.use_twin:
            if not isinstance(pl_module, RegressionDiffusionModule):
                why = "the module has no fixed regression set (use RegressionDiffusionModule)"
            elif self.measurer.kernel != "full":
                why = "the twin needs the full Gram (kernel: full)"
            elif trainer.accumulate_grad_batches != 1 or pl_module.lr_rampup_images:
                why = "gradient accumulation or a learning-rate ramp-up"
            else:
                n, out_dim = self.measurer.kernel_set[2].shape
                self.eta, why = plain_sgd_eta(optimizer_config(trainer.optimizers[0]), n, out_dim)
            if self.eta is None:
                print(f"diffscore: NTKProbe runs without the kernel twin: {why}", flush=True)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step != self._last:
            self.probe(trainer, pl_module)

    def probe(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float] | None:
        step = self._last = trainer.global_step
        stop = False
        scalars = None
        if trainer.is_global_zero:
            if self.measurer is None:
                self._prepare(trainer, pl_module)
            scalars = self.measure(pl_module, step)
            stop = self.stop_at_minimum and self._since_best >= self.patience
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
            append_jsonl(trainer, {"step": step, **scalars})
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            self.stopped_at = step
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(
                    f"diffscore: NTKProbe stops training at step {step}: {self.measurer.criterion} is lowest "
                    f"at step {self.best_step} ({self.best_value:.4g})",
                    flush=True,
                )
        return scalars

    def measure(self, pl_module: LightningModule, step: int) -> dict[str, float]:
        m = self.measurer
        view = BackboneOutput(pl_module.denoiser)
        was_training = pl_module.training
        pl_module.eval()
        try:
            f_now = m.outputs(view)
            scalars = m.score_errors(f_now[0])
            K = m.gram(view, *(t.to(pl_module.device) for t in m.kernel_set[:2])).cpu()
            if self._K0 is None:
                self._K0, self._step0 = K, step
                if self.eta is not None:
                    self._twin = (m.twin(view, self.eta), f_now)
            scalars.update(m.kernel_scalars(K, self._K0))
            if self._twin is not None:
                scalars.update(m.twin_scalars(*self._twin, f_now, step - self._step0))
        finally:
            pl_module.train(was_training)
        value = scalars[m.criterion]
        if value < self.best_value:
            self.best_value, self.best_step, self._since_best = value, step, 0
        else:
            self._since_best += 1
        scalars["ntk/best_step"] = float(self.best_step)
        self.history.append({"step": step, **scalars})
        return scalars

    def summary(self) -> dict:
        return {
            "criterion": self.measurer.criterion if self.measurer else None,
            "exact_score": self.measurer.exact_name if self.measurer else None,
            "best_step": self.best_step,
            "best_value": self.best_value if self.best_step is not None else None,
            "stopped_at": self.stopped_at,
            "history": self.history,
        }

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or self.measurer is None:
            return
        path = run_dir(trainer) / "probes" / "ntk.json"
        write_json(path, self.summary())
        print(
            f"diffscore: NTKProbe: lowest {self.measurer.criterion} at step {self.best_step} "
            f"({self.best_value:.4g}); {path}",
            flush=True,
        )
