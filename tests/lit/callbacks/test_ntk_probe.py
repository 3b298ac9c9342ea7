import json

import pytest

from diffscore.commands.report import report
from tests.conftest import REPO, run_cli

NTK_GMM = str(REPO / "experiments" / "ntk_gmm.yaml")
SMALL = [
    "--model.init_args.backbone.init_args.width=64",
    "--data.init_args.num_val=64",
    "--trainer.logger=false",
    "--trainer.val_check_interval=10",
    "--trainer.limit_val_batches=1",
]


def _probe_args(every: int, num_points: int = 8, **extra) -> list[str]:
    """Replace the config's callbacks by RunLog + a small NTKProbe + checkpoints."""
    init = {"every_n_steps": every, "num_points": num_points, **extra}
    probe = {"class_path": "diffscore.lit.callbacks.NTKProbe", "init_args": init}
    runlog = {"class_path": "diffscore.lit.callbacks.RunLog", "init_args": {"every_n_steps": every}}
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    return [f"--trainer.callbacks={json.dumps([probe, runlog, ckpt])}"]


def test_ntk_gmm_fast_dev_run(in_tmp):
    assert run_cli(["fit", "--config", NTK_GMM, "--trainer.fast_dev_run=true", *SMALL[:1]]) == 0
    (summary,) = in_tmp.glob("runs/**/probes/ntk.json")
    history = json.loads(summary.read_text())["history"]
    assert history[0]["step"] == 0 and history[0]["ntk/drift"] == 0.0 and history[0]["ntk/twin_rel_error"] == 0.0


def _history(root):
    (summary,) = root.glob("**/probes/ntk.json")
    return json.loads(summary.read_text())


@pytest.mark.slow
def test_probe_curves_early_stopping_point_and_report(in_tmp, capsys):
    assert run_cli(["fit", "--config", NTK_GMM, *SMALL, "--trainer.max_steps=20", *_probe_args(5)]) == 0
    summary = _history(in_tmp)
    history = summary["history"]
    assert [r["step"] for r in history] == [0, 5, 10, 15, 20]
    first, last = history[0], history[-1]
    assert first["ntk/drift"] == 0.0 and first["ntk/twin_rel_error"] == 0.0  # K_0 and F_0 are the start
    assert first["ntk/twin_score_error_heldout"] == pytest.approx(first["ntk/score_error_heldout"])
    assert last["ntk/drift"] > 0 and 0 < last["ntk/twin_rel_error"] < 1
    assert last["ntk/score_error_heldout"] < first["ntk/score_error_heldout"]  # training learns the score
    assert all(r["ntk/eig0"] >= r["ntk/eig1"] >= r["ntk/eig4"] > 0 for r in history)
    crit = summary["criterion"]
    assert crit == "ntk/score_error_heldout" and summary["exact_score"] == "analytic mixture"
    best = min(history, key=lambda r: r[crit])
    assert summary["best_step"] == best["step"] and summary["best_value"] == best[crit]
    assert f"lowest {crit} at step {best['step']}" in capsys.readouterr().out
    (metrics,) = in_tmp.glob("**/metrics.jsonl")
    written = {p.name for p in report(str(metrics.parent))}
    assert {"ntk_score_error.png", "ntk_score_error_per_sigma.png", "ntk_kernel.png", "ntk_spectrum.png"} <= written

    # the command on the last checkpoint reproduces the callback's numbers of the same weights
    (ckpt,) = in_tmp.glob("**/checkpoints/last.ckpt")
    assert run_cli(["probe", "ntk", "--ckpt_path", ckpt, "--num_points", "8", "--out", in_tmp / "cmd"]) == 0
    cmd = json.loads((in_tmp / "cmd" / "ntk.json").read_text())
    for key in ("ntk/score_error_heldout", "ntk/score_error_train", "ntk/heldout_loss", "ntk/alignment", "ntk/eig0"):
        assert cmd[key] == pytest.approx(last[key], rel=1e-5), key


@pytest.mark.slow
def test_probe_command_with_a_reference_checkpoint(in_tmp):
    # the same seeded run stopped at step 10 is the step-10 state of the 20-step run
    for steps in (10, 20):
        args = ["fit", "--config", NTK_GMM, *SMALL, f"--trainer.max_steps={steps}", *_probe_args(10)]
        assert run_cli([*args, f"--trainer.default_root_dir=r{steps}"]) == 0
    (ref,) = in_tmp.glob("r10/**/last.ckpt")
    (ckpt,) = in_tmp.glob("r20/**/last.ckpt")
    out = in_tmp / "cmd"
    assert (
        run_cli(["probe", "ntk", "--ckpt_path", ckpt, "--reference_ckpt", ref, "--num_points", "8", "--out", out]) == 0
    )
    cmd = json.loads((out / "ntk.json").read_text())
    assert cmd["ntk/drift"] > 0 and 0 < cmd["ntk/twin_rel_error"] < 1
    # against itself: no drift, and the twin after 0 steps is the network
    assert run_cli(["probe", "ntk", "--ckpt_path", ckpt, "--reference_ckpt", ckpt, "--out", out]) == 0
    cmd = json.loads((out / "ntk.json").read_text())
    assert cmd["ntk/drift"] == 0.0 and cmd["ntk/twin_rel_error"] == 0.0


@pytest.mark.slow
def test_stop_at_minimum_stops_after_patience_probes(in_tmp, capsys):
    extra = {"stop_at_minimum": True, "patience": 2}
    fast = "--model.init_args.optimizer.init_args.lr=1.0"  # the minimum comes within tens of steps
    assert (
        run_cli(["fit", "--config", NTK_GMM, *SMALL, fast, "--trainer.max_steps=3000", *_probe_args(25, **extra)]) == 0
    )
    summary = _history(in_tmp)
    assert summary["stopped_at"] == summary["best_step"] + 2 * 25 < 3000
    assert summary["history"][-1]["step"] == summary["stopped_at"]
    assert "NTKProbe stops training" in capsys.readouterr().out


def test_bad_probe_option(in_tmp, capsys):
    assert run_cli(["fit", "--config", NTK_GMM, *SMALL, *_probe_args(5, kernel="exact")]) != 0
    assert "NTKProbe.kernel" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_command_on_image_data_uses_the_delta_mixture_and_projections(tiny_ckpt, tmp_path, capsys):
    args = ["--num_points", "4", "--num_kernel_points", "6", "--num_projections", "2", "--top_k", "3"]
    assert run_cli(["probe", "ntk", "--ckpt_path", tiny_ckpt, *args, "--out", tmp_path]) == 0
    out = capsys.readouterr().out
    assert "exact score: delta mixture of the training set; kernel: trace_estimate" in out
    result = json.loads((tmp_path / "ntk.json").read_text())
    assert result["ntk/eig0"] >= result["ntk/eig2"] and -1 <= result["ntk/alignment"] <= 1
    assert result["ntk/heldout_loss"] > 0 and result["ntk/score_error_train"] > 0
    assert "ntk/drift" not in result  # no reference checkpoint
