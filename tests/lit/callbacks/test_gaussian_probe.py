import json

import numpy as np
import pytest
import torch

from diffscore.core.gaussian import GaussianDenoiser, score_explained_variance
from diffscore.probes.gaussian import build_references, explained_variance_table
from tests.conftest import run_cli


def test_ev_of_a_reference_against_itself_is_one_and_gaussian_dominates_at_large_sigma():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.diag(
        torch.tensor([2.0, 1.0, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    )
    refs = build_references(train, [3])
    for name, ref in refs.items():
        table = explained_variance_table(ref, train, {name: ref}, sigmas=(0.05, 1.0, 20.0), num_points=50)
        assert all(v == pytest.approx(1.0, abs=1e-9) for v in table[name].values())
    # the delta mixture (the training set's exact score) is Gaussian at large sigma, not at small
    table = explained_variance_table(
        refs["delta"], train, {"gaussian": refs["gaussian"]}, sigmas=(0.01, 50.0), num_points=50
    )
    assert table["gaussian"][50.0] > 0.999 and table["gaussian"][0.01] < 0.5


def test_explained_variance_formula():
    x = torch.zeros(2, 3)
    dn = torch.tensor([[1.0, 0, 0], [0, 2.0, 0]])
    dr = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    torch.testing.assert_close(score_explained_variance(dn, dr, x), torch.tensor([1.0, 0.75], dtype=torch.float64))


def test_probe_gaussian_command(tiny_ckpt, tmp_path, capsys):
    assert (
        run_cli(
            [
                "probe",
                "gaussian",
                "--ckpt_path",
                tiny_ckpt,
                "--out",
                tmp_path / "probe",
                "--num_points",
                "32",
                "--gmm_components",
                "[2]",
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "probe" / "ev.json").read_text())
    assert set(table) == {"gaussian", "gmm2", "delta"} and len(table["gaussian"]) == 13
    assert (tmp_path / "probe" / "ev.png").is_file()
    assert "gaussian" in capsys.readouterr().out


def test_sample_with_teleport_reports_nfe_and_matches_manual_teleport(tiny_ckpt, tmp_path, capsys):
    out, gauss = tmp_path / "t.npz", tmp_path / "g.pt"
    assert (
        run_cli(
            [
                "sample",
                "--ckpt_path",
                tiny_ckpt,
                "--out",
                out,
                "--num_samples",
                "3",
                "--steps",
                "6",
                "--teleport.skip",
                "2",
                "--teleport.gaussian",
                gauss,
            ]
        )
        == 0
    )
    assert gauss.is_file()
    from diffscore.core.gaussian import teleport
    from diffscore.core.samplers import heun
    from diffscore.core.schedules import karras_sigmas
    from diffscore.loading.open import open_model
    from diffscore.sampling.seeds import seed_generators, seeded_noise

    model = open_model(tiny_ckpt)
    sigmas = karras_sigmas(6)
    x = seeded_noise(seed_generators(range(3), "cpu"), (1, 8, 8), "cpu") * 80.0
    x, rest = teleport(GaussianDenoiser.load(gauss), x, sigmas, 2)
    manual = heun(model.network, x, rest)
    np.testing.assert_allclose(np.load(out)["samples"], manual.numpy(), atol=1e-5)


def test_teleport_nfe_message(tiny_ckpt, tmp_path, capsys):
    assert (
        run_cli(
            [
                "sample",
                "--ckpt_path",
                tiny_ckpt,
                "--out",
                tmp_path / "a.npz",
                "--num_samples",
                "1",
                "--steps",
                "18",
                "--teleport.sigma",
                "8.5",
            ]
        )
        == 0
    )
    assert "heun with 12 of 18 steps, 23 instead of 35 evaluations" in capsys.readouterr().out
    assert (
        run_cli(
            [
                "sample",
                "--ckpt_path",
                tiny_ckpt,
                "--out",
                tmp_path / "b.npz",
                "--num_samples",
                "1",
                "--teleport.skip",
                "1",
                "--teleport.sigma",
                "3",
            ]
        )
        != 0
    )
    assert "not both" in capsys.readouterr().err
