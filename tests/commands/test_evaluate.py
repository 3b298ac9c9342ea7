import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from tests.fixtures import random_images, write_dataset


def test_evaluate_digits_writes_metrics_and_plot(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = run_cli(["evaluate", "--ckpt_path", tiny_ckpt, "--num_samples", "24", "--steps", "2", "--out", out])
    assert code == 0
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert result["metrics"] == ["fd_digits", "memorization"]
    assert run["num_samples"] == 24 and run["seeds"] == "0-23"
    assert run["fd_digits"] > run["fd_digits_heldout"] > 0  # 4 training steps are far from the data
    assert 0 <= run["memorized_fraction"] <= 1
    assert out.with_suffix(".nn_ratio.png").is_file()
    assert "fd_digits" in capsys.readouterr().out


def test_edm_protocol_runs_three_seed_ranges(tiny_ckpt, tmp_path):
    out = tmp_path / "e.json"
    assert (
        run_cli(
            [
                "evaluate",
                "--ckpt_path",
                tiny_ckpt,
                "--num_samples",
                "6",
                "--steps",
                "1",
                "--metrics",
                "memorization",
                "--protocol",
                "edm",
                "--out",
                out,
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [r["seeds"] for r in result["runs"]] == ["0-5", "6-11", "12-17"]
    values = [r["memorized_fraction"] for r in result["runs"]]
    assert result["memorized_fraction_min"] == min(values)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--metrics", "fid,bogus"], "bogus"),
        (["--num_samples", "0"], "num_samples"),
        (["--protocol", "best"], "protocol"),
        (["--seeds", "9-3"], "seeds"),
        (["--metrics", "fid", "--inception_weights", "/no/such/w.pth"], "w.pth"),
        (["--out", "/no/such/dir/x.json"], "does not exist"),
    ],
)
def test_evaluate_bad_input(tiny_ckpt, capsys, args, needle):
    assert run_cli(["evaluate", "--ckpt_path", tiny_ckpt, "--steps", "1", "--num_samples", "4", *args]) != 0
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]


def test_fid_kid_is_pipeline_with_random_inception(tmp_path, monkeypatch, random_inception):
    """Train 2 steps on a 16x16 RGB fixture through ffhq.yaml, cache reference statistics, evaluate."""
    data = write_dataset(tmp_path / "d.zip", random_images(24, 16), as_zip=True)
    monkeypatch.chdir(tmp_path)
    backbone = "--model.init_args.backbone.init_args"
    assert (
        run_cli(
            [
                "fit",
                "--config",
                REPO / "experiments" / "ffhq.yaml",
                "--trainer.accelerator=cpu",
                "--trainer.max_steps=2",
                "--trainer.enable_progress_bar=false",
                f"{backbone}.model_channels=8",
                f"{backbone}.num_blocks=1",
                "--model.init_args.sampling.steps=2",
                f"--data.init_args.path={data}",
                "--data.init_args.batch_size=4",
                "--data.init_args.num_workers=0",
            ]
        )
        == 0
    )
    ckpt = next(tmp_path.glob("runs/**/last.ckpt"))
    ref = tmp_path / "ref.npz"
    assert run_cli(["refstats", "--ckpt_path", ckpt, "--out", ref, "--inception_weights", random_inception]) == 0
    out = tmp_path / "fid.json"
    assert (
        run_cli(
            [
                "evaluate",
                "--ckpt_path",
                ckpt,
                "--metrics",
                "fid,kid,is,fid_k,memorization",
                "--ref",
                ref,
                "--num_samples",
                "16",
                "--fid_k",
                "[8]",
                "--steps",
                "2",
                "--inception_weights",
                random_inception,
                "--out",
                out,
            ]
        )
        == 0
    )
    run = json.loads(out.read_text())["runs"][0]
    assert run["fid"] > 0 and run["is"] >= 1 and "kid" in run and run["fid_8"] > 0


@pytest.mark.slow
def test_distributed_evaluation_on_two_processes(tiny_ckpt, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    base = [
        "evaluate",
        "--ckpt_path",
        str(tiny_ckpt),
        "--num_samples",
        "7",
        "--steps",
        "2",
        "--batch_size",
        "2",
        "--metrics",
        "fd_digits,memorization",
    ]
    assert run_cli([*base, "--out", one]) == 0
    for out in (two, None):  # with --out, and without (the ranks must still agree on where the parts go)
        opts = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", *(["--out", str(out)] if out else [])]
        cmd = [sys.executable, "-m", "diffscore.commands", *base, *opts]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("0-6"))
    assert row.split()[1] == "7"
    a, b = json.loads(one.read_text())["runs"][0], json.loads(two.read_text())["runs"][0]
    assert b["num_samples"] == 7
    assert b["fd_digits"] == pytest.approx(a["fd_digits"], rel=1e-4)
    assert b["nn_ratio_median"] == pytest.approx(a["nn_ratio_median"], rel=1e-4)


def test_leakage_is_reported_beside_real_digits(tiny_ckpt, tmp_path):
    out = tmp_path / "leak.json"
    args = ["evaluate", "--ckpt_path", tiny_ckpt, "--num_samples", "16", "--steps", "2", "--metrics", "leakage"]
    assert run_cli([*args, "--out", out]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert 0 <= run["leakage"] <= 1 and 0 < run["leakage_real"] < 0.15


def test_scoreaug_digits_runs_check_leakage_by_default():
    """A checkpoint trained with ScoreAug (today's augmenter list or an older main's arm string) gets the leakage
    check among its default metrics; one trained without does not."""
    from diffscore.commands.evaluate import wanted_metrics
    from diffscore.loading.open import open_model
    from diffscore.metrics.suite import auto_metrics

    files = REPO / "tests" / "data_files"
    scoreaug = open_model(files / "scoreaug-2026-12.ckpt")
    assert wanted_metrics("auto", scoreaug) == {"fd_digits", "memorization", "leakage"}
    assert wanted_metrics("auto", open_model(files / "quickstart-2026-11.ckpt")) == {"fd_digits", "memorization"}
    assert auto_metrics((3, 32, 32), scoreaug=True) == "fid,memorization"


def test_refstats_reads_a_configs_data_section_and_makes_its_folders(tmp_path):
    """`refstats --config X.yaml` (as `suggest-noise --config`; --data_config too) reads the YAML's data: section;
    the digits' features are picked for 8x8 digits without --features; the output's folders are created, and a
    file it did not write is never replaced."""
    from tests.conftest import QUICKSTART

    out = tmp_path / "refs" / "digits.npz"
    assert run_cli(["refstats", "--config", QUICKSTART, "--out", out]) == 0
    with np.load(out) as ref:
        assert ref["mu"].shape == (ref["sigma"].shape[0],) and ref["sigma"].shape[0] > 1
        assert str(ref["written_by"]) == "diffscore refstats"
    assert run_cli(["refstats", "--data_config", QUICKSTART, "--features", "digits", "--out", out]) == 0  # its own
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, mu=np.zeros(2), sigma=np.eye(2))
    assert run_cli(["refstats", "--config", QUICKSTART, "--out", theirs]) == 2
    assert np.load(theirs)["mu"].shape == (2,)
