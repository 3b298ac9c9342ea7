import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from diffscore.core.augment import NonLeakyAugment, ScoreAugment
from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules import DigitsDataModule, GMMDataModule
from diffscore.lit.modules import DiffusionModule
from diffscore.loading.open import open_model
from diffscore.networks import MLP, UNet
from diffscore.networks.backbone import Backbone
from diffscore.sampling.options import SamplingOptions
from tests.conftest import REPO, TINY, run_cli


def tiny_unet():
    return UNet(
        data_shape=[1, 8, 8],
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.0,
    )


def trainer(tmp_path, **kw):
    args = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    args.update(kw)
    return Trainer(**args)


def test_validation_logs_heldout_train_and_gap_per_sigma(tmp_path):
    dm = DigitsDataModule(batch_size=64, num_train=200)
    model = DiffusionModule(tiny_unet(), val_sigmas=[0.1, 1.0, 10.0])
    metrics = trainer(tmp_path).validate(model, dm, verbose=False)[0]
    for s in ("0.1", "1", "10"):
        h, t, g = metrics[f"heldout/loss_s{s}"], metrics[f"train_eval/loss_s{s}"], metrics[f"gap/loss_s{s}"]
        assert g == pytest.approx(h - t, abs=1e-5)
    assert metrics["val/loss"] == pytest.approx(
        sum(metrics[f"heldout/loss_s{s}"] for s in ("0.1", "1", "10")) / 3, rel=1e-5
    )


def test_validation_loss_is_deterministic_and_matches_the_exact_gmm_oracle(tmp_path):
    """With the exact mixture denoiser in place of the network, the held-out loss per sigma equals the
    oracle's EDM loss computed by hand over the same batches and noise; two validations agree exactly."""
    dm = GMMDataModule(dim=2, num_components=4, num_train=512, num_val=512, batch_size=128)
    model = DiffusionModule(MLP(data_shape=[2], width=8, depth=1), val_sigmas=[0.05, 0.5])
    mixture = dm.mixture
    model.denoiser.forward = lambda x, sigma, cond=None, aug_label=None: mixture(x, sigma).float()
    a = trainer(tmp_path).validate(model, dm, verbose=False)[0]
    b = trainer(tmp_path).validate(model, dm, verbose=False)[0]
    assert a == b
    x_val = dm.splits["val"][0]
    for s in (0.05, 0.5):
        losses = []
        for batch_idx, x0 in enumerate(x_val.split(128)):  # the loader's batches, noise seeded by batch index
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(batch_idx))
            sig = torch.full((len(x0),), s)
            err = ((mixture(x0 + s * noise, sig).float() - x0) ** 2).mean(1)
            losses.append(err * (s**2 + 0.25) / (s * 0.5) ** 2)
        assert a[f"heldout/loss_s{s:g}"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)


def test_test_reports_the_test_splits_loss_per_sigma_against_the_gmm_oracle(tmp_path):
    """`diffscore test` (Trainer.test): the same per-sigma EDM loss as validation, on the test split."""
    dm = GMMDataModule(dim=2, num_components=4, num_train=512, num_test=256, batch_size=128)
    model = DiffusionModule(MLP(data_shape=[2], width=8, depth=1), val_sigmas=[0.05, 0.5])
    mixture = dm.mixture
    model.denoiser.forward = lambda x, sigma, cond=None, aug_label=None: mixture(x, sigma).float()
    result = trainer(tmp_path).test(model, dm, verbose=False)[0]
    x_test, expected = dm.splits["test"][0], []
    for s in (0.05, 0.5):
        losses = []
        for batch_idx, x0 in enumerate(x_test.split(128)):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(batch_idx))
            err = ((mixture(x0 + s * noise, torch.full((len(x0),), s)).float() - x0) ** 2).mean(1)
            losses.append(err * (s**2 + 0.25) / (s * 0.5) ** 2)
        expected.append(torch.cat(losses).mean().item())
        assert result[f"test/loss_s{s:g}"] == pytest.approx(expected[-1], rel=1e-5)
    assert result["test/loss"] == pytest.approx(sum(expected) / 2, rel=1e-5)


