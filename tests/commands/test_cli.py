import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import GMM, QUICKSTART, REPO, TINY, run_cli

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_yaml_parses(config, capsys):
    assert run_cli(["fit", "--config", config, "--print_config"]) == 0
    assert "class_path" in capsys.readouterr().out


def test_quickstart_fast_dev_run(in_tmp):
    assert run_cli(["fit", "--config", QUICKSTART, "--trainer.fast_dev_run=true"]) == 0


def test_gmm_fast_dev_run(in_tmp):
    assert (
        run_cli(
            [
                "fit",
                "--config",
                GMM,
                "--trainer.fast_dev_run=true",
                "--model.init_args.backbone.init_args.width=32",
            ]
        )
        == 0
    )


def test_fit_writes_checkpoint_and_grid_and_says_where(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the configs' real logger, offline as on these machines
    import wandb

    wandb.teardown()  # wandb keeps the settings of the first run in this process (tests run with it disabled)
    assert run_cli(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=4"]) == 0
    out = capsys.readouterr().out
    (ckpt,) = in_tmp.glob("runs/diffscore-quickstart/*/checkpoints/last.ckpt")
    (grid,) = in_tmp.glob("runs/diffscore-quickstart/*/samples/grid_step0000004.png")
    assert ckpt.parent.parent == grid.parent.parent  # one folder per run
    assert f"last checkpoint: {ckpt.relative_to(in_tmp)}" in out
    assert f"sample grid: {grid.relative_to(in_tmp)}" in out
    assert list(in_tmp.glob("runs/wandb/offline-run-*"))
    from PIL import Image

    assert Image.open(grid).size[0] >= 64  # 8x8 digits are blown up to be seen


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model.init_args.not_an_option=1"], "not_an_option"),
        (["--trainer.max_stepz=3"], "max_stepz"),
        (["--model.init_args.sampling.steps=0"], "steps"),
        (["--data.init_args.batch_size=0"], "batch_size"),
        (["--data.init_args.num_train=99999"], "num_train"),
        (["--model.init_args.sampling.sampler=dpm9"], "dpm9"),
    ],
)
def test_bad_config_fails_with_one_clear_line(in_tmp, capsys, args, needle):
    code = run_cli(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=2", *args])
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err.strip().splitlines()[-1] or needle in err
    assert not list(in_tmp.glob("runs/**/*.ckpt"))


def test_missing_config_file(in_tmp, capsys):
    assert run_cli(["fit", "--config", "nope.yaml"]) != 0
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes(in_tmp):
    cmd = [
        sys.executable,
        "-m",
        "diffscore.commands",
        "fit",
        "--config",
        QUICKSTART,
        *TINY,
        "--trainer.max_steps=3",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]
    proc = subprocess.run(cmd, cwd=in_tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next(Path(in_tmp).glob("runs/**/checkpoints/last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    assert "current_model_state" in state  # EMA and raw weights both saved
    # the 2-device checkpoint resumes on one device, where the two stopped in the data stream
    resume = ["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=5", f"--ckpt_path={ckpt}"]
    assert run_cli(resume) == 0
    resumed = max(Path(in_tmp).glob("runs/**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(resumed, map_location="cpu", weights_only=False)
    assert state["global_step"] == 5
    (dm_state,) = [v for k, v in state.items() if "DataModule" in k]
    assert dm_state == {"stream_consumed": 5 * 32}  # total batch 32: 3 steps on two devices, 2 on one


def test_resume_continues_the_run_in_its_folder(in_tmp, capsys):
    """--ckpt_path of a run continues that run: same folder (and wandb id), its own config record per start, no
    'dataloader not resumable' warning, and a given model setting that the saved one replaces is named."""
    import warnings

    assert run_cli(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=2"]) == 0
    (run,) = (in_tmp / "runs" / "diffscore-quickstart").iterdir()
    capsys.readouterr()
    resume = [*TINY, "--trainer.max_steps=4", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli(["fit", "--config", QUICKSTART, *resume, "--model.init_args.sampling.sigma_max=7"]) == 0
    out = capsys.readouterr().out
    assert "not used: model.sampling.sigma_max=7.0 (saved 80.0)" in out
    assert not [w for w in caught if "resumable" in str(w.message) or "exists and is not empty" in str(w.message)]
    assert [p.name for p in (in_tmp / "runs" / "diffscore-quickstart").iterdir()] == [run.name]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.resume-1.yaml", "config.yaml"]
    assert not (in_tmp / "runs" / "config.yaml").exists()  # no record shared by every run under runs/
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


def test_validate_logs_into_the_checkpoint_s_run(in_tmp):
    assert run_cli(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=2"]) == 0
    (run,) = (in_tmp / "runs" / "diffscore-quickstart").iterdir()
    assert run_cli(["validate", "--config", QUICKSTART, *TINY, f"--ckpt_path={run / 'checkpoints/last.ckpt'}"]) == 0
    assert [p.name for p in (in_tmp / "runs" / "diffscore-quickstart").iterdir()] == [run.name]
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.validate-1.yaml", "config.yaml"]
