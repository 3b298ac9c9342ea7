"""One table of bad inputs across the commands: each gives one clear line naming the problem, a non-zero exit,
and leaves no partial output behind."""

import json

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
    return d


def foreign_checkpoint(tmp):
    p = tmp / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "some.other.Model", "backbone": {}}}, p)
    return p


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
        lambda t, c: ["fit", "--config", QUICKSTART, *TINY, "--model.init_args.num_steps=0"],
        "num_steps",
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
    "missing CIFAR-10": (
        lambda t, c: ["fit", "--config", REPO / "experiments" / "cifar10.yaml", f"--data.init_args.root={t}"],
        "cifar-10-python.tar.gz",
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
