"""One table of bad inputs across the commands: each gives one clear line naming the problem, a non-zero exit,
and leaves no partial output behind."""

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import QUICKSTART, REPO, TINY, run_cli
from tests.fixtures import png_bytes, random_images, write_dataset

FFHQ = str(REPO / "experiments" / "ffhq.yaml")


def ffhq_fit(path) -> list[str]:
    b = "--model.init_args.backbone.init_args"
    return [
        "fit",
        "--config",
        FFHQ,
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=1",
        f"{b}.model_channels=8",
        f"{b}.num_blocks=1",
        f"--data.init_args.path={path}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2",
        "--data.init_args.batch_gpu=null",
    ]


def dataset(tmp, kind):
    d = tmp / "data"
    d.mkdir()
    write_dataset(d, random_images(3, 8), [0, 1, 2])
    target = d / "00000/img00000001.png"
    if kind == "empty":
        for p in sorted(d.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    elif kind == "corrupt":
        target.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif kind == "rgba":
        target.write_bytes(png_bytes(np.zeros((8, 8, 4), dtype=np.uint8)))
    elif kind == "non-square":
        target.write_bytes(png_bytes(random_images(1, 8)[0][:, :4]))
    elif kind == "label":
        (d / "dataset.json").write_text(json.dumps({"labels": [[f"00000/img{i:08d}.png", -i] for i in range(3)]}))
    elif kind == "json":
        (d / "dataset.json").write_text("{oops")
    elif kind == "corrupt-idat":  # valid headers, garbled compressed pixels (all: the first batch meets one)
        from tests.data.test_image_folder import corrupt_idat_png

        for i, img in enumerate(random_images(3, 8)):
            (d / f"00000/img{i:08d}.png").write_bytes(corrupt_idat_png(img))
    elif kind == "huge-label":  # a one-hot of 1e9 classes per batch
        (d / "dataset.json").write_text(json.dumps({"labels": [[f"00000/img{i:08d}.png", 10**9] for i in range(3)]}))
    elif kind == "dev-zero":
        target.unlink()
        target.symlink_to("/dev/zero")
    return d


def zip_bomb_dataset(tmp):
    """An EDM ZIP whose third image has a valid 8x8 PNG header and then inflates to a gigabyte."""
    from tests.test_io import GIB, add_deflated_member, zeros_deflate

    path = write_dataset(tmp / "bomb.zip", random_images(2, 8), as_zip=True)
    head = png_bytes(random_images(1, 8)[0])[:33]
    return add_deflated_member(path, "00000/img00000002.png", zeros_deflate(GIB, head), GIB + len(head))


def source_with(tmp, kind):
    """A `diffscore dataset` source folder with a FIFO named *.png, or a label that is a string."""
    import os

    src = tmp / "src"
    src.mkdir()
    write_dataset(src, random_images(2, 8), [0, 1])
    if kind == "fifo":
        os.mkfifo(src / "00000/zz.png")
    else:
        (src / "dataset.json").write_text(
            json.dumps({"labels": [["00000/img00000000.png", 0], ["00000/img00000001.png", "7"]]})
        )
    return src


def inception_weights(tmp, edit=None):
    """Random Inception weights in torch-fidelity's format (as tests/conftest.py's random_inception), after
    ``edit(state)``."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with (
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
    ):
        torch.manual_seed(0)
        state = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path="x"
        ).state_dict()
    if edit is not None:
        edit(state)
    torch.save(state, tmp / "inception.pth")
    return tmp / "inception.pth"


def runs_code(tmp):
    from tests.metrics.test_inception import RunsCode

    torch.save(RunsCode(tmp / "ran"), tmp / "evil.pth")
    return tmp / "evil.pth"


def nan_weight(state):
    state["fc.weight"][0, 0] = float("nan")


def reference(tmp, kind):
    """Reference statistics (.npz) with NaN, a negative covariance, or of 64-dimensional (digits) features."""
    d = 64 if kind == "digits" else 2048
    mu, sigma = np.zeros(d), np.eye(d)
    if kind == "nan":
        mu[5] = np.nan
    elif kind == "negative":
        sigma = -sigma
    np.savez(tmp / "ref.npz", mu=mu, sigma=sigma)
    return tmp / "ref.npz"


def edm_pickle(tmp, kind):
    """An EDM network pickle with a tensor grown by BUILD after its check, or of stride-0 views declaring 2.1 GB."""
    from tests.loading.test_edm_pickle import (
        GrownAfterTheCheck,
        conv_tamper,
        dump_edm,
        small_net,
        snapshot,
        stride0_network,
        with_buffer,
    )

    if kind == "grown":
        return dump_edm(tmp / "grown.pkl", snapshot(small_net()), tamper=conv_tamper(with_buffer(GrownAfterTheCheck())))
    return stride0_network(tmp / "huge.pkl", layers=56)


def foreign_checkpoint(tmp):
    p = tmp / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "some.other.Model", "backbone": {}}}, p)
    return p


def garbage(tmp, name="garbage.ckpt"):
    p = tmp / name
    p.write_bytes(bytes(range(7, 250)) * 40)
    return p


def truncated(tmp, ckpt):
    p = tmp / "half.ckpt"
    data = ckpt.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def edited(tmp, ckpt, edit):
    """A copy of the tiny checkpoint with ``edit(checkpoint_dict)`` applied."""
    c = torch.load(ckpt, map_location="cpu", weights_only=False)
    edit(c)
    p = tmp / "edited.ckpt"
    torch.save(c, p)
    return p


def nan_in_a_weight(c):
    next(v for v in c["state_dict"].values() if v.is_floating_point()).view(-1)[0] = float("nan")


def sigma_data_as_text(c):
    c["hyper_parameters"]["sigma_data"] = "half"


class RunsShell:
    def __reduce__(self):
        import os

        return os.system, ("true",)


def names_os_system(tmp):
    torch.save({"state_dict": {}, "x": RunsShell()}, tmp / "evil.ckpt")
    return tmp / "evil.ckpt"


def diffusers_folder(tmp):
    (tmp / "sd").mkdir()
    (tmp / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return tmp / "sd"


def drop_a_weight(c):
    c["state_dict"].pop(next(iter(c["state_dict"])))


def name_a_command(c):
    c["hyper_parameters"]["optimizer"] = {"class_path": "os.system", "init_args": {}}


def negative_channels(c):
    c["hyper_parameters"]["backbone"]["init_args"]["model_channels"] = -4


def yaml_file(tmp, text):
    p = tmp / "override.yaml"
    p.write_text(text)
    return p


def not_samples(tmp):
    d = tmp / "mine"
    d.mkdir()
    (d / "keep.txt").write_text("a user's file")
    return d


def another_network(tmp):
    """A checkpoint of a different U-Net (as `fit` saves it: EMA weights + hyper-parameters)."""
    from diffscore.lit.modules.diffusion import DiffusionModule
    from diffscore.networks.unet import UNet

    net = UNet(data_shape=[1, 8, 8], model_channels=4, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    model = DiffusionModule(net)
    p = tmp / "other_net.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": 0}, p)
    return p


def sd_folder(tmp, kind="ok"):
    """A tiny Stable Diffusion folder (tests/sd_files.py), broken as ``kind`` says."""
    import shutil

    from tests.sd_files import edit_json, write_sd_folder

    folder = write_sd_folder(tmp / "sd", safe=kind != "bin", vae_latent_channels=3 if kind == "vae" else 4)
    if kind == "not diffusers":
        (folder / "model_index.json").unlink()
    elif kind == "no vae":
        shutil.rmtree(folder / "vae")
    elif kind == "no component":
        edit_json(folder / "model_index.json", text_encoder=...)
    elif kind == "nan":
        from safetensors.torch import load_file, save_file

        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        state = load_file(weights)
        state["conv_in.weight"][0, 0, 0, 0] = float("nan")
        save_file(state, weights)
    elif kind == "fifo":
        (folder / "unet" / "config.json").unlink()
        os.mkfifo(folder / "unet" / "config.json")
    return folder


def latent_zip(tmp):
    """A latent dataset of two 8 x 8 latents (statistics drawn at random, not by a VAE) with captions."""
    import zipfile

    from diffscore.data.latent_dataset import write_latents

    images = [(torch.zeros(3, 16, 16, dtype=torch.uint8), None, "a music score", "train")] * 2
    path = tmp / "latents.zip"
    with zipfile.ZipFile(path, "w") as zf:
        meta = write_latents(zf.writestr, images, lambda x: torch.rand(len(x), 8, 8, 8), batch_size=2)
        zf.writestr("dataset.json", json.dumps({**meta, "scaling_factor": 0.3}))
    return path


FIT = ["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=2"]
EVALUATE_FID = ["evaluate", "--metrics", "fid", "--num_samples", "4", "--steps", "1"]
PROBE_NTK = ["probe", "ntk", "--num_points", "2", "--num_kernel_points", "4", "--num_projections", "1"]
SD_TINY = ["fit", "--config", REPO / "experiments" / "musicscore_sd_tiny.yaml", "--trainer.max_steps=1"]

CASES = {
    "missing data set": (lambda t, c: ffhq_fit(t / "none.zip"), "does not exist"),
    "empty data set": (lambda t, c: ffhq_fit(dataset(t, "empty")), "contains no images"),
    "corrupted image": (lambda t, c: ffhq_fit(dataset(t, "corrupt")), "img00000001.png is not a readable image"),
    "wrong channel count": (lambda t, c: ffhq_fit(dataset(t, "rgba")), "has mode RGBA"),
    "non-square image": (lambda t, c: ffhq_fit(dataset(t, "non-square")), "must be square"),
    "label out of range": (
        lambda t, c: [*ffhq_fit(dataset(t, "label")), "--data.init_args.cond=true"],
        "labels must be integers >= 0",
    ),
    "malformed dataset.json": (
        lambda t, c: [*ffhq_fit(dataset(t, "json")), "--data.init_args.cond=true"],
        "dataset.json is not valid JSON",
    ),
    "bad YAML key": (lambda t, c: ["fit", "--config", QUICKSTART, "--model.init_args.lr=1"], "'lr' is not accepted"),
    "bad YAML type": (lambda t, c: ["fit", "--config", QUICKSTART, "--trainer.max_steps=many"], "max_steps"),
    "missing config": (lambda t, c: ["fit", "--config", t / "nope.yaml"], "nope.yaml"),
    "zero steps in a config": (
        lambda t, c: ["fit", "--config", QUICKSTART, *TINY, "--model.init_args.sampling.steps=0"],
        "steps",
    ),
    "negative sigma": (
        lambda t, c: ["fit", "--config", QUICKSTART, *TINY, "--model.init_args.sigma_min=-1"],
        "sigma_min",
    ),
    "missing checkpoint": (
        lambda t, c: ["sample", "--ckpt_path", t / "no.ckpt", "--out", t / "o.npz"],
        "no.ckpt does not exist",
    ),
    "checkpoint of another model": (
        lambda t, c: ["sample", "--ckpt_path", foreign_checkpoint(t), "--out", t / "o.npz"],
        "not a diffscore DiffusionModule checkpoint",
    ),
    "zero samples": (
        lambda t, c: ["sample", "--ckpt_path", c, "--out", t / "o.npz", "--num_samples", "0"],
        "num_samples",
    ),
    "negative samples": (lambda t, c: ["evaluate", "--ckpt_path", c, "--num_samples", "-5"], "num_samples"),
    "zero sampler steps": (lambda t, c: ["sample", "--ckpt_path", c, "--out", t / "o.npz", "--steps", "0"], "steps"),
    "unwritable output folder": (
        lambda t, c: ["sample", "--ckpt_path", c, "--out", QUICKSTART + "/o.npz"],
        "does not exist",
    ),
    "missing Inception weights": (
        lambda t, c: ["evaluate", "--ckpt_path", c, "--metrics", "fid", "--num_samples", "4", "--steps", "1"],
        "weights-inception-2015-12-05",
    ),
    "garbage checkpoint": (
        lambda t, c: ["sample", "--ckpt_path", garbage(t), "--out", t / "o.npz"],
        "garbage.ckpt is not a checkpoint",
    ),
    "trusted garbage checkpoint": (
        lambda t, c: ["sample", "--ckpt_path", garbage(t), "--out", t / "o.npz", "--trust_checkpoint", "true"],
        "garbage.ckpt is not a checkpoint",
    ),
    "truncated checkpoint to resume": (lambda t, c: [*FIT, "--ckpt_path", truncated(t, c)], "damaged or truncated"),
    "garbage checkpoint to resume": (lambda t, c: [*FIT, "--ckpt_path", garbage(t)], "is not a checkpoint"),
    "resume from another model's checkpoint": (
        lambda t, c: [*FIT, "--ckpt_path", foreign_checkpoint(t)],
        "holds a some.other.Model",
    ),
    "resume with weights of another network": (
        lambda t, c: [*FIT, "--ckpt_path", edited(t, c, drop_a_weight)],
        "its weights do not fit the configured model",
    ),
    "checkpoint naming a function to build": (
        lambda t, c: [*FIT, "--ckpt_path", edited(t, c, name_a_command)],
        "'os.system', a class diffscore does not build from a file",
    ),
    "saved backbone arguments that fail": (
        lambda t, c: ["sample", "--ckpt_path", edited(t, c, negative_channels), "--out", t / "o.npz"],
        "rejects the saved arguments",
    ),
    "YAML infinity": (
        lambda t, c: [*FIT, "--config", yaml_file(t, "model:\n  init_args:\n    sampling:\n      sigma_max: .inf\n")],
        "model.init_args.sampling.sigma_max = inf is not a finite number",
    ),
    "YAML NaN": (
        lambda t, c: [*FIT, "--config", yaml_file(t, "model:\n  init_args:\n    P_std: .nan\n")],
        "model.init_args.P_std = nan is not a finite number",
    ),
    "binary garbage as the config": (
        lambda t, c: ["fit", "--config", garbage(t, "config.yaml")],
        "is not a text (UTF-8) YAML file",
    ),
    "negative max_steps": (lambda t, c: [*FIT, "--trainer.max_steps=-2"], "max_steps"),
    "no logger for a LearningRateMonitor": (
        lambda t, c: [*ffhq_fit(dataset(t, "ok")), "--trainer.logger=false"],
        "LearningRateMonitor",
    ),
    "sample into the working folder": (
        lambda t, c: ["sample", "--ckpt_path", c, "--out", ".", "--overwrite", "true"],
        "is the working folder",
    ),
    "overwrite a folder sample did not write": (
        lambda t, c: ["sample", "--ckpt_path", c, "--out", not_samples(t), "--overwrite", "true"],
        "was not written by `diffscore sample`",
    ),
    "evaluate into an existing folder": (
        lambda t, c: ["evaluate", "--ckpt_path", c, "--out", t, "--num_samples", "4"],
        "is a folder",
    ),
    "evaluate with batch size 0": (lambda t, c: ["evaluate", "--ckpt_path", c, "--batch_size", "0"], "batch_size"),
    "seed beyond 64 bits": (
        lambda t, c: ["sample", "--ckpt_path", c, "--out", t / "o.npz", "--seed", str(2**64)],
        "must lie in 0..2**63-1",
    ),
    "more samples than memory": (
        lambda t, c: ["sample", "--ckpt_path", c, "--out", t / "o.npz", "--num_samples", str(10**13)],
        "GiB is free",
    ),
    "NTK reference of another network": (
        lambda t, c: [*PROBE_NTK, "--ckpt_path", c, "--reference_ckpt", another_network(t)],
        "holds another network",
    ),
    "a folder that is not a diffusers model": (
        lambda t, c: ["sample", "--ckpt_path", sd_folder(t, "not diffusers"), "--out", t / "o.npz"],
        "no model_index.json, so not a diffusers model folder",
    ),
    "a Stable Diffusion folder without its VAE": (
        lambda t, c: ["sample", "--ckpt_path", sd_folder(t, "no vae"), "--out", t / "o.npz"],
        "vae/config.json: missing",
    ),
    "a model_index.json without a component": (
        lambda t, c: ["sample", "--ckpt_path", sd_folder(t, "no component"), "--out", t / "o.npz"],
        "model_index.json: no text_encoder component",
    ),
    "pickled .bin weights": (
        lambda t, c: ["sample", "--ckpt_path", sd_folder(t, "bin"), "--out", t / "o.npz"],
        "pickled weights can run code when loaded; convert them to .safetensors, or pass --trust_checkpoint true",
    ),
    "a VAE whose latents do not fit the U-Net": (
        lambda t, c: ["sample", "--ckpt_path", sd_folder(t, "vae"), "--out", t / "o.npz"],
        "do not match vae/config.json latent_channels 3",
    ),
    "a Stable Diffusion U-Net with a NaN weight": (
        lambda t, c: ["sample", "--ckpt_path", sd_folder(t, "nan"), "--out", t / "o.npz"],
        "unet: weight conv_in.weight holds 1 non-finite value (NaN/Inf)",
    ),
    "a Stable Diffusion config that is a FIFO": (
        lambda t, c: ["sample", "--ckpt_path", sd_folder(t, "fifo"), "--out", t / "o.npz"],
        "unet/config.json is a FIFO",
    ),
    "fine-tuning without the pretrained folder": (
        lambda t, c: [*SD_TINY, f"--data.init_args.path={latent_zip(t)}"],
        "model.init_args.pretrained is required",
    ),
    "fine-tuning on data that is not a latent dataset": (
        lambda t, c: [*SD_TINY, f"--model.init_args.pretrained={sd_folder(t)}", f"--data.init_args.path={t}"],
        "is not a latent dataset",
    ),
    "DDIM's grid on a continuous-time model": (
        lambda t, c: ["sample", "--ckpt_path", c, "--out", t / "o.npz", "--grid", "ddim"],
        "--grid ddim needs a discrete-time model",
    ),
    "encoding with a folder that holds no VAE": (
        lambda t, c: ["dataset", "--source", dataset(t, "ok"), "--dest", t / "l.zip", "--encode", t / "data"],
        "config.json: missing",
    ),
    "missing CIFAR-10": (
        lambda t, c: ["fit", "--config", REPO / "experiments" / "cifar10.yaml", f"--data.init_args.root={t}"],
        "cifar-10-python.tar.gz",
    ),
    # issue 34, class 1: code execution through the Inception weights (the swapped file: tests/metrics)
    "Inception weights that would run code": (
        lambda t, c: [*EVALUATE_FID, "--ckpt_path", c, "--inception_weights", runs_code(t)],
        "evil.pth is not a plain weights file (UnpicklingError)",
    ),
    # class 2: a PNG with corrupt compressed data crashed `fit` (exit 139 in torchvision's decoder)
    "corrupt compressed PNG data": (
        lambda t, c: ffhq_fit(dataset(t, "corrupt-idat")),
        ".png is not a readable image (broken data stream when reading image file)",
    ),
    # class 3: the EDM-pickle tensor check bypassed by BUILD; a network declared far larger than its file
    "EDM pickle tensor grown after its check": (
        lambda t, c: ["sample", "--ckpt_path", edm_pickle(t, "grown"), "--out", t / "o.npz"],
        "holds state set on a Tensor after it was built (BUILD)",
    ),
    "EDM pickle of stride-0 views declaring 2.1 GB": (
        lambda t, c: ["sample", "--ckpt_path", edm_pickle(t, "huge"), "--out", t / "o.npz"],
        "(9,437,184 elements) on a storage of 1: a view that repeats its storage",
    ),
    # class 5: silently wrong results
    "NaN in the Inception weights": (
        lambda t, c: [*EVALUATE_FID, "--ckpt_path", c, "--inception_weights", inception_weights(t, nan_weight)],
        "inception.pth: weight fc.weight holds 1 non-finite value (NaN/Inf)",
    ),
    "reference statistics with NaN": (
        lambda t, c: [
            *EVALUATE_FID,
            "--ckpt_path",
            c,
            "--inception_weights",
            inception_weights(t),
            "--ref",
            reference(t, "nan"),
        ],
        "ref.npz: mu holds NaN or Inf values",
    ),
    "reference statistics with a negative covariance": (
        lambda t, c: [
            *EVALUATE_FID,
            "--ckpt_path",
            c,
            "--inception_weights",
            inception_weights(t),
            "--ref",
            reference(t, "negative"),
        ],
        "negative beyond round-off; it is no covariance",
    ),
    "reference statistics of digits features for FID": (
        lambda t, c: [
            *EVALUATE_FID,
            "--ckpt_path",
            c,
            "--inception_weights",
            inception_weights(t),
            "--ref",
            reference(t, "digits"),
        ],
        "holds statistics of 64-dimensional features, but they are compared with 2048-dimensional ones",
    ),
    "a label of 1e9 classes": (
        lambda t, c: [*ffhq_fit(dataset(t, "huge-label")), "--data.init_args.cond=true"],
        "is 1000000000; labels must be integers >= 0 and < 100,000",
    ),
    "a string label written by dataset": (
        lambda t, c: ["dataset", "--source", source_with(t, "label"), "--dest", t / "out.zip"],
        "the label of 00000/img00000001.png is '7'; labels must be integers",
    ),
    # class 6: hangs and memory
    "a FIFO named .png in a dataset source": (
        lambda t, c: ["dataset", "--source", source_with(t, "fifo"), "--dest", t / "out.zip"],
        "zz.png is a FIFO (named pipe), not a regular file; remove it",
    ),
    "a link to /dev/zero named .png": (
        lambda t, c: ffhq_fit(dataset(t, "dev-zero")),
        "img00000001.png is a character device, not a regular file; remove it",
    ),
    "a ZIP member inflating to a gigabyte": (
        lambda t, c: ffhq_fit(zip_bomb_dataset(t)),
        "bomb.zip:00000/img00000002.png declares 1,073,741,857 bytes",
    ),
    "NaN in a checkpoint's weights": (
        lambda t, c: ["sample", "--ckpt_path", edited(t, c, nan_in_a_weight), "--out", t / "o.npz"],
        "holds 1 non-finite value (NaN/Inf)",
    ),
    "a checkpoint naming os.system": (
        lambda t, c: ["sample", "--ckpt_path", names_os_system(t), "--out", t / "o.npz"],
        f"asks to import {RunsShell().__reduce__()[0].__module__}.system",
    ),
    "a saved hyper-parameter of the wrong type": (
        lambda t, c: ["sample", "--ckpt_path", edited(t, c, sigma_data_as_text), "--out", t / "o.npz"],
        "could not convert string to float: 'half'",
    ),
    "--sampler_kwargs of the wrong type": (
        lambda t, c: ["sample", "--ckpt_path", c, "--out", t / "o.npz", "--sampler_kwargs", '{"s_churn": "x"}'],
        "--sampler_kwargs: Expected a <class 'float'>",
    ),
    "an accelerator this install lacks": (lambda t, c: [*FIT, "--trainer.accelerator=tpu"], "torch_xla"),
    "convert of a diffusers folder": (
        lambda t, c: ["convert", "--src", diffusers_folder(t), "--out", t / "sd.ckpt"],
        "is a diffusers folder: pass it as it is to --ckpt_path",
    ),
    "resuming a digits checkpoint with gmm.yaml": (
        lambda t, c: ["fit", "--config", REPO / "experiments" / "gmm.yaml", "--ckpt_path", c],
        "was trained on DigitsDataModule, but the config's data is GMMDataModule",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no Inception weights anywhere
    monkeypatch.delenv("DIFFSCORE_INCEPTION_WEIGHTS", raising=False)
    make_args, needle = CASES[case]
    args = [str(a) for a in make_args(tmp_path, tiny_ckpt)]  # writes the bad input itself
    before = {p for p in tmp_path.rglob("*")}
    code = run_cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err and err[-1].startswith("diffscore: error:"), err[-3:]
    assert needle in err[-1], err[-1]
    created = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in created if p.suffix in (".ckpt", ".npz", ".png", ".json") or ".tmp" in p.name], created


def test_overwrite_leaves_a_folder_it_did_not_write(tiny_ckpt, tmp_path):
    mine = not_samples(tmp_path)
    assert run_cli(["sample", "--ckpt_path", tiny_ckpt, "--out", mine, "--overwrite", "true"]) == 2
    assert (mine / "keep.txt").read_text() == "a user's file"
    # its own output it may replace
    ours = tmp_path / "ours"
    args = ["sample", "--ckpt_path", tiny_ckpt, "--out", ours, "--num_samples", "2", "--steps", "1"]
    assert run_cli(args) == 0
    assert run_cli([*args, "--overwrite", "true", "--num_samples", "3"]) == 0
    assert len(list(ours.glob("*.png"))) == 3


def test_a_full_disk_while_sampling_is_one_line_and_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o.npz"))

    monkeypatch.setattr("diffscore.commands.sample.np.savez", full)
    args = ["sample", "--ckpt_path", tiny_ckpt, "--out", tmp_path / "o.npz", "--num_samples", "2", "--steps", "1"]
    assert run_cli(args) == 2
    assert "no space left on the device" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(in_tmp, monkeypatch, capsys):
    import errno
    from pathlib import Path

    assert run_cli([*FIT, "--trainer.max_steps=2"]) == 0
    (ckpt,) = in_tmp.glob("runs/**/last.ckpt")
    before = ckpt.read_bytes()

    def full(obj, f, *args, **kwargs):  # the disk fills half-way through the write
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    assert run_cli([*FIT, "--trainer.max_steps=4", "--ckpt_path", ckpt]) == 2
    assert "no space left on the device" in capsys.readouterr().err.strip().splitlines()[-1]
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
