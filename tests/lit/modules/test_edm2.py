"""EDM2Module (EDM2's training recipe) on the real experiments/edm2_digits.yaml, shrunk: fit, then sample the
checkpoint; forced weight normalisation after every step, EDM2's learning-rate schedule, the uncertainty-weighted
loss summed over the pixels as EDM2's ``loss.sum() / batch``, ScoreAug's label through the MP embedding, presets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffscore.core.edm2_presets import edm2_preset
from diffscore.core.precond_edm2 import EDM2Precond
from diffscore.core.schedules import edm2_learning_rate
from diffscore.errors import DiffscoreError
from diffscore.lit.modules import EDM2Module
from diffscore.loading.open import open_model
from diffscore.networks import EDM2UNet
from diffscore.networks.mp_layers import MPConv
from tests.conftest import REPO, run_cli

EDM2_DIGITS = str(REPO / "experiments" / "edm2_digits.yaml")
TINY_EDM2 = [
    "--model.init_args.backbone.init_args.model_channels=8",
    "--model.init_args.sampling.steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
    "--data.init_args.batch_size=32",
]


def tiny_unet(**kw) -> EDM2UNet:
    args = dict(data_shape=[1, 8, 8], model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    return EDM2UNet(**(args | kw))


@pytest.fixture(scope="module")
def edm2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("edm2_run")
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        callbacks = [  # the config's EMAs and checkpoints; post-hoc EMA snapshots at steps 2 and 4
            {"class_path": "diffscore.lit.callbacks.EDMEMA", "init_args": {"halflife_images": 500000}},
            {"class_path": "diffscore.lit.callbacks.PostHocEMA", "init_args": {"snapshot_every_images": 64}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        ]
        snapshots = f"--trainer.callbacks={json.dumps(callbacks)}"
        code = run_cli(["fit", "--config", EDM2_DIGITS, *TINY_EDM2, "--trainer.max_steps=4", snapshots])
    finally:
        os.chdir(cwd)
    assert code == 0
    (ckpt,) = root.glob("runs/**/checkpoints/last.ckpt")
    return ckpt


def test_fit_then_sample_a_tiny_edm2_digits_run(edm2_run, tmp_path):
    model = open_model(edm2_run)
    assert isinstance(model.network, EDM2Precond) and isinstance(model.network.backbone, EDM2UNet)
    assert model.defaults.steps == 4 and model.data_shape == (1, 8, 8)
    out = tmp_path / "s.npz"
    assert run_cli(["sample", "--ckpt_path", edm2_run, "--out", out, "--num_samples", "3"]) == 0
    samples = np.load(out)["samples"]
    assert samples.shape == (3, 1, 8, 8) and np.isfinite(samples).all()
    assert list(edm2_run.parent.parent.glob("phema/phema-*.pt"))  # post-hoc EMA on by default


def test_raw_weights_are_normalised_after_every_step_and_the_lr_is_edm2s(edm2_run):
    """Forced weight normalisation: every MPConv weight of the trained raw weights has unit RMS per output channel
    (EDM2 Eq. 66), although Adam moved them; the scheduler's lr after 4 steps is EDM2's formula."""
    ckpt = torch.load(edm2_run, weights_only=True)
    raw = ckpt["current_model_state"]
    net = open_model(edm2_run).network
    names = [n for n, m in net.named_modules() if isinstance(m, MPConv)]
    assert len(names) > 10
    for name in names:
        w = raw[f"denoiser.{name}.weight"].double()
        rms = w.flatten(1).square().mean(1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=2e-4, rtol=0)
    (lr,) = ckpt["lr_schedulers"][0]["_last_lr"]
    # 4 steps of 32 images: ramp-up 4 * 32 / 20000; no decay yet (t_ref 200 steps)
    assert lr == pytest.approx(0.01 * 4 * 32 / 20000, rel=1e-9)


def test_the_lr_factor_is_edm2s_schedule_at_the_images_before_each_step():
    from diffscore.lit.modules.edm2 import edm2_lr_factor

    for step in (0, 1, 50, 199, 200, 800, 5000):
        t = step * 64
        expected = min(t / 20000, 1) / math.sqrt(max(t / (200 * 64), 1))
        assert edm2_lr_factor(step, 64, 200, 20000) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert edm2_learning_rate(0, 0.01, 35000, 2048) == 0.0


def test_the_training_loss_is_edm2s_per_element_sum():
    """EDM2's loss: per element w(sigma) / exp(u) (D - x0)^2 + u, summed over C*H*W (loss.sum() / batch)."""
    torch.manual_seed(0)
    module = EDM2Module(tiny_unet(), P_mean=-0.8, P_std=1.6)
    for p in module.parameters():  # non-zero output and logvar gains, so D and u depend on the network
        with torch.no_grad():
            p.add_(0.3 * torch.randn_like(p))
    x0, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.05, 0.7, 9.0])
    got = module._loss(x0, sigma, noise, None)
    with torch.no_grad():
        denoised, logvar = module.denoiser(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, None, return_logvar=True)
    w = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2).view(-1, 1, 1, 1)
    u = logvar.reshape(-1, 1, 1, 1)
    per_element = w / u.exp() * (denoised - x0) ** 2 + u  # [B, C, H, W]
    torch.testing.assert_close(got.detach(), per_element.sum((1, 2, 3)), rtol=1e-5, atol=1e-5)
    assert logvar.abs().max() > 1e-3


