import json

import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules import CIFAR10DataModule, ImageDataModule
from diffscore.lit.datamodules.base import split_batch
from tests.conftest import REPO, run_cli
from tests.fixtures import random_images, write_cifar10, write_dataset

CONFIGS = {
    name: str(REPO / "experiments" / f"{name}.yaml")
    for name in ("ffhq", "afhqv2", "imagenet64", "cifar10", "cifar10_cond")
}


def test_split_batch_follows_edm():
    assert split_batch(512, None, 1) == (512, 1)
    assert split_batch(512, None, 8) == (64, 1)
    assert split_batch(512, 32, 8) == (32, 2)
    assert split_batch(4096, 64, 8) == (64, 8)
    with pytest.raises(DiffscoreError, match="divisible"):
        split_batch(100, None, 3)
    with pytest.raises(DiffscoreError, match="batch_gpu"):
        split_batch(96, 40, 1)


@pytest.fixture
def zip16(tmp_path):
    return write_dataset(tmp_path / "d.zip", random_images(40, 16), labels=[i % 4 for i in range(40)], as_zip=True)


def test_subset_is_seeded_nested_saved_and_checked(zip16):
    a = ImageDataModule(str(zip16), batch_size=8, num_train=10, val_size=5, seed=3, num_workers=0)
    b = ImageDataModule(str(zip16), batch_size=8, num_train=20, val_size=5, seed=3, num_workers=0)
    assert len(a.train_indices) == 10 and len(a.heldout_indices) == 5
    assert set(a.train_indices.tolist()) <= set(b.train_indices.tolist())
    assert not set(a.train_indices.tolist()) & set(a.heldout_indices.tolist())
    a.load_state_dict(a.state_dict())
    with pytest.raises(DiffscoreError, match="different subset"):
        b.load_state_dict(a.state_dict())
    frac = ImageDataModule(str(zip16), batch_size=8, fraction=0.5, num_workers=0)
    assert len(frac.train_indices) == 20


def test_image_module_facts_xflip_and_uint8_transfer(zip16):
    dm = ImageDataModule(str(zip16), batch_size=8, cond=True, xflip=True, num_workers=0)
    assert dm.data_shape == (3, 16, 16) and dm.label_dim == 4
    assert len(dm.dataset("train")) == 80 and dm.val_dataloader() == []
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8
    xf, _ = dm.on_after_batch_transfer((x, y), 0)
    assert xf.dtype == torch.float32 and xf.min() >= -1 and xf.max() <= 1
    torch.testing.assert_close(xf, x.float() / 127.5 - 1)
    assert ImageDataModule(str(zip16), batch_size=8, cond=False, num_workers=0).label_dim == 0


def shrink(config: str) -> list[str]:
    """The real config, made CPU-sized by overrides (never a copy of the file)."""
    backbone = "--model.init_args.backbone.init_args"
    args = [
        "fit",
        "--config",
        config,
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"{backbone}.model_channels=8",
        f"{backbone}.num_blocks=1",
        "--model.init_args.sampling.steps=2",
        "--data.init_args.batch_size=4",
        "--data.init_args.batch_gpu=2",
    ]
    if "imagenet" in config:
        args += [f"{backbone}.channel_mult=[1,2]", f"{backbone}.attn_resolutions=[8]"]
    return args


@pytest.mark.parametrize("name", ["ffhq", "afhqv2", "imagenet64"])
def test_a_fit_step_through_the_real_image_configs(tmp_path, monkeypatch, zip16, name):
    monkeypatch.chdir(tmp_path)
    extra = ["--data.init_args.num_workers=0", f"--data.init_args.path={zip16}", "--data.init_args.val_size=4"]
    assert run_cli([*shrink(CONFIGS[name]), *extra]) == 0
    ckpt = torch.load(next(tmp_path.glob("runs/**/last.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    init = ckpt["hyper_parameters"]["backbone"]["init_args"]
    assert list(init["data_shape"]) == [3, 16, 16]  # linked from the data, never typed
    assert init["label_dim"] == (4 if name == "imagenet64" else 0)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 4  # 2 x accumulation 2
    subset = json.loads(next(tmp_path.glob("runs/**/data_subset.json")).read_text())
    assert len(subset["heldout_indices"]) == 4


@pytest.mark.parametrize("name", ["cifar10", "cifar10_cond"])
def test_a_fit_step_through_the_cifar_configs(tmp_path, monkeypatch, name):
    write_cifar10(tmp_path / "data", per_batch=4, archive=True)
    monkeypatch.chdir(tmp_path)
    assert run_cli([*shrink(CONFIGS[name]), f"--data.init_args.root={tmp_path / 'data'}"]) == 0
    ckpt = torch.load(next(tmp_path.glob("runs/**/last.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["backbone"]["init_args"]["label_dim"] == (10 if name == "cifar10_cond" else 0)


def test_missing_data_fails_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli([*shrink(CONFIGS["cifar10"]), f"--data.init_args.root={tmp_path}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "cifar-10-python.tar.gz" in err[-1] and err[-1].startswith("diffscore: error:")
    assert run_cli([*shrink(CONFIGS["ffhq"]), f"--data.init_args.path={tmp_path / 'none.zip'}"]) != 0
    assert "none.zip does not exist" in capsys.readouterr().err


def test_a_corrupt_image_inside_a_worker_is_reported_by_name(tmp_path, monkeypatch, capsys):
    d = tmp_path / "d"
    d.mkdir()
    write_dataset(d, random_images(8, 16))
    good = (d / "00000/img00000003.png").read_bytes()
    (d / "00000/img00000003.png").write_bytes(good[:-40])  # header intact, pixels cut short
    monkeypatch.chdir(tmp_path)
    code = run_cli(
        [
            *shrink(CONFIGS["ffhq"]),
            f"--data.init_args.path={d}",
            "--data.init_args.num_workers=1",
            "--data.init_args.epoch_size=64",
            "--trainer.max_steps=16",
        ]
    )
    assert code != 0
    assert "img00000003.png" in capsys.readouterr().err.strip().splitlines()[-1]


def test_dataset_command(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_dataset(src, random_images(3, 8), labels=[0, 1, 2])
    assert run_cli(["dataset", "--source", src, "--dest", tmp_path / "o.zip"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert run_cli(["dataset", "--source", src, "--dest", tmp_path / "o.zip"]) != 0
    assert "already exists" in capsys.readouterr().err


def test_cifar_module_subset_and_heldout(tmp_path):
    write_cifar10(tmp_path, per_batch=10)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=8, num_train=20, val_size=6, xflip=True)
    assert len(dm.dataset("train")) == 40 and len(dm.dataset("val")) == 6 and len(dm.dataset("test")) == 10


def test_forked_workers_read_the_zip_correctly(zip16):
    """Each worker opens its own ZIP handle; a handle shared through fork corrupts reads (bad CRC)."""
    dm = ImageDataModule(str(zip16), batch_size=8, num_workers=2, pin_memory=False, epoch_size=160)
    dm.images.read_image(0)  # the parent opens the ZIP before the workers fork
    seen = 0
    for x, _ in dm.train_dataloader():
        for img in x:
            assert any(torch.equal(img, dm.images.read_image(i)) for i in range(40))
            seen += 1
    assert seen == 160
