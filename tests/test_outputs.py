"""Outputs lose nothing (diffscore/outputs.py): a command replaces only what it wrote itself, never a non-regular
file, keeps what a user put into its folder, and leaves nothing behind when it stops."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from diffscore.commands.boundary import sigterm_raises
from diffscore.errors import DiffscoreError, Stopped
from diffscore.outputs import MANIFEST, check_folder, check_replaceable, folder_output, mark_of
from tests.conftest import run_cli


def test_a_file_diffscore_did_not_write_is_never_replaced(tiny_ckpt, tmp_path, capsys):
    """`evaluate --out` and `refstats --out` replaced any file (a 12 MB checkpoint became JSON)."""
    victim = tmp_path / "precious.ckpt"
    victim.write_bytes(tiny_ckpt.read_bytes())
    before = victim.read_bytes()
    args = ["evaluate", "--ckpt_path", tiny_ckpt, "--num_samples", "4", "--steps", "1", "--metrics", "memorization"]
    assert run_cli([*args, "--out", victim]) == 2
    assert "was not written by `diffscore evaluate`" in capsys.readouterr().err
    assert victim.read_bytes() == before
    out = tmp_path / "eval.json"
    assert run_cli([*args, "--out", out]) == 0 and mark_of(out) == "diffscore evaluate"
    assert run_cli([*args, "--out", out]) == 0  # its own output it replaces
    assert mark_of(out.with_suffix(".nn_ratio.png")) == "diffscore evaluate"


def test_a_device_or_fifo_is_never_an_output(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(DiffscoreError, match="is a device, FIFO or socket"):
        check_replaceable(fifo, "--out", "evaluate")
    link = tmp_path / "link.json"
    link.symlink_to("/dev/null")
    with pytest.raises(DiffscoreError, match="is a link"):
        check_replaceable(link, "--out", "evaluate")


def test_a_folder_keeps_the_files_a_user_put_there(tiny_ckpt, tmp_path):
    """`sample --overwrite` deleted a marked folder whole, files the user added included: now only the PNGs the
    last run listed are replaced or removed."""
    out = tmp_path / "pngs"
    args = ["sample", "--ckpt_path", tiny_ckpt, "--out", out, "--steps", "1"]
    assert run_cli([*args, "--num_samples", "4"]) == 0
    (out / "notes.txt").write_text("mine")
    assert run_cli([*args, "--num_samples", "2", "--overwrite", "true"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "000000.png", "000001.png", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    from PIL import Image

    with Image.open(out / "000000.png") as img:  # 1-channel digits are grey PNGs, not RGB
        assert img.mode == "L" and img.size == (8, 8)


def test_a_new_file_never_takes_the_name_of_a_user_s_file(tmp_path):
    folder = tmp_path / "out"
    with folder_output(folder, "report") as tmp:
        (tmp / "a.png").write_text("1")
    (folder / "b.png").write_text("the user's")
    with pytest.raises(DiffscoreError, match="b.png is not diffscore's"):
        with folder_output(folder, "report") as tmp:
            (tmp / "a.png").write_text("2")
            (tmp / "b.png").write_text("2")
    assert (folder / "a.png").read_text() == "1" and (folder / "b.png").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_a_folder_of_another_command_or_a_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "x.txt").write_text("x")
    with pytest.raises(DiffscoreError, match="not written by `diffscore phema`"):
        check_folder(theirs, "--out", "phema")
    ours = tmp_path / "ours"
    with folder_output(ours, "report") as tmp:
        (tmp / "r.png").write_text("r")
    with pytest.raises(DiffscoreError, match="not written by `diffscore phema`"):
        check_folder(ours, "--out", "phema")
    check_folder(ours, "--out", "report")


def test_sigterm_while_writing_leaves_the_old_output_and_no_temporary_files(tmp_path):
    """SIGTERM in a command that writes raises Stopped: the folder is as before, the temporary one is gone."""
    folder = tmp_path / "out"
    with folder_output(folder, "suggest-noise") as tmp:
        (tmp / "noise.yaml").write_text("old")
    with pytest.raises(Stopped), sigterm_raises():
        with folder_output(folder, "suggest-noise") as tmp:
            (tmp / "noise.yaml").write_text("new, half")
            os.kill(os.getpid(), signal.SIGTERM)
    assert (folder / "noise.yaml").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_npz_and_checkpoint_marks(tmp_path):
    npz = tmp_path / "s.npz"
    np.savez(npz, samples=np.zeros(2), written_by=np.array("diffscore sample"))
    assert mark_of(npz) == "diffscore sample"
    ckpt = tmp_path / "n.ckpt"
    torch.save({"written_by": "diffscore convert", "state_dict": {}}, ckpt)
    assert mark_of(ckpt) == "diffscore convert"
    plain = tmp_path / "p.npz"
    np.savez(plain, mu=np.zeros(2))
    assert mark_of(plain) is None and mark_of(tmp_path / "missing.json") is None


def test_last_ckpt_is_the_last_step(in_tmp):
    """max_steps not a multiple of the checkpoint interval: last.ckpt was the last periodic save (issue 34)."""
    from tests.conftest import QUICKSTART, TINY

    args = [*TINY, "--trainer.max_steps=7", "--trainer.callbacks.every_n_train_steps=5", "--trainer.logger=false"]
    assert run_cli(["fit", "--config", QUICKSTART, *args]) == 0
    (last,) = Path(in_tmp).glob("runs/**/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 7
