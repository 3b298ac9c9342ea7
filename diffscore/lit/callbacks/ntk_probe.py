"""NTK probes of score regression (Han, Razaviyayn & Xu 2024, arXiv 2401.15604).

Denoising score matching is regression: with D = c_skip x + c_out F and EDM's weighting, the loss of a point is
exactly mean_d (F(x, sigma) - y)^2 with the label y = (x0 - c_skip x) / c_out, so the model of the regression is
the backbone output F (:class:`BackboneOutput`) and its tangent kernel is the one that drives training. On a fixed
probe set (training points and held-out points, each noised at ``sigmas`` with fixed noise) a probe measures:

- ``ntk/score_error_{train,heldout}``: mean_d (F - F*)^2, F* the target of the exact denoiser (the data module's
  analytic mixture for GMM data, else the delta mixture of the training set); this equals
  lambda(sigma) mean_d (D - D*)^2 = sigma^4 lambda(sigma) mean_d (s - s*)^2, the EDM-weighted score error;
  per sigma on held-out points as ``ntk/score_error_s<sigma>``; ``ntk/heldout_loss``: the loss on the held-out
  points with their fixed noise (what one can measure without an oracle);
- on a kernel set (the training regression set of a RegressionDiffusionModule, else noised training points):
  the Gram K_t, its top eigenvalues ``ntk/eig<i>``, kernel-target alignment ``ntk/alignment`` with the labels and
  the drift ``ntk/drift`` = ||K_t - K_0||_F / ||K_0||_F against the first probe;
- for full-batch plain SGD on a RegressionDiffusionModule: the kernel twin (KernelTwin with K_0 and eta =
  2 lr / (N O), after the same number of steps) against the network: ``ntk/twin_rel_error`` =
  ||F_twin - F_net|| / ||F_net - F_0|| on the probe set (``_train`` on the training set), and the twin's own
  ``ntk/twin_score_error_heldout``.

The step with the lowest ``ntk/score_error_heldout`` (analytic data) or ``ntk/heldout_loss`` is the early-stopping
point; ``stop_at_minimum`` stops training after ``patience`` probes without improvement.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor, nn

from diffscore.core.gaussian import DeltaMixtureDenoiser
from diffscore.core.ntk import (
    KernelTwin,
    empirical_ntk,
    flatten_gram,
    kernel_target_alignment,
    ntk_drift,
    ntk_spectrum,
    ntk_trace_estimate,
    relative_error,
)
from diffscore.core.precond import EDMPrecond, edm_coefficients
from diffscore.errors import DiffscoreError
from diffscore.io import write_json
from diffscore.lit.callbacks.run_log import append_jsonl
from diffscore.lit.data.base import train_images
from diffscore.lit.data.tensor import GMMDataModule
from diffscore.lit.modules.regression import RegressionDiffusionModule
from diffscore.lit.run_dir import run_dir

SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0)
KERNEL_MODES = ("auto", "full", "trace_estimate")


class BackboneOutput(nn.Module):
    """The regression model of an EDM denoiser: (x [B, ...], sigma [B]) -> F(c_in x, c_noise) flattened, [B, O]."""

    def __init__(self, denoiser: EDMPrecond) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        _, _, c_in, c_noise = edm_coefficients(sigma.to(x.dtype), self.denoiser.sigma_data)
        bshape = (-1,) + (1,) * (x.ndim - 1)
        return self.denoiser.backbone(x * c_in.view(bshape), c_noise, None, None).flatten(1)


def regression_target(x: Tensor, sigma: Tensor, denoised: Tensor, sigma_data: float) -> Tensor:
    """The F that makes D = c_skip x + c_out F equal ``denoised``: (denoised - c_skip x) / c_out, [B, O] float64."""
    c_skip, c_out, _, _ = edm_coefficients(sigma.double(), sigma_data)
    bshape = (-1,) + (1,) * (x.ndim - 1)
    return ((denoised.double() - c_skip.view(bshape) * x.double()) / c_out.view(bshape)).flatten(1)


def split_data(dm: LightningDataModule, split: str) -> Tensor:
    """A DataModule's split as float data (uint8 images mapped to [-1, 1] as in training)."""
    if split == "train":
        return train_images(dm)
    ds = dm.dataset(split)
    if ds is None or len(ds) == 0:
        raise DiffscoreError(f"{type(dm).__name__} has no {split!r} split; the NTK probe needs held-out points")
    loader = torch.utils.data.DataLoader(ds, batch_size=512)
    return torch.cat([dm.on_after_batch_transfer(batch, 0)[0].float() for batch in loader])