class LrRecorder(Callback):
    """The learning rate each optimizer step uses (read just before the step)."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_learning_rate_ramps_up_over_images(tmp_path):
    dm = GMMDataModule(dim=2, num_components=2, num_train=512, batch_size=64)
    rec = LrRecorder()
    opt = lambda p: torch.optim.Adam(p, lr=0.01)  # noqa: E731
    model = DiffusionModule(MLP(data_shape=[2], width=8, depth=1), optimizer=opt, lr_rampup_images=256)
    trainer(tmp_path, max_steps=6, callbacks=[rec], limit_val_batches=0).fit(model, dm)
    assert rec.lrs == pytest.approx([0.01 * min((i + 1) * 64 / 256, 1.0) for i in range(6)])


class BarRecorder(Callback):
    def __init__(self):
        self.bar, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.bar.append(trainer.progress_bar_metrics["loss"])


def test_progress_bar_loss_is_a_host_copy_refreshed_every_log_interval(tmp_path):
    """Lightning reads every prog_bar value back to the host after every step (a GPU sync): the bar's loss is a
    CPU copy taken every ``log_every_n_steps`` steps, and shows the loss of the last such step in between."""
    dm = GMMDataModule(dim=2, num_components=2, num_train=512, batch_size=64)
    rec = BarRecorder()
    model = DiffusionModule(MLP(data_shape=[2], width=8, depth=1))
    trainer(tmp_path, max_steps=7, callbacks=[rec], limit_val_batches=0, log_every_n_steps=3).fit(model, dm)
    shown = [rec.losses[3 * (i // 3)] for i in range(7)]  # steps 0-2 show step 0's loss, 3-5 step 3's, ...
    assert rec.bar == pytest.approx(shown)
    assert len(set(rec.losses)) == 7  # the losses differ, so the comparison above pins which step is shown


def test_log_every_n_steps_zero_trains_without_a_bar_loss(tmp_path):
    """Lightning accepts log_every_n_steps=0 (no logging); the bar's copy must not divide by it."""
    dm = GMMDataModule(dim=2, num_components=2, num_train=512, batch_size=64)
    model = DiffusionModule(MLP(data_shape=[2], width=8, depth=1))
    fitted = trainer(tmp_path, max_steps=2, limit_val_batches=0, log_every_n_steps=0)
    fitted.fit(model, dm)
    assert fitted.global_step == 2 and "loss" not in fitted.progress_bar_metrics


class NaNAfter(Backbone):
    """A backbone that turns its output into NaN from training step ``n`` on."""

    def __init__(self, n):
        super().__init__()
        self.inner = MLP(data_shape=[2], width=8, depth=1)
        self.n, self.calls, self.dim, self.data_shape = n, 0, 2, (2,)

    def forward(self, x, c_noise, cond=None, aug_label=None):
        out = self.inner(x, c_noise)
        if self.training:
            self.calls += 1
            if self.calls > self.n:
                out = out * float("nan")
        return out


@pytest.mark.parametrize("check_every", [1, 3])
def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, check_every):
    dm = GMMDataModule(dim=2, num_components=2, num_train=512, batch_size=64)
    model = DiffusionModule(NaNAfter(5), nonfinite={"check_every": check_every})
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(DiffscoreError, match="non-finite training loss at or before step"):
        trainer(tmp_path, max_steps=20, callbacks=[ckpt], enable_checkpointing=True, limit_val_batches=0).fit(model, dm)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["global_step"] == 5  # steps 1..5 were finite; step 6 was not
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


DIGITS_SCOREAUG = str(REPO / "experiments" / "digits_scoreaug.yaml")


NONLEAKY = '{"class_path": "diffscore.core.augment.NonLeakyAugment", "init_args": {"p": 0.2}}'
SCOREAUG = '{"class_path": "diffscore.core.augment.ScoreAugment", "init_args": {"translate_frac": 0.25}}'
ARMS = {"none": "[]", "nonleaky": f"[{NONLEAKY}]", "scoreaug": f"[{SCOREAUG}]", "both": f"[{NONLEAKY}, {SCOREAUG}]"}


@pytest.mark.parametrize("arm", list(ARMS))
def test_each_augmentation_arm_trains_from_its_yaml_and_its_checkpoint_keeps_the_augmenters(in_tmp, arm):
    """Augmenters are objects in the config (present = on); their own settings travel in the checkpoint, so a
    resumed run augments as the original did (a configured ScoreAugment is never silently replaced)."""
    args = ["fit", "--config", DIGITS_SCOREAUG, *TINY, "--trainer.max_steps=3", "--trainer.logger=false"]
    assert run_cli([*args, f"--model.init_args.augment={ARMS[arm]}", "--trainer.callbacks=[]"]) == 0
    (ckpt,) = in_tmp.glob("runs/**/*.ckpt")  # Lightning's default checkpoint (no callbacks)
    saved = open_model(ckpt).settings["augment"]
    expected = {"none": [], "nonleaky": ["NonLeakyAugment"], "scoreaug": ["ScoreAugment"]}
    expected["both"] = ["NonLeakyAugment", "ScoreAugment"]
    assert [r["class_path"].rsplit(".", 1)[1] for r in saved] == expected[arm]
    for record in saved:
        key, value = ("p", 0.2) if record["class_path"].endswith("NonLeakyAugment") else ("translate_frac", 0.25)
        assert record["init_args"][key] == value
    resumed = DiffusionModule(tiny_unet_with_augment_dim(20), augment=[_built(r) for r in saved])
    assert [type(a).__name__ for a in resumed.augment.augmenters] == expected[arm]


