"""PostHocEMA: the tracked averages are the power-function averages of the recorded trajectory, snapshots land in
<run>/phema/, resuming is exact, and it works beside EDMEMA or alone."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from diffscore.core.phema import sigma_rel_to_gamma
from diffscore.errors import DiffscoreError
from diffscore.lit.callbacks import EDMEMA, PostHocEMA
from diffscore.lit.datamodules import GMMDataModule
from diffscore.lit.modules import DiffusionModule
from diffscore.networks import MLP


class RecordRaw(Callback):
    def __init__(self):
        self.raw = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def setup_run(tmp_path, callbacks, max_steps, ckpt_path=None, val_every=None):
    torch.manual_seed(0)
    dm = GMMDataModule(dim=2, num_components=3, num_train=256, num_val=64, num_test=64, batch_size=32)
    model = DiffusionModule(MLP(data_shape=[2], width=16, depth=1))
    trainer = Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_steps=max_steps,
        limit_val_batches=1 if val_every else 0,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model


def profile_weights(sigma_rel: float, images: list[float]) -> list[float]:
    """The power-function profile integrated over each step by a slow midpoint rule, independent of the package's
    discrete_weights: iterate k (after images[k]) stands for the images (images[k-1], images[k]]."""
    g, end = float(sigma_rel_to_gamma(sigma_rel)), images[-1]
    out, prev = [], 0.0
    for t in images:
        n = 4000
        h = (t - prev) / n
        out.append(sum((g + 1) / end * ((prev + (i + 0.5) * h) / end) ** g * h for i in range(n)))
        prev = t
    return out


def test_tracked_averages_are_power_function_averages_beside_edmema(tmp_path):
    rec = RecordRaw()
    phema = PostHocEMA(sigma_rels=[0.05, 0.10, 0.2], snapshot_every_images=96, snapshot_dtype="float32")
    ema = EDMEMA(halflife_images=200)  # validation swaps its weights in and out every 3 steps
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    model = setup_run(tmp_path, [rec, ema, phema, ckpt], max_steps=8, val_every=3)
    images = [32.0 * (k + 1) for k in range(8)]
    for s, average in zip(phema.sigma_rels, phema._averages, strict=True):
        w = profile_weights(s, images)
        assert sum(w) == pytest.approx(1.0, abs=1e-6)
        for (name, _), got in zip(model.named_parameters(), average, strict=True):
            want = sum(wk * raw[name] for wk, raw in zip(w, rec.raw, strict=True))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # snapshots every 96 images (3 steps) and one at the end; each holds all profiles at that time
    files = sorted((tmp_path / "phema").glob("phema-*.pt"))
    assert [f.name for f in files] == [f"phema-{i:012d}.pt" for i in (96, 192, 256)]
    snap = torch.load(files[1], weights_only=True)
    assert (snap["images"], snap["step"], snap["sigma_rels"]) == (192, 6, [0.05, 0.10, 0.2])
    w6 = profile_weights(0.10, images[:6])
    name = next(iter(snap["ema"][1]))
    want = sum(wk * raw[name] for wk, raw in zip(w6, rec.raw, strict=False))
    torch.testing.assert_close(snap["ema"][1][name], want, rtol=1e-5, atol=1e-6)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    step = saved["global_step"]  # the last validation's checkpoint
    assert saved["callbacks"]["PostHocEMA"]["images"] == 32 * step
    for k, raw in rec.raw[step - 1].items():  # beside EDMEMA the state_dict stays EDMEMA's, the raw weights beside
        assert torch.equal(saved["current_model_state"][k], raw) and not torch.equal(saved["state_dict"][k], raw)


def test_alone_the_checkpoint_keeps_the_raw_weights_and_snapshots_are_low_precision(tmp_path):
    rec = RecordRaw()
    phema = PostHocEMA(snapshot_every_images=64)  # float16 snapshots by default
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    setup_run(tmp_path, [rec, phema, ckpt], max_steps=4)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for k, v in rec.raw[-1].items():
        assert torch.equal(saved["state_dict"][k], v)
    snap = torch.load(tmp_path / "phema" / "phema-000000000128.pt", weights_only=True)
    assert snap["dtype"] == "float16" and all(v.dtype == torch.float16 for v in snap["ema"][0].values())
    for name, v in snap["ema"][0].items():
        torch.testing.assert_close(v.float(), phema._averages[0][list(rec.raw[-1]).index(name)], rtol=1e-3, atol=1e-3)


def test_resume_continues_the_averages_exactly(tmp_path):
    def run(root, steps, ckpt_path=None):
        phema = PostHocEMA(snapshot_every_images=64, snapshot_dtype="float32")
        ckpt = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
        setup_run(root, [phema, ckpt], max_steps=steps, ckpt_path=ckpt_path)
        return phema

    straight = run(tmp_path / "straight", 8)
    run(tmp_path / "half", 4)
    resumed = run(tmp_path / "half", 8, ckpt_path=tmp_path / "half" / "checkpoints" / "last.ckpt")
    assert resumed.images == straight.images == 256
    for a, b in zip(straight._averages, resumed._averages, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    names = sorted(p.name for p in (tmp_path / "half" / "phema").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "straight" / "phema").iterdir())


def test_bad_options_are_one_line_errors():
    with pytest.raises(DiffscoreError, match="snapshot_dtype must be one of"):
        PostHocEMA(snapshot_dtype="int8")
    with pytest.raises(DiffscoreError, match="snapshot_every_images must be a positive"):
        PostHocEMA(snapshot_every_images=0)
    with pytest.raises(DiffscoreError, match="sigma_rel must be in"):
        PostHocEMA(sigma_rels=[0.05, 0.4])
    with pytest.raises(DiffscoreError, match="distinct"):
        PostHocEMA(sigma_rels=[0.05, 0.05])
    phema = PostHocEMA()
    with pytest.raises(DiffscoreError, match="resume with the same PostHocEMA.sigma_rels"):
        phema.load_state_dict({"sigma_rels": [0.1], "images": 0, "last_snapshot_images": 0, "latest_update_step": 0})
