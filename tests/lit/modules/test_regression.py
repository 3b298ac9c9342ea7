import copy
from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer

from diffscore.core.losses import edm_loss
from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules import GMMDataModule
from diffscore.lit.modules import RegressionDiffusionModule
from diffscore.networks import TheoryNet
from diffscore.probes.ntk import BackboneOutput, regression_target


def _fit(batch_size: int, steps: int = 1, lr: float = 0.5):
    torch.manual_seed(0)
    dm = GMMDataModule(dim=2, num_train=16, num_val=8, num_test=8, batch_size=batch_size)
    module = RegressionDiffusionModule(
        TheoryNet(data_shape=[2], width=32), noise_seed=3, optimizer=partial(torch.optim.SGD, lr=lr)
    )
    start = copy.deepcopy(module)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, dm)
    return start, module, dm


def test_full_batch_sgd_is_gradient_descent_on_the_fixed_noisy_labels():
    start, trained, dm = _fit(batch_size=16)
    x0, sigma, noise = trained.regression_set()
    assert torch.equal(x0, dm.splits["train"][0])  # every training point, in the data module's order
    x = x0 + sigma[:, None] * noise
    labels = regression_target(x, sigma, x0, start.denoiser.coefficients).float()  # Y = (x0 - c_skip x) / c_out
    model = BackboneOutput(start.denoiser)
    loss = (model(x, sigma) - labels).square().mean()  # (1/(N D)) ||F(X) - Y||^2
    # EDM's weighted denoising loss is exactly this regression loss
    torch.testing.assert_close(edm_loss(start.denoiser, x0, sigma, noise).mean(), loss, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, [start.backbone.weight])
    torch.testing.assert_close(trained.backbone.weight, start.backbone.weight - 0.5 * grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(trained.backbone.output_weight, start.backbone.output_weight)  # fixed output weights


def test_the_noisy_labels_are_fixed_by_the_seed():
    module = RegressionDiffusionModule(TheoryNet(data_shape=[2], width=8), noise_seed=1)
    x0 = torch.randn(10, 2)
    module.set_training_points(x0)
    a = module.regression_set()
    module.set_training_points(x0)
    assert all(torch.equal(u, v) for u, v in zip(a, module.regression_set()))
    module.noise_seed = 2
    module.set_training_points(x0)
    assert not torch.equal(a[2], module.regression_set()[2])


def test_minibatches_are_refused():
    with pytest.raises(DiffscoreError, match="full-batch"):
        _fit(batch_size=8)
