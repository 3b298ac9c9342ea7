"""Denoising score matching as regression with a fixed set of noisy labels (Han, Razaviyayn & Xu 2024, Sec. 3).

Each training point x0_i gets one noise level sigma_i (from the module's lognormal law) and one noise n_i, drawn
once from ``noise_seed``; training minimises the EDM loss on that fixed set,

    (1/N) sum_i lambda(sigma_i) mean_d (D(x0_i + sigma_i n_i; sigma_i) - x0_i)^2 = (1/(N D)) ||F(X) - Y||^2,

the mean squared error of the backbone's output F against the labels Y = (x0 - c_skip x) / c_out (EDM's
weighting makes the weight on F exactly 1). The labels are noisy: their conditional mean given (x, sigma) is the
exact target, and training long enough fits the noise, which is why early stopping matters. With full-batch
``torch.optim.SGD`` this is plain gradient descent, whose kernel twin is diffscore.core.ntk.KernelTwin with
eta = 2 lr / (N D).
"""

from __future__ import annotations

from torch import Tensor, nn

from diffscore.core.losses import edm_loss
from diffscore.core.ntk import draw_regression_set
from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.base import train_images
from diffscore.lit.modules.diffusion import DiffusionModule


class RegressionDiffusionModule(DiffusionModule):
    """A DiffusionModule trained full-batch on one fixed draw of (sigma_i, n_i) per training point.

    The data module must hand over the whole training split as one batch (``data.batch_size`` = the number of
    training points); every other option is the DiffusionModule's. Checkpoints load as a DiffusionModule: the
    regression set is not saved, it is redrawn from the training split and ``noise_seed``.
    """

    def __init__(self, backbone: nn.Module, noise_seed: int = 0, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.noise_seed = noise_seed  # seed of the fixed sigma_i and n_i
        self.hparams["noise_seed"] = noise_seed
        self._regression_set: tuple[Tensor, Tensor, Tensor] | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._regression_set is None:
            dm = self.trainer.datamodule
            if dm is None:
                raise DiffscoreError("RegressionDiffusionModule needs a DataModule (data: in the config)")
            self.set_training_points(train_images(dm))

    def set_training_points(self, x0: Tensor) -> None:
        """Draw the fixed (sigma_i, n_i) for training points x0 [N, ...] (in the data module's order)."""
        if self.conditional:
            raise DiffscoreError("RegressionDiffusionModule is unconditional; use a backbone with label_dim 0")
        self._regression_set = draw_regression_set(x0, self.noise_seed, self.sigma_law)

    def regression_set(self) -> tuple[Tensor, Tensor, Tensor]:
        """(x0 [N, ...], sigma [N], noise [N, ...]) on the CPU; the noisy inputs are x0 + sigma n."""
        if self._regression_set is None:
            raise DiffscoreError("the regression set is drawn at fit setup (or by set_training_points)")
        return self._regression_set

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, sigma, noise = (t.to(batch[0].device) for t in self.regression_set())
        if batch[0].shape[0] != len(x0):
            raise DiffscoreError(
                f"RegressionDiffusionModule trains full-batch: set data.batch_size to the {len(x0)} training "
                f"points (got a batch of {batch[0].shape[0]})"
            )
        loss = edm_loss(self.denoiser, x0, sigma, noise, None, self.hparams.sigma_data).mean()
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss
