import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from diffscore.errors import DiffscoreError
from diffscore.lit.callbacks.resilience import AtomicCheckpointIO
from diffscore.lit.datamodules import GMMDataModule
from diffscore.lit.modules import DiffusionModule
from diffscore.networks import MLP
from diffscore.networks.backbone import Backbone
from tests.conftest import QUICKSTART, TINY, run_cli


def fit(tmp: Path, *extra: str) -> None:
    assert run_cli(["fit", "--config", QUICKSTART, *TINY, "--data.init_args.batch_size=16", *extra]) == 0


def last_ckpts(root: Path) -> list[Path]:
    return sorted(root.glob("runs/**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """8 steps straight == 4 steps + resume + 4 steps: raw weights, EMA, optimizer state, all bit for bit."""
    monkeypatch.chdir(tmp_path)
    fit(tmp_path, "--trainer.max_steps=8")
    (straight,) = last_ckpts(tmp_path)
    fit(tmp_path, "--trainer.max_steps=4")
    half = [p for p in last_ckpts(tmp_path) if p != straight][0]
    fit(tmp_path, "--trainer.max_steps=8", f"--ckpt_path={half}")  # continues in half's run folder
    assert last_ckpts(tmp_path) == [straight, half]
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (straight, half))
    assert a["global_step"] == b["global_step"] == 8
    for key in ("state_dict", "current_model_state"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def _reached_step(root, step: int) -> bool:
    logs = list(root.glob("runs/**/metrics.jsonl"))
    lines = logs[0].read_text().splitlines() if logs else []
    return any(json.loads(line).get("step", 0) >= step for line in lines if line.endswith("}"))


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "diffscore.commands",
        "fit",
        "--config",
        QUICKSTART,
        *TINY,
        "--trainer.max_steps=100000",
        "--data.init_args.batch_size=16",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait for the state, not the clock: until the run is well into training (RunLog writes every 20 steps); a
    # slow machine only waits longer (the bound is for a run that never gets there)
    give_up = time.time() + 3600
    while not _reached_step(tmp_path, 40):
        assert proc.poll() is None, f"the run ended before step 40: {proc.communicate()[0][-2000:]}"
        assert time.time() < give_up, "the run did not reach step 40 in an hour"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:]
    (ckpt,) = last_ckpts(tmp_path)
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert step >= 40 and "interrupted at step" in out
    code = subprocess.run(
        [*cmd[:-2], f"--trainer.max_steps={step + 5}", "--data.init_args.batch_size=16", f"--ckpt_path={ckpt}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert code.returncode == 0, code.stderr[-2000:]
    (final,) = last_ckpts(tmp_path)  # the same run, continued in its folder
    assert torch.load(final, map_location="cpu", weights_only=True)["global_step"] == step + 5


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom in the middle of writing")


def test_atomic_checkpoint_write_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="boom"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class Flaky(Backbone):
    """NaN output on chosen training calls."""

    def __init__(self, bad_calls):
        super().__init__()
        self.inner = MLP(data_shape=[2], width=8, depth=1)
        self.data_shape, self.bad, self.calls = (2,), set(bad_calls), 0

    def forward(self, x, c_noise, cond=None, aug_label=None):
        out = self.inner(x, c_noise)
        if self.training:
            self.calls += 1
            if self.calls in self.bad:
                out = out * float("nan")
        return out


def train(tmp_path, backbone, steps, max_bad_steps=10):
    dm = GMMDataModule(dim=2, num_components=2, num_train=512, batch_size=64)
    model = DiffusionModule(backbone, nonfinite={"policy": "skip", "max_bad_steps": max_bad_steps})
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[ckpt],
        logger=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    return trainer, model


def test_skip_policy_skips_bad_steps_and_keeps_training(tmp_path, capsys):
    trainer, model = train(tmp_path, Flaky({3, 7}), 10)
    adam_steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert trainer.global_step == 10 and adam_steps == {8.0}  # 2 of 10 batches made no update
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "skipped step 2: non-finite loss at sigma" in capsys.readouterr().out


def test_skip_policy_stops_after_consecutive_bad_steps(tmp_path):
    with pytest.raises(DiffscoreError, match="3 consecutive non-finite steps"):
        train(tmp_path, Flaky(range(5, 100)), 50, max_bad_steps=3)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert {float(s["step"]) for s in state["optimizer_states"][0]["state"].values()} == {4.0}