def test_a_scoreaug_label_reaches_the_edm2_unet_through_its_mp_embedding():
    """ScoreAug on an EDM2UNet: the augment label moves the output (the MP embedding), and a step trains on it."""
    from diffscore.core.augment import ScoreAugment

    torch.manual_seed(0)
    net = tiny_unet(augment_dim=11)
    with torch.no_grad():  # EDM2 starts the output and embedding gains at 0
        for name, p in net.named_parameters():
            if name.endswith(("out_gain", "emb_gain")):
                p.fill_(1.0)
    x, c_noise = torch.randn(2, 1, 8, 8), torch.zeros(2)
    label = torch.zeros(2, 11)
    with torch.no_grad():
        plain = net(x, c_noise, None, label)
        label[:, 0] = 1
        moved = net(x, c_noise, None, label)
    assert (plain - moved).abs().max() > 1e-3
    module = EDM2Module(net, augment=[ScoreAugment(translate_frac=0.125)])
    loss = module._loss(torch.randn(4, 1, 8, 8), torch.full((4,), 0.5), torch.randn(4, 1, 8, 8), None)
    loss.mean().backward()
    assert torch.isfinite(loss).all() and net.emb_augment.weight.grad.abs().sum() > 0


def test_presets_and_bad_settings_are_one_line():
    with pytest.raises(DiffscoreError, match="model_channels 192, but the backbone has 8"):
        EDM2Module(tiny_unet(), preset="edm2-img64-s")
    with pytest.raises(DiffscoreError) as e:
        EDM2Module(tiny_unet(), preset="edm2-img64-q")
    assert "\n" not in str(e.value) and "edm2-img64-q" in str(e.value)
    with pytest.raises(DiffscoreError, match="lr_decay_batches"):
        EDM2Module(tiny_unet(), lr_decay_batches=-1)
    m = EDM2Module(tiny_unet(model_channels=128), preset="edm2-img64-xs")
    row = edm2_preset("edm2-img64-xs")
    assert (m.ref_lr, m.lr_decay_batches, m.hparams.P_mean, m.hparams.P_std) == (row.lr, 35000, -0.8, 1.6)


# -- the five lines on an EDM2 network -------------------------------------------------------------------------
def test_teleportation_on_an_edm2_model_is_the_gaussian_flow_then_heun(edm2_run, tmp_path):
    """`sample --teleport.skip 2` of the EDM2 run: the closed-form Gaussian PF-ODE to the third level, then Heun
    on the EDM2 denoiser (Wang & Vastola 2024), composed here by hand."""
    from diffscore.core.gaussian import GaussianDenoiser, teleport
    from diffscore.core.samplers import heun
    from diffscore.core.schedules import karras_sigmas
    from diffscore.sampling.seeds import seed_generators, seeded_noise

    out, gauss = tmp_path / "t.npz", tmp_path / "g.pt"
    args = ["sample", "--ckpt_path", edm2_run, "--out", out, "--num_samples", "3", "--steps", "6"]
    assert run_cli([*args, "--teleport.skip", "2", "--teleport.gaussian", gauss]) == 0
    x = seeded_noise(seed_generators(range(3), "cpu"), (1, 8, 8), "cpu") * 80.0
    x, rest = teleport(GaussianDenoiser.load(gauss), x, karras_sigmas(6), 2)
    with torch.no_grad():
        manual = heun(open_model(edm2_run).network, x, rest)
    np.testing.assert_allclose(np.load(out)["samples"], manual.numpy(), atol=1e-5)


def test_probe_gaussian_of_an_edm2_model(edm2_run, tmp_path):
    args = ["probe", "gaussian", "--ckpt_path", edm2_run, "--out", tmp_path / "p", "--num_points", "32"]
    assert run_cli([*args, "--gmm_components", "[2]"]) == 0
    table = json.loads((tmp_path / "p" / "ev.json").read_text())
    assert set(table) == {"gaussian", "gmm2", "delta"}
    assert all(math.isfinite(v) for row in table.values() for v in row.values())


