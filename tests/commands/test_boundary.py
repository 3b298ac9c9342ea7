"""The one error boundary (diffscore/commands/boundary.py): every failure is one line and a non-zero exit."""

from __future__ import annotations

import errno
import json
import stat

import pytest
import torch

from diffscore.commands.boundary import one_line
from tests.conftest import QUICKSTART, TINY, run_cli


@pytest.mark.parametrize(
    "error, needle",
    [
        (OSError(errno.ENOSPC, "No space left on device", "o.npz"), "no space left on the device writing o.npz"),
        (OSError(errno.EROFS, "Read-only file system", "out"), "cannot write out (Read-only file system)"),
        (OSError(errno.EACCES, "Permission denied", "out"), "cannot write out (Permission denied)"),
        (RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file"), "disk"),
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (KeyError("surprise"), "internal error: KeyError"),
    ],
)
def test_every_failure_is_one_line_that_says_what_to_do(error, needle):
    message = one_line(error)
    assert needle in message and "\n" not in message


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("diffscore: error:") and "Traceback" not in "\n".join(err), err[-5:]
    return err[-1]


def test_a_full_disk_inside_torch_save_is_one_line(tmp_path, monkeypatch, capsys):
    """torch.save reports a full disk as a RuntimeError, not an OSError: `convert` printed a traceback."""
    from tests.loading.test_edm_network import song_pickle

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 512 vs 0")

    path, _ = song_pickle(tmp_path)
    monkeypatch.setattr(torch, "save", full)
    assert run_cli(["convert", "--src", path, "--out", tmp_path / "n.ckpt"]) == 2
    assert "the disk is full or the place is not writable" in _one_error_line(capsys)
    assert not list(tmp_path.glob("*.ckpt")) and not list(tmp_path.glob(".n.ckpt*"))


def test_a_read_only_output_folder_is_one_line(tmp_path, capsys):
    if __import__("os").geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    assert run_cli(["suggest-noise", "--config", QUICKSTART, "--out", folder / "noise"]) == 2
    assert "not writable" in _one_error_line(capsys)


def test_report_names_a_value_that_is_not_a_number(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": "NaN-ish"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert run_cli(["report", run]) == 2
    assert "train/loss='NaN-ish', not a number" in _one_error_line(capsys)


def test_huge_requests_are_refused_before_anything_is_allocated(tiny_ckpt, tmp_path, capsys):
    args = ["evaluate", "--ckpt_path", tiny_ckpt, "--seeds", "0-9999999999", "--steps", "1"]
    assert run_cli(args) == 2
    assert "--seeds 0-9999999999 needs about" in _one_error_line(capsys)
    gmm = ["fit", "--config", QUICKSTART.replace("quickstart", "gmm"), "--data.init_args.num_train=100000000000"]
    assert run_cli([*gmm, "--trainer.max_steps=1"]) == 2
    assert "GMM samples" in _one_error_line(capsys)


def test_a_teleport_gaussian_that_is_not_one_is_one_line(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "g.pt"
    torch.save({"mean": "not a tensor"}, bad)
    args = ["sample", "--ckpt_path", tiny_ckpt, "--out", tmp_path / "s.npz", "--num_samples", "1"]
    assert run_cli([*args, "--steps", "3", "--teleport.skip", "1", "--teleport.gaussian", bad]) == 2
    assert "is not a fitted Gaussian" in _one_error_line(capsys)


def test_validate_prints_one_column_per_split_not_per_loader(in_tmp, capsys):
    assert run_cli(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=2", "--trainer.logger=false"]) == 0
    (ckpt,) = in_tmp.glob("runs/**/last.ckpt")
    capsys.readouterr()
    assert run_cli(["validate", "--config", QUICKSTART, *TINY, f"--ckpt_path={ckpt}", "--trainer.logger=false"]) == 0
    out = capsys.readouterr()
    assert "heldout    train_eval           gap" in out.out and "DataLoader 1" not in out.out
    assert "WeightAveraging" not in out.err
