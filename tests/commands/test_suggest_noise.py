"""`diffscore suggest-noise` end to end: the YAML it writes parses, feeds `diffscore fit`, and holds the core
functions' values for the same training data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from diffscore.core.gaussian import GaussianDenoiser
from diffscore.core.noise_levels import suggest_noise_levels, teleport_level
from diffscore.lit.datamodules.base import train_images
from diffscore.lit.datamodules.from_file import datamodule_from_section
from diffscore.lit.datamodules.images import ImageDataModule
from tests.conftest import GMM, QUICKSTART, REPO, run_cli
from tests.fixtures import random_images, write_dataset

LEGACY = REPO / "tests" / "data_files" / "quickstart-2026-11.ckpt"  # a real tiny quickstart checkpoint
KEYS = ("sigma_data", "sigma_min", "sigma_max", "P_mean", "P_std")


def expected_for(dm) -> dict[str, float]:
    return suggest_noise_levels(GaussianDenoiser.from_data(train_images(dm))).as_dict()


def flat(init_args: dict) -> dict[str, float]:
    """The five settings of a DiffusionModule's init_args (the grid ends sit under ``sampling``)."""
    return {**{k: v for k, v in init_args.items() if k != "sampling"}, **init_args.get("sampling", {})}


def read_yaml(folder: Path) -> dict[str, float]:
    return flat(yaml.safe_load((folder / "noise.yaml").read_text())["model"]["init_args"])


def test_gmm_config_yaml_equals_the_core_and_pastes_into_fit(tmp_path, capsys):
    out = tmp_path / "gmm"
    assert run_cli(["suggest-noise", "--config", GMM, "--out", out]) == 0
    got = read_yaml(out)
    expected = expected_for(datamodule_from_section(yaml.safe_load(Path(GMM).read_text())["data"]))
    assert sorted(got) == sorted(KEYS)
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key  # 6 significant digits
    summary = json.loads((out / "noise.json").read_text())
    assert summary["sigma_max_centered"] == pytest.approx(expected["sigma_max_centered"], rel=1e-12)
    assert summary["band"] == pytest.approx(list(expected["band"]), rel=1e-12)
    assert (out / "noise.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "sigma_max" in printed and "sigma_data = the RMS about zero, sqrt((tr Sigma + |mu|^2) / D)" in printed
    scales = expected["data_scales"]  # the rule is stated with the three candidates it was chosen from
    assert (
        f"per-pixel std {scales['per_pixel']:.4g}, pooled std {scales['pooled']:.4g}, RMS {scales['rms']:.4g}"
        in printed
    )
    assert summary["sigma_data_rule"].startswith("sigma_data = the RMS") and got["sigma_data"] == pytest.approx(
        scales["rms"], rel=1e-5
    )
    # the file is a config layer: `diffscore fit --config gmm.yaml --config noise.yaml` trains with its values
    assert run_cli(["fit", "--config", GMM, "--config", out / "noise.yaml", "--print_config"]) == 0
    printed = flat(yaml.safe_load(capsys.readouterr().out)["model"]["init_args"])
    assert {k: printed[k] for k in KEYS} == got


def test_image_folder_data_equals_the_core(tmp_path):
    data = write_dataset(tmp_path / "imgs", random_images(40, size=8, channels=3))
    out = tmp_path / "o"
    assert run_cli(["suggest-noise", "--data", data, "--out", out]) == 0
    expected = expected_for(ImageDataModule(str(data), num_workers=0, pin_memory=False))
    got = read_yaml(out)
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    assert got["sigma_data"] == pytest.approx(0.577, abs=0.02)  # uniform bytes in [-1, 1]: std 1 / sqrt(3)


def test_checkpoint_gives_the_teleport_level_of_its_ev_curve(tmp_path):
    out = tmp_path / "t"
    assert run_cli(["suggest-noise", "--ckpt_path", LEGACY, "--out", out, "--num_points", "32"]) == 0
    summary = json.loads((out / "noise.json").read_text())
    ev = {float(s): v for s, v in summary["ev_gaussian"].items()}
    level = summary["teleport_sigma"]
    assert level == teleport_level(list(ev), list(ev.values()), 0.99)
    assert level is not None and all(v >= 0.99 for s, v in ev.items() if s >= level)  # the stated rule
    assert ev[max(s for s in ev if s < level)] < 0.99
    assert f"--teleport.sigma {summary['teleport_sigma']:.4g}" in (out / "noise.yaml").read_text()
    # the checkpoint's data are the quickstart digits: the same suggestions as from the config
    expected = expected_for(datamodule_from_section(yaml.safe_load(Path(QUICKSTART).read_text())["data"]))
    assert read_yaml(out)["sigma_max"] == pytest.approx(expected["sigma_max"], rel=1e-5)


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "--config X.yaml, --data PATH"),
        (["--config", GMM, "--data", "x.zip"], "not both"),
        (["--config", "/no/such.yaml"], "does not exist"),
        (["--config", GMM, "--kl_tolerance", "0"], "--kl_tolerance"),
        (["--config", GMM, "--quantization_step", "-1"], "--quantization_step"),
        (["--ckpt_path", str(LEGACY), "--config", GMM], "makes [1, 8, 8]"),
    ],
)
def test_bad_input(tmp_path, capsys, args, needle):
    assert run_cli(["suggest-noise", "--out", tmp_path / "o", *args]) == 2
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]
