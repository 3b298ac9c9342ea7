"""`diffscore phema` end to end on a real (tiny) quickstart run: a reconstructed sigma_rel matches the profile
tracked directly, the checkpoints load in `diffscore sample`, bad input is one line."""

import shutil

import pytest
import torch

from diffscore.loading.open import open_model
from diffscore.outputs import MANIFEST
from tests.conftest import QUICKSTART, TINY, run_cli

# Measured on this run (40 steps of 32 images, float32 snapshots after every step): the reconstruction of 0.07
# from the 0.05/0.10 snapshots is 3.0e-5 of the distance between the tracked 0.05 and 0.10 averages away from the
# tracked 0.07 average (1.4e-4 with every 2nd snapshot, 2.0e-3 with every 4th); the tracked 0.05 average is 0.40
# away. float16 snapshots add ~0.1 of that distance here (2e-4 of the weights: fp16 rounding), so the test stores
# float32 and allows 1e-3.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("phema_run")
    args = [
        "fit",
        "--config",
        QUICKSTART,
        *TINY,
        "--trainer.max_steps=40",
        "--trainer.val_check_interval=40",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=diffscore.lit.callbacks.PostHocEMA",
        "--trainer.callbacks.sigma_rels=[0.05,0.1,0.07]",
        "--trainer.callbacks.snapshot_every_images=32",
        "--trainer.callbacks.snapshot_dtype=float32",
    ]
    assert run_cli(args) == 0
    return root


def flat(tensors):
    return torch.cat([t.double().flatten() for t in tensors])


def test_reconstructed_profile_matches_the_one_tracked_directly_and_samples(phema_run, tmp_path):
    out = tmp_path / "ema"
    args = ["phema", "--run", phema_run, "--sigma_rel", "0.07", "0.12", "--from_sigma_rels", "0.05", "0.1"]
    assert run_cli([*args, "--out", out]) == 0
    written = ["phema-0.070.ckpt", "phema-0.120.ckpt", "phema.json", "phema.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *written])
    state = torch.load(phema_run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PostHocEMA"]
    tracked = {s: flat(ema) for s, ema in zip(state["sigma_rels"], state["ema"], strict=True)}
    ckpt = torch.load(out / "phema-0.070.ckpt", weights_only=True)
    rebuilt = flat(ckpt["state_dict"][n] for n in state["names"])
    scale = (tracked[0.05] - tracked[0.1]).norm()
    assert float((rebuilt - tracked[0.07]).norm() / scale) < TOLERANCE
    assert float((tracked[0.05] - tracked[0.07]).norm() / scale) > 0.2  # the test can tell profiles apart
    record = ckpt["phema"]
    assert record["sigma_rel"] == 0.07 and record["step"] == 40 and len(record["snapshots"]) == 80
    assert {s["sigma_rel"] for s in record["snapshots"]} == {0.05, 0.1}
    assert "optimizer_states" not in ckpt and "callbacks" not in ckpt
    assert open_model(out / "phema-0.120.ckpt").defaults.steps == 4
    npz = tmp_path / "s.npz"
    assert run_cli(["sample", "--ckpt_path", out / "phema-0.070.ckpt", "--out", npz, "--num_samples", "3"]) == 0
    assert npz.is_file()
    assert run_cli([*args, "--out", out]) == 0  # a folder it wrote before is replaced
    # reconstructing a tracked profile at an earlier snapshot gives that snapshot back
    early = tmp_path / "early"
    assert run_cli(["phema", "--run", phema_run, "--sigma_rel", "0.1", "--at_images", "640", "--out", early]) == 0
    snap = torch.load(phema_run / "phema" / "phema-000000000640.pt", weights_only=True)
    got = torch.load(early / "phema-0.100.ckpt", weights_only=True)
    assert got["phema"]["step"] == 20
    for name, value in snap["ema"][1].items():
        torch.testing.assert_close(got["state_dict"][name], value, rtol=1e-4, atol=1e-6)


def test_bad_input_is_one_line(phema_run, tmp_path, capsys):
    def fails(run, *extra, needle):
        code = run_cli(["phema", "--run", run, "--out", tmp_path / "o", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and needle in err[-1], err
        assert not (tmp_path / "o").exists()

    fails(phema_run, "--sigma_rel", "0.5", needle="out of range")
    fails(phema_run, "--sigma_rel", "0.05", "--from_sigma_rels", "0.3", needle="were not tracked")
    fails(phema_run, "--sigma_rel", "0.05", "--at_images", "33", needle="is not the time of a snapshot")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    fails(empty, "--sigma_rel", "0.05", needle="no PostHocEMA snapshots")
    few = tmp_path / "few"
    (few / "phema").mkdir(parents=True)
    shutil.copy(sorted((phema_run / "phema").iterdir())[-1], few / "phema")
    fails(few, "--sigma_rel", "0.05", needle="too few snapshots")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    code = run_cli(["phema", "--run", phema_run, "--out", tmp_path / "o", "--sigma_rel", "0.05"])
    assert code != 0 and "not written by `diffscore phema`" in capsys.readouterr().err
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep me"
