"""NTK probes of score regression (Han, Razaviyayn & Xu 2024, arXiv 2401.15604).

Denoising score matching is regression: with D = c_skip x + c_out F and EDM's weighting, the loss of a point is
exactly mean_d (F(x, sigma) - y)^2 with the label y = (x0 - c_skip x) / c_out, so the model of the regression is
the backbone output F (:class:`BackboneOutput`) and its tangent kernel is the one that drives training. Any
preconditioning's own (c_skip, c_out, c_in, c_noise) make the same regression (a network of VP/VE/iDDPM or a
Stable Diffusion U-Net: its errors below are then weighted by 1 / c_out^2, the weighting under which its loss is
this regression; Stable Diffusion's U-Net is probed unconditioned, on the empty caption). On a fixed
probe set (training points and held-out points, each noised at ``sigmas`` with fixed noise) a probe measures:

- ``ntk/score_error_{train,heldout}``: mean_d (F - F*)^2, F* the target of the exact denoiser (the data module's
  analytic mixture for GMM data, else the delta mixture of the training set); this equals
  mean_d (D - D*)^2 / c_out^2 = sigma^4 lambda(sigma) mean_d (s - s*)^2, the EDM-weighted score error;
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
point. The NTKProbe callback (diffscore.lit.callbacks.ntk_probe) schedules these measurements during fit and
`diffscore probe ntk` makes them on a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
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
from diffscore.core.precond import Coefficients, Preconditioning
from diffscore.errors import DiffscoreError

SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0)
KERNEL_MODES = ("auto", "full", "trace_estimate")


class BackboneOutput(nn.Module):
    """The regression model of a denoiser: (x [B, ...], sigma [B]) -> F(c_in x, c_noise) flattened, [B, O]."""

    def __init__(self, denoiser: Preconditioning) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        _, _, c_in, c_noise = self.denoiser.coefficients(sigma.to(x.dtype))
        bshape = (-1,) + (1,) * (x.ndim - 1)
        return self.denoiser.backbone(x * c_in.view(bshape), c_noise, None, None).flatten(1)


Coefficiented = Callable[[Tensor], Coefficients]  # sigma [B] -> (c_skip, c_out, c_in, c_noise): a denoiser's own


def regression_target(x: Tensor, sigma: Tensor, denoised: Tensor, coefficients: Coefficiented) -> Tensor:
    """The F that makes D = c_skip x + c_out F equal ``denoised``: (denoised - c_skip x) / c_out, [B, O] float64."""
    c_skip, c_out, _, _ = (c.double() for c in coefficients(sigma.double()))
    bshape = (-1,) + (1,) * (x.ndim - 1)
    return ((denoised.double() - c_skip.view(bshape) * x.double()) / c_out.view(bshape)).flatten(1)


def plain_sgd_eta(optimizer: dict[str, Any] | None, num_points: int, out_dim: int) -> tuple[float | None, str]:
    """(eta, "") for the kernel twin of full-batch plain SGD on the mean loss over N*O entries, else (None, why).
    ``optimizer``: its record ``{"class_path": "torch.optim.SGD", "init_args": {"lr": ...}}``."""
    optimizer = optimizer or {}
    name, args = optimizer.get("class_path"), optimizer.get("init_args") or {}
    if name != "torch.optim.SGD":
        return None, f"the optimizer is {name}, not plain torch.optim.SGD"
    if any(args.get(k) for k in ("momentum", "weight_decay", "nesterov")) or not args.get("lr"):
        return None, "SGD has momentum or weight decay (or no learning rate)"
    return 2 * float(args["lr"]) / (num_points * out_dim), ""


@dataclass(frozen=True)
class NTKSettings:
    """The probe and kernel sets of an NTK probe.

    Args:
        sigmas: noise levels of the probe points.
        num_points: training and held-out points each, noised at every sigma.
        kernel: "full" Gram (vector data), "trace_estimate" (random projections, large models), or "auto".
        num_kernel_points: kernel-set size when there is no regression set.
        num_projections: projections of the trace estimate.
        top_k: eigenvalues reported.
        seed: seed of the probe points, their noise and the projections.
    """

    sigmas: tuple[float, ...] = SIGMAS
    num_points: int = 32
    kernel: str = "auto"
    num_kernel_points: int = 128
    num_projections: int = 8
    top_k: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_points", "num_kernel_points", "num_projections"):
            if getattr(self, name) < 1:
                raise DiffscoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k < 0:
            raise DiffscoreError(f"top_k must be >= 0, got {self.top_k}")
        if self.kernel not in KERNEL_MODES:
            raise DiffscoreError(f"kernel must be one of {KERNEL_MODES}, got {self.kernel!r}")
        if not self.sigmas or any(not 0 < s < float("inf") for s in self.sigmas):
            raise DiffscoreError(f"sigmas must be positive, got {list(self.sigmas)}")


class NTKMeasurer:
    """The fixed probe and kernel sets of one run and the measurements on them (everything but the schedule).

    train, heldout: the data's training and held-out points (float, [N, ...]); mixture: the data's exact mixture
    (a GMM's analytic denoiser) or None (then the training set's delta mixture is the exact score); regression_set:
    (x0, sigma, noise) of a RegressionDiffusionModule (the kernel set and the twin's training set) or None.
    """

    def __init__(
        self,
        train: Tensor,
        heldout: Tensor,
        coefficients: Coefficiented,
        settings: NTKSettings = NTKSettings(),
        mixture: Any = None,
        regression_set: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        self.coefficients, self.settings, self.sigmas = coefficients, settings, tuple(settings.sigmas)
        self.exact = mixture if mixture is not None else DeltaMixtureDenoiser(train)
        self.exact_name = "analytic mixture" if mixture is not None else "delta mixture of the training set"
        self.criterion = "ntk/score_error_heldout" if mixture is not None else "ntk/heldout_loss"
        self.kernel = (
            ("full" if train.ndim == 2 else "trace_estimate") if settings.kernel == "auto" else settings.kernel
        )
        self.probe = self._probe_set(train, heldout)
        if regression_set is not None:
            x0, sig, noise = regression_set
            xk = x0 + sig.view((-1,) + (1,) * (x0.ndim - 1)) * noise
            self.kernel_set = (xk, sig, regression_target(xk, sig, x0, coefficients))
        else:
            pick = ~self.probe["heldout"]
            n = settings.num_kernel_points
            self.kernel_set = tuple(self.probe[k][pick][:n] for k in ("x", "sigma", "noisy"))

    def _probe_set(self, train: Tensor, heldout: Tensor) -> dict[str, Tensor]:
        """Training and held-out points noised at every sigma, with their noisy and exact regression targets."""
        g = torch.Generator().manual_seed(self.settings.seed)
        parts: dict[str, list[Tensor]] = {k: [] for k in ("x", "sigma", "noisy", "exact", "heldout", "sigma_idx")}
        for is_heldout, data in ((False, train), (True, heldout)):
            x0 = data[torch.randperm(len(data), generator=g)[: self.settings.num_points]]
            for i, s in enumerate(self.sigmas):
                x = x0 + s * torch.randn(x0.shape, generator=g)
                sig = torch.full((len(x0),), float(s))
                parts["x"].append(x)
                parts["sigma"].append(sig)
                parts["noisy"].append(regression_target(x, sig, x0, self.coefficients))
                exact = self.exact(x.double(), sig.double())
                parts["exact"].append(regression_target(x, sig, exact, self.coefficients))
                parts["heldout"].append(torch.full((len(x0),), is_heldout))
                parts["sigma_idx"].append(torch.full((len(x0),), i))
        return {k: torch.cat(v) for k, v in parts.items()}

    def gram(self, view: BackboneOutput, x1: Tensor, s1: Tensor, x2: Tensor | None = None, s2: Tensor | None = None):
        """The Gram of the current weights: flattened full NTK [n1 O, n2 O], or the trace estimate [n1, n2]."""
        params = {k: p for k, p in view.named_parameters() if p.requires_grad}
        x2, s2 = (x1, s1) if x2 is None else (x2, s2)
        if self.kernel == "full":
            return flatten_gram(empirical_ntk(view, params, x1, x2, (s1, s2)))
        g = torch.Generator().manual_seed(self.settings.seed)  # the same projections at every probe
        return ntk_trace_estimate(view, params, x1, x2, (s1, s2), self.settings.num_projections, generator=g)

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
        for i, lam in enumerate(ntk_spectrum(K, self.settings.top_k).tolist()):
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

    def twin_scalars(
        self, twin: KernelTwin, f0: tuple[Tensor, Tensor], f_now: tuple[Tensor, Tensor], steps: int
    ) -> dict[str, float]:
        """The kernel twin after ``steps`` gradient steps against the network: ||F_twin - F_net|| / ||F_net - F_0||
        on the probe set (``ntk/twin_rel_error``) and the kernel set (``_train``), and the twin's score errors.
        ``f0``, ``f_now``: (probe, kernel-set) outputs of the network where the twin started and now."""
        (f0_probe, f0_kernel), (f_probe, f_kernel) = f0, f_now
        t_kernel, t_probe = twin.after_steps(steps)
        out = {
            "ntk/twin_rel_error": relative_error(t_probe, f_probe, f0_probe),
            "ntk/twin_rel_error_train": relative_error(t_kernel, f_kernel, f0_kernel),
        }
        out.update(self.score_errors(t_probe, prefix="ntk/twin_"))
        return out