def tiny_unet_with_augment_dim(augment_dim):
    return UNet(
        data_shape=[1, 8, 8],
        model_channels=8,
        channel_mult=[1],
        num_blocks=1,
        attn_resolutions=[],
        augment_dim=augment_dim,
    )


def _built(record):
    cls = NonLeakyAugment if record["class_path"].endswith("NonLeakyAugment") else ScoreAugment
    return cls(**record["init_args"])


def test_scoreaug_arm_feeds_transformed_noisy_input_and_its_label(monkeypatch):
    """The training loss of the scoreaug arm is scoreaug_loss with the label the backbone receives."""
    torch.manual_seed(0)
    net = UNet(
        data_shape=[1, 8, 8], model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], augment_dim=20
    )
    module = DiffusionModule(net, augment=[ScoreAugment({"rot90": 1.0})])
    seen = []
    original = net.forward
    monkeypatch.setattr(net, "forward", lambda x, c, cond=None, aug=None: seen.append(aug) or original(x, c, cond, aug))
    x0 = torch.randn(16, 1, 8, 8)
    module._loss(x0, torch.ones(16), torch.randn_like(x0), None)
    (label,) = seen
    assert label.shape == (16, 20) and (label[:, 11:] == 0).all()  # ScoreAug's 11 columns, zero-padded
    assert (label[:, :3].sum(1) == 1).all()  # every sample got one of rot90 k = 1, 2, 3


def test_augment_errors_name_the_option():
    net = UNet(data_shape=[1, 8, 8], model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with pytest.raises(DiffscoreError, match="augmentation label has 11 entries .* augment_dim is 0"):
        DiffusionModule(net, augment=[ScoreAugment()])
    with pytest.raises(DiffscoreError, match="at most one ScoreAugment"):
        DiffusionModule(tiny_unet_with_augment_dim(22), augment=[ScoreAugment(), ScoreAugment()])
    with pytest.raises(DiffscoreError, match="must be NonLeakyAugment or ScoreAugment objects"):
        DiffusionModule(net, augment=["scoreaug"])


def test_the_legacy_arm_strings_of_a_checkpoint_become_augmenters_in_the_same_label_order():
    """Checkpoints before 2026-12 saved ``augment: nonleaky+scoreaug`` (the objects beside it, or None for the
    defaults); the label layout [non-leaky | ScoreAug] must stay, or a resumed run's network would see its
    augmentation labels in other columns."""
    from diffscore.loading.legacy import modern_settings

    custom = {"class_path": "diffscore.core.augment.ScoreAugment", "init_args": {"mode": "composed"}}
    both = modern_settings({"augment": "nonleaky+scoreaug", "nonleaky": None, "scoreaug": custom, "num_steps": 7})
    assert [r["class_path"].rsplit(".", 1)[1] for r in both["augment"]] == ["NonLeakyAugment", "ScoreAugment"]
    assert both["augment"][1] is custom and both["sampling"] == {"steps": 7}
    assert modern_settings({"augment": "none", "scoreaug": custom})["augment"] == []  # dropped, as it trained


def test_compile_and_channels_last_keep_the_loss_and_the_checkpoint_keys(monkeypatch):
    """The GPU switches change how the step runs, not what it computes or what a checkpoint holds."""
    import copy

    real_compile, compiled = torch.compile, []

    def eager_compile(module, **kw):  # the wiring, without a C++ toolchain: dynamo with the eager backend
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(DiffusionModule, "device", property(lambda self: torch.device("cuda")))  # compiles on CUDA
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    sigma, noise = torch.exp(torch.randn(8)), torch.randn(8, 1, 8, 8)
    losses, keys = [], []
    for fast in (False, True):
        torch.manual_seed(0)
        module = DiffusionModule(tiny_unet(), speed={"compile": fast, "channels_last": fast})
        module.setup("fit")
        losses.append(module._loss(module._images(x0), sigma, noise, None))
        keys.append(list(module.state_dict()))
        copy.deepcopy(module)  # the EMA callback copies the module
    assert len(compiled) == 1
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert keys[0] == keys[1]


def test_the_cpu_samples_eager_fp32_whatever_the_speed_switches():
    """bf16 / channels-last / compile apply on CUDA only: on the CPU the sampler calls the plain denoiser, so a
    checkpoint trained with them samples here exactly as one trained without."""
    net = UNet(data_shape=[1, 8, 8], model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    speed = {"compile": True, "channels_last": True}
    model = DiffusionModule(net, speed=speed, sampling={"steps": 3, "precision": "bf16"})
    fast = model.sampler(SamplingOptions(precision="bf16", compile=True, channels_last=True))
    assert not fast.speed().any
    torch.testing.assert_close(fast.generate([0, 1]), model.sampler().generate([0, 1]), rtol=0, atol=0)
