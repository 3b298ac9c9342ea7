"""Each command opens each model file once: every read of a file's bytes by Python (the ``open`` audit event, which
io.open, pathlib and os.open raise) and every torch.load is counted per path while the command runs."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.loading.test_edm_network import song_pickle

_COUNTING: list[Counter] = []  # the counter of the command running now (audit hooks cannot be removed)


def _audit(event: str, args: tuple) -> None:
    if _COUNTING and event == "open" and args and isinstance(args[0], str | bytes | Path):
        _COUNTING[-1][str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()).resolve())] += 1


sys.addaudithook(_audit)


def reads(args: list, monkeypatch) -> Counter:
    """Run `diffscore ARGS` and count the opens of every file, and the torch.load calls on a path."""
    counter: Counter = Counter()
    real_load = torch.load

    def counting_load(f, *a, **kw):
        if isinstance(f, str | Path):  # a path torch opens in C++, where no audit event is raised
            counter[str(Path(f).resolve())] += 1
        return real_load(f, *a, **kw)

    monkeypatch.setattr(torch, "load", counting_load)
    _COUNTING.append(counter)
    try:
        assert run_cli(args) == 0
    finally:
        _COUNTING.pop()
    return counter


@pytest.fixture
def second_ckpt(tiny_ckpt, tmp_path) -> Path:
    """A second checkpoint of the same network (a stand-in for an earlier checkpoint of the run)."""
    path = tmp_path / "earlier.ckpt"
    path.write_bytes(tiny_ckpt.read_bytes())
    return path


def test_each_command_reads_each_checkpoint_once(tiny_ckpt, second_ckpt, tmp_path, monkeypatch):
    """sample (with teleportation, which fits the Gaussian of the checkpoint's data), evaluate (model, data,
    reference statistics), probe gaussian, probe ntk with a reference checkpoint, suggest-noise: one open each."""
    ckpt = str(tiny_ckpt.resolve())
    commands = {
        "sample": ["sample", "--ckpt_path", ckpt, "--out", tmp_path / "s.npz", "--num_samples", "2", "--steps", "3"],
        "teleport": ["sample", "--ckpt_path", ckpt, "--out", tmp_path / "t.npz", "--num_samples", "2"]
        + ["--steps", "3", "--teleport.skip", "1"],
        "evaluate": ["evaluate", "--ckpt_path", ckpt, "--num_samples", "8", "--steps", "2"],
        "probe gaussian": ["probe", "gaussian", "--ckpt_path", ckpt, "--num_points", "8"],
        "probe ntk": ["probe", "ntk", "--ckpt_path", ckpt, "--reference_ckpt", second_ckpt, "--num_points", "4"]
        + ["--num_kernel_points", "4", "--num_projections", "1"],
        "suggest-noise": ["suggest-noise", "--ckpt_path", ckpt, "--out", tmp_path / "noise", "--num_points", "8"],
    }
    for name, args in commands.items():
        counted = reads(args, monkeypatch)
        assert counted[ckpt] == 1, f"{name} read {ckpt} {counted[ckpt]} times"
        if name == "probe ntk":
            assert counted[str(second_ckpt.resolve())] == 1


def test_an_edm_pickle_is_read_once_by_sample_and_convert(tmp_path, monkeypatch):
    pkl = str(song_pickle(tmp_path)[0].resolve())
    sample = ["sample", "--ckpt_path", pkl, "--out", tmp_path / "s.npz", "--num_samples", "2", "--steps", "2"]
    assert reads(sample, monkeypatch)[pkl] == 1
    assert reads(["convert", "--src", pkl, "--out", tmp_path / "n.ckpt"], monkeypatch)[pkl] == 1