def test_disback_with_an_edm2_teacher_trains_and_its_generator_samples(edm2_run, tmp_path):
    """The teacher is the EDM2 run's EMA denoiser (its logvar head carried, never used); generator and fake score
    are EDM2 copies; the one-step checkpoint reopens with EDM2's preconditioning and samples."""
    from lightning.pytorch import Trainer

    from diffscore.lit.datamodules.distill import DistillBatches
    from diffscore.lit.modules.disback import DisBackModule

    torch.manual_seed(0)
    module = DisBackModule(
        str(edm2_run), path_dir=str(tmp_path / "path"), num_path=2, record_interval=1, backtrack_interval=1,
        generator_steps=3,
    )  # fmt: skip
    teacher = open_model(edm2_run).network
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(module.teacher(x, sigma), teacher(x, sigma), rtol=0, atol=0)
    assert isinstance(module.generator, EDM2Precond) and isinstance(module.fake, EDM2Precond)
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    trainer = Trainer(
        accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DistillBatches(batch_size=4, batches_per_epoch=5))
    assert int(module.generator_step) == 3
    after = module.generator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ckpt = tmp_path / "g.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = open_model(ckpt)
    assert loaded.one_step and isinstance(loaded.network, EDM2Precond)
    out = tmp_path / "s.npz"
    assert run_cli(["sample", "--ckpt_path", ckpt, "--out", out, "--num_samples", "2"]) == 0
    assert np.isfinite(np.load(out)["samples"]).all()


def test_an_edm2_run_resumes_with_its_schedule_and_normalised_weights(in_tmp):
    """`fit --ckpt_path last.ckpt` of an EDM2 run: the scheduler continues (lr at step 6 is EDM2's formula) and the
    raw weights stay normalised (no renormalisation pass is needed at the start of a resumed run)."""
    assert run_cli(["fit", "--config", EDM2_DIGITS, *TINY_EDM2, "--trainer.max_steps=3"]) == 0
    (ckpt,) = in_tmp.glob("runs/**/checkpoints/last.ckpt")
    assert run_cli(["fit", "--config", EDM2_DIGITS, *TINY_EDM2, "--trainer.max_steps=6", f"--ckpt_path={ckpt}"]) == 0
    resumed = max(in_tmp.glob("runs/**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(resumed, weights_only=True)
    assert state["global_step"] == 6
    (lr,) = state["lr_schedulers"][0]["_last_lr"]
    assert lr == pytest.approx(0.01 * 6 * 32 / 20000, rel=1e-9)
    for key, w in state["current_model_state"].items():
        if key.endswith(".weight") and w.ndim in (2, 4):
            rms = w.double().flatten(1).square().mean(1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    "option, needle",
    [("--model.init_args.backbone.init_args.preset=q", "EDM2 preset 'q'"), ("--model.init_args.preset=x", "'x'")],
)
def test_a_preset_that_does_not_exist_is_one_line(in_tmp, capsys, option, needle):
    assert run_cli(["fit", "--config", EDM2_DIGITS, option, "--trainer.fast_dev_run=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "does not exist" in err, err


def test_probe_ntk_of_an_edm2_model(edm2_run, tmp_path):
    """The empirical NTK of the EDM2 denoiser (torch.func through the MP layers): finite measurements, and no drift
    against itself."""
    out = tmp_path / "ntk"
    args = ["probe", "ntk", "--ckpt_path", edm2_run, "--reference_ckpt", edm2_run, "--out", out]
    assert run_cli([*args, "--num_points", "4", "--num_kernel_points", "4", "--num_projections", "1"]) == 0
    cmd = json.loads((out / "ntk.json").read_text())
    assert cmd["ntk/drift"] == 0.0 and math.isfinite(cmd["ntk/eig0"]) and cmd["ntk/eig0"] > 0
    assert math.isfinite(cmd["ntk/score_error_heldout"])


def test_non_finite_gradients_are_zeroed_before_the_step():
    """EDM2's force_finite: NaN/Inf gradient entries become 0, finite ones are kept."""
    module = EDM2Module(tiny_unet())
    p = max(module.parameters(), key=lambda q: q.numel())
    p.grad = torch.ones_like(p)
    p.grad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    module.on_before_optimizer_step(None)
    assert torch.equal(p.grad.view(-1)[:3], torch.zeros(3)) and (p.grad.view(-1)[3:] == 1).all()


def test_phema_of_an_edm2_run_is_an_edm2_checkpoint(edm2_run, tmp_path):
    """`diffscore phema` on an EDM2 run writes a checkpoint that opens with EDM2's preconditioning and samples."""
    run = edm2_run.parent.parent
    assert run_cli(["phema", "--run", run, "--sigma_rel", "0.08", "--out", tmp_path / "ph", "--plot", "false"]) == 0
    (ckpt,) = (tmp_path / "ph").glob("*.ckpt")
    model = open_model(ckpt)
    assert isinstance(model.network, EDM2Precond) and model.defaults.steps == 4
    out = tmp_path / "s.npz"
    assert run_cli(["sample", "--ckpt_path", ckpt, "--out", out, "--num_samples", "2"]) == 0