def plain_sgd_eta(optimizer: torch.optim.Optimizer, num_points: int, out_dim: int) -> tuple[float | None, str]:
    """(eta, "") for the kernel twin of full-batch plain SGD on the mean loss over N*O entries, else (None, why)."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None, f"the optimizer is {type(optimizer).__name__}, not plain torch.optim.SGD"
    group = optimizer.param_groups[0]
    if group.get("momentum") or group.get("weight_decay") or group.get("nesterov"):
        return None, "SGD has momentum or weight decay"
    return 2 * float(group["lr"]) / (num_points * out_dim), ""


class NTKMeasurer:
    """The fixed probe and kernel sets of one run and the measurements on them (everything but the schedule).

    dm: the run's DataModule; regression_set: (x0, sigma, noise) of a RegressionDiffusionModule (the kernel set
    and the twin's training set) or None; kernel: "full" (the exact Gram, vector data), "trace_estimate"
    (random projections, large models) or "auto" (full for vector data).
    """

    def __init__(
        self,
        dm: LightningDataModule,
        sigma_data: float,
        regression_set: tuple[Tensor, Tensor, Tensor] | None = None,
        sigmas: tuple[float, ...] = SIGMAS,
        num_points: int = 32,
        kernel: str = "auto",
        num_kernel_points: int = 128,
        num_projections: int = 8,
        top_k: int = 5,
        seed: int = 0,
    ) -> None:
        self.sigma_data, self.sigmas, self.top_k, self.seed = sigma_data, tuple(sigmas), top_k, seed
        self.num_projections = num_projections
        train, heldout = split_data(dm, "train"), split_data(dm, "val")
        mixture = dm.mixture if isinstance(dm, GMMDataModule) else None
        self.exact = mixture if mixture is not None else DeltaMixtureDenoiser(train)
        self.exact_name = "analytic mixture" if mixture is not None else "delta mixture of the training set"
        self.criterion = "ntk/score_error_heldout" if mixture is not None else "ntk/heldout_loss"
        self.kernel = ("full" if train.ndim == 2 else "trace_estimate") if kernel == "auto" else kernel
        g = torch.Generator().manual_seed(seed)
        parts: dict[str, list[Tensor]] = {k: [] for k in ("x", "sigma", "noisy", "exact", "heldout", "sigma_idx")}
        for is_heldout, data in ((False, train), (True, heldout)):
            x0 = data[torch.randperm(len(data), generator=g)[:num_points]]
            for i, s in enumerate(self.sigmas):
                x = x0 + s * torch.randn(x0.shape, generator=g)
                sig = torch.full((len(x0),), float(s))
                parts["x"].append(x)
                parts["sigma"].append(sig)
                parts["noisy"].append(regression_target(x, sig, x0, sigma_data))
                parts["exact"].append(regression_target(x, sig, self.exact(x.double(), sig.double()), sigma_data))
                parts["heldout"].append(torch.full((len(x0),), is_heldout))
                parts["sigma_idx"].append(torch.full((len(x0),), i))
        self.probe = {k: torch.cat(v) for k, v in parts.items()}
        if regression_set is not None:
            x0, sig, noise = regression_set
            bshape = (-1,) + (1,) * (x0.ndim - 1)
            xk = x0 + sig.view(bshape) * noise
            self.kernel_set = (xk, sig, regression_target(xk, sig, x0, sigma_data))
        else:
            pick = ~self.probe["heldout"]
            self.kernel_set = tuple(self.probe[k][pick][:num_kernel_points] for k in ("x", "sigma", "noisy"))

    def gram(self, view: BackboneOutput, x1: Tensor, s1: Tensor, x2: Tensor | None = None, s2: Tensor | None = None):
        """The Gram of the current weights: flattened full NTK [n1 O, n2 O], or the trace estimate [n1, n2]."""
        params = {k: p for k, p in view.named_parameters() if p.requires_grad}
        x2, s2 = (x1, s1) if x2 is None else (x2, s2)
        if self.kernel == "full":
            return flatten_gram(empirical_ntk(view, params, x1, x2, (s1, s2)))
        g = torch.Generator().manual_seed(self.seed)  # the same projections at every probe
        return ntk_trace_estimate(view, params, x1, x2, (s1, s2), self.num_projections, generator=g)

    @torch.no_grad()
    def outputs(self, view: BackboneOutput) -> tuple[Tensor, Tensor]:
        """The network's F on the probe set and on the kernel set, float64."""
        device = next(view.parameters()).device
        fp = view(self.probe["x"].to(device), self.probe["sigma"].to(device)).double().cpu()
        fk = view(self.kernel_set[0].to(device), self.kernel_set[1].to(device)).double().cpu()
        return fp, fk

    def score_errors(self, f_probe: Tensor, prefix: str = "ntk/") -> dict[str, float]:
        err = (f_probe - self.probe["exact"]).square().mean(1)  # [n]
        loss = (f_probe - self.probe["noisy"]).square().mean(1)
        held = self.probe["heldout"]
        out = {
            f"{prefix}score_error_train": float(err[~held].mean()),
            f"{prefix}score_error_heldout": float(err[held].mean()),
            f"{prefix}heldout_loss": float(loss[held].mean()),
        }
        if prefix == "ntk/":
            for i, s in enumerate(self.sigmas):
                out[f"ntk/score_error_s{s:g}"] = float(err[held & (self.probe["sigma_idx"] == i)].mean())
        return out

    def kernel_scalars(self, K: Tensor, K_0: Tensor | None) -> dict[str, float]:
        out = {"ntk/alignment": kernel_target_alignment(K, self.kernel_set[2])}
        for i, lam in enumerate(ntk_spectrum(K, self.top_k).tolist()):
            out[f"ntk/eig{i}"] = lam
        if K_0 is not None:
            out["ntk/drift"] = ntk_drift(K, K_0)
        return out

    def twin(self, view: BackboneOutput, eta: float) -> KernelTwin:
        """The kernel twin of gradient descent from the current weights (its K_0, F_0)."""
        device = next(view.parameters()).device
        xk, sk, yk = (t.to(device) for t in self.kernel_set)
        xp, sp = self.probe["x"].to(device), self.probe["sigma"].to(device)
        K = self.gram(view, xk, sk).cpu()
        K_cross = self.gram(view, xp, sp, xk, sk).cpu()
        f_probe, f_kernel = self.outputs(view)
        return KernelTwin(K, f_kernel, yk.cpu(), eta, K_cross=K_cross, f0_cross=f_probe)


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
        if every_n_steps < 1 or num_points < 1 or num_kernel_points < 1 or top_k < 0 or patience < 1:
            raise DiffscoreError("NTKProbe: every_n_steps, num_points, num_kernel_points, patience must be >= 1")
        if kernel not in KERNEL_MODES:
            raise DiffscoreError(f"NTKProbe.kernel must be one of {KERNEL_MODES}, got {kernel!r}")
        if not sigmas or any(s <= 0 for s in sigmas):
            raise DiffscoreError(f"NTKProbe.sigmas must be positive, got {sigmas}")
        self.every_n_steps, self.sigmas, self.num_points = every_n_steps, tuple(sigmas), num_points
        self.kernel, self.num_kernel_points, self.num_projections = kernel, num_kernel_points, num_projections
        self.top_k, self.use_twin, self.seed = top_k, twin, seed
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
        regression_set = pl_module.regression_set() if isinstance(pl_module, RegressionDiffusionModule) else None
        self.measurer = NTKMeasurer(
            trainer.datamodule,
            pl_module.denoiser.sigma_data,
            regression_set,
            self.sigmas,
            self.num_points,
            self.kernel,
            self.num_kernel_points,
            self.num_projections,
            self.top_k,
            self.seed,
        )
        self.eta, why = None, "twin is off"
        if self.use_twin:
            if regression_set is None:
                why = "the module has no fixed regression set (use RegressionDiffusionModule)"
            elif self.measurer.kernel != "full":
                why = "the twin needs the full Gram (kernel: full)"
            elif trainer.accumulate_grad_batches != 1 or pl_module.lr_rampup_images:
                why = "gradient accumulation or a learning-rate ramp-up"
            else:
                n, out_dim = self.measurer.kernel_set[2].shape
                self.eta, why = plain_sgd_eta(trainer.optimizers[0], n, out_dim)
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
            f_probe, f_kernel = m.outputs(view)
            scalars = m.score_errors(f_probe)
            device = pl_module.device
            K = m.gram(view, *(t.to(device) for t in m.kernel_set[:2])).cpu()
            if self._K0 is None:
                self._K0, self._step0 = K, step
                if self.eta is not None:
                    self._twin = (m.twin(view, self.eta), f_probe, f_kernel)
            scalars.update(m.kernel_scalars(K, self._K0))
            if self._twin is not None:
                twin, f0_probe, f0_kernel = self._twin
                t_kernel, t_probe = twin.after_steps(step - self._step0)
                scalars["ntk/twin_rel_error"] = relative_error(t_probe, f_probe, f0_probe)
                scalars["ntk/twin_rel_error_train"] = relative_error(t_kernel, f_kernel, f0_kernel)
                scalars.update(m.score_errors(t_probe, prefix="ntk/twin_"))
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
