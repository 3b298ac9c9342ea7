import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from diffscore.errors import DiffscoreError
from diffscore.lit.callbacks import EDMEMA
from diffscore.lit.datamodules import GMMDataModule
from diffscore.lit.modules import DiffusionModule
from diffscore.networks import MLP


def test_decay_follows_edm_halflife_and_rampup():
    ema = EDMEMA(halflife_images=1000, rampup_ratio=None)
    assert ema.decay(10**9, 100) == pytest.approx(0.5**0.1)
    ramped = EDMEMA(halflife_images=1000, rampup_ratio=0.05)
    assert ramped.decay(10_000, 100) == pytest.approx(0.5 ** (100 / 500))  # min(1000, 0.05 * 10k) = 500
    assert ramped.decay(10**7, 100) == pytest.approx(0.5**0.1)  # ramp over: back to the half-life
    assert ramped.decay(0, 100) == pytest.approx(0.0)  # the first step takes the weights as they are


def cpu_trainer(**kw):
    return Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        **kw,
    )


class RecordRaw(Callback):
    def __init__(self):
        self.raw = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def test_ema_weights_equal_a_hand_computed_average_and_checkpoint_keeps_both(tmp_path):
    torch.manual_seed(0)
    dm = GMMDataModule(dim=2, num_components=3, num_train=256, num_val=64, num_test=64, batch_size=64)
    model = DiffusionModule(MLP(data_shape=[2], width=16, depth=1), nonfinite={"check_every": 1})
    ema = EDMEMA(halflife_images=200, rampup_ratio=0.5)
    rec = RecordRaw()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cpu_trainer(max_steps=6, callbacks=[rec, ema, ckpt]).fit(model, dm)
    # hand-computed EMA over the recorded raw weights, with EDM's betas (64 images per step, counted before it)
    expected = dict(rec.raw[0])
    for step, raw in enumerate(rec.raw[1:], start=1):
        beta = 0.5 ** (64 / min(200, 0.5 * step * 64))
        expected = {k: beta * expected[k] + (1 - beta) * raw[k] for k in raw}
    averaged = dict(ema.averaged_module().named_parameters())
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k], v)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    for k, v in expected.items():
        torch.testing.assert_close(state["state_dict"][k], v)  # the EMA, for sampling
        torch.testing.assert_close(state["current_model_state"][k], rec.raw[-1][k])  # the raw, for resuming


class NoHostRead(torch.Tensor):
    """A tensor whose value may not be read on the host (on a GPU such a read waits for the step to finish)."""

    def __bool__(self):
        raise AssertionError("the EMA update read its count on the host")

    def item(self):
        raise AssertionError("the EMA update read its count on the host")


class GuardCount(Callback):
    def __init__(self, ema):
        self.ema = ema

    def on_train_start(self, trainer, pl_module):
        average = self.ema._average_model
        average.n_averaged = average.n_averaged.as_subclass(NoHostRead)


def test_ema_update_never_reads_its_count_on_the_host():
    # torch's AveragedModel.update_parameters branches on `n_averaged == 0`: a GPU->host sync every step
    dm = GMMDataModule(dim=2, num_components=3, num_train=128, num_val=64, num_test=64, batch_size=32)
    model = DiffusionModule(MLP(data_shape=[2], width=16, depth=1))
    ema = EDMEMA(halflife_images=200)
    cpu_trainer(max_steps=3, callbacks=[ema, GuardCount(ema)], enable_checkpointing=False).fit(model, dm)
    assert int(ema._average_model.n_averaged.as_subclass(torch.Tensor)) == 3


@pytest.mark.parametrize("halflife", [float("nan"), float("inf"), 0.0, -5.0])
def test_a_non_finite_or_non_positive_halflife_is_refused(halflife):
    """A NaN half-life (YAML's .nan) trained and sampled 100% NaN with exit code 0."""
    with pytest.raises(DiffscoreError, match="halflife_images"):
        EDMEMA(halflife_images=halflife)
