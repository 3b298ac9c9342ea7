import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffscore.sampling.options import SamplingOptions
from tests.conftest import run_cli


def sample_npz(ckpt, out, *extra):
    return run_cli(["sample", "--ckpt_path", ckpt, "--out", out, *extra])


def test_sample_writes_exactly_n_distinct_samples(tiny_ckpt, tmp_path):
    out = tmp_path / "s.npz"
    assert sample_npz(tiny_ckpt, out, "--num_samples", "7", "--steps", "3", "--seed", "10") == 0
    data = np.load(out)
    assert data["seeds"].tolist() == list(range(10, 17))
    samples = data["samples"]
    assert samples.shape == (7, 1, 8, 8)
    flat = samples.reshape(7, -1)
    assert len({row.tobytes() for row in flat}) == 7  # no duplicated sample
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


@pytest.mark.parametrize("kind", ["diffscore", "one-step"])
def test_the_npz_holds_each_seeds_initial_draw(tiny_ckpt, tmp_path, kind):
    """``noise``: seed s's unit initial draw (before any sigma scaling), from which another sampler reproduces the
    samples: Euler on the model's own grid for a diffusion model, x = G(sigma_init z) for a one-step generator."""
    from diffscore.core.distill import one_step_generate
    from diffscore.core.samplers import euler
    from diffscore.loading.open import open_model
    from diffscore.sampling.seeds import seed_generators, seeded_noise

    files = Path(__file__).resolve().parents[1] / "data_files"
    ckpt = tiny_ckpt if kind == "diffscore" else files / "disback-2026-12.ckpt"
    out = tmp_path / "s.npz"
    extra = ["--steps", "3", "--sampler", "euler"] if kind == "diffscore" else []
    assert sample_npz(ckpt, out, "--num_samples", "3", "--seed", "4", *extra) == 0
    data = np.load(out)
    assert sorted(data.files) == ["noise", "samples", "seeds", "written_by"]
    model = open_model(ckpt)
    noise = seeded_noise(seed_generators([4, 5, 6], "cpu"), model.data_shape, "cpu")
    torch.testing.assert_close(torch.from_numpy(data["noise"]), noise, rtol=0, atol=0)
    with torch.no_grad():
        if kind == "diffscore":
            sigmas = model.sampler(SamplingOptions(sampler="euler", steps=3)).sigmas
            again = euler(model.network, noise * float(sigmas[0]), sigmas)
        else:
            again = one_step_generate(model.network, noise, model.sigma_init)
    torch.testing.assert_close(torch.from_numpy(data["samples"]), again, rtol=0, atol=1e-6)


CHURN = '{"s_churn": 40, "s_min": 0.05, "s_max": 50, "s_noise": 1.003}'  # EDM's ImageNet-64 Heun


@pytest.mark.parametrize("sampler_kwargs", [None, CHURN])
def test_samples_do_not_depend_on_the_batch_size(tiny_ckpt, tmp_path, sampler_kwargs):
    """Also with churn: its noise comes from each seed's own generator, not from the batch's."""
    extra = ["--sampler_kwargs", sampler_kwargs] if sampler_kwargs else []
    outs = []
    for batch in (1, 3, 7):
        outs.append(tmp_path / f"b{batch}.npz")
        args = ["--num_samples", "7", "--steps", "3", "--batch_size", str(batch), *extra]
        assert sample_npz(tiny_ckpt, outs[-1], *args) == 0
    for other in outs[1:]:
        np.testing.assert_allclose(np.load(outs[0])["samples"], np.load(other)["samples"], atol=1e-5)
    if sampler_kwargs:  # the churn did something
        plain = tmp_path / "plain.npz"
        assert sample_npz(tiny_ckpt, plain, "--num_samples", "7", "--steps", "3") == 0
        assert np.abs(np.load(plain)["samples"] - np.load(outs[0])["samples"]).max() > 1e-2


def test_sample_png_folder(tiny_ckpt, tmp_path):
    out = tmp_path / "pngs"
    assert sample_npz(tiny_ckpt, out, "--num_samples", "4", "--steps", "2") == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]


def test_sample_uses_the_ema_weights(tiny_ckpt):
    from diffscore.loading.open import open_model

    state = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)
    model = open_model(tiny_ckpt)
    name, ema = next((k, v) for k, v in state["state_dict"].items() if k.endswith("conv1.weight"))
    raw = state["current_model_state"][name]
    assert not torch.equal(ema, raw)
    assert torch.equal(model.network.state_dict()[name.removeprefix("denoiser.")], ema)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--ckpt_path", "missing.ckpt"], "does not exist"),
        (["--num_samples", "0"], "num_samples"),
        (["--num_samples", "-3"], "num_samples"),
        (["--steps", "0"], "steps"),
        (["--sampler", "nope"], "nope"),
        (["--out", "no/such/dir/out.npz"], "does not exist"),
        (["--class_label", "3"], "class_label"),
        (["--precision", "16"], "--precision must be bf16 or 32"),
        (["--sampler_kwargs", '{"s_churn": 1, "churn": 2}'], "not options of the heun sampler"),
    ],
)
def test_sample_bad_input(tiny_ckpt, tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    base = {"--ckpt_path": str(tiny_ckpt), "--out": "out.npz", "--steps": "2", "--num_samples": "2"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    code = run_cli(["sample", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert needle in err[-1]
    assert not (tmp_path / "out.npz").exists() and not list(tmp_path.glob(".*"))


def test_sample_refuses_foreign_checkpoint_and_existing_output(tiny_ckpt, tmp_path, capsys):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    assert sample_npz(foreign, tmp_path / "x.npz", "--num_samples", "1") != 0
    assert "not a diffscore" in capsys.readouterr().err
    existing = tmp_path / "e.npz"
    existing.write_bytes(b"keep me")
    assert sample_npz(tiny_ckpt, existing, "--num_samples", "1", "--steps", "1") != 0
    assert "already exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"


@pytest.mark.slow
def test_sample_on_two_ddp_processes_matches_one(tiny_ckpt, tmp_path):
    """With churn on: each seed's noise is its own on whichever process draws it."""
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    churn = ["--sampler_kwargs", CHURN]
    assert sample_npz(tiny_ckpt, one, "--num_samples", "5", "--steps", "2", "--batch_size", "2", *churn) == 0
    cmd = [
        sys.executable,
        "-m",
        "diffscore.commands",
        "sample",
        "--ckpt_path",
        str(tiny_ckpt),
        "--out",
        str(two),
        "--num_samples",
        "5",
        "--steps",
        "2",
        "--batch_size",
        "2",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        *churn,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = np.load(one), np.load(two)
    assert b["seeds"].tolist() == list(range(5))
    np.testing.assert_allclose(a["samples"], b["samples"], atol=1e-5)


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_sample_stops_after_the_batch_in_flight_on_ctrl_c_or_sigterm(
    tiny_ckpt, tmp_path, monkeypatch, capsys, sig, code
):
    """The signal arrives during the first batch: the command stops after it, writes nothing, leaves no parts."""
    import os
    import signal

    from diffscore.lit.predict import SeedSampler

    calls = []
    step = SeedSampler.predict_step

    def signalled(self, batch, *args):
        calls.append(len(batch))
        if len(calls) == 1:
            os.kill(os.getpid(), getattr(signal, sig))
        return step(self, batch, *args)

    monkeypatch.setattr(SeedSampler, "predict_step", signalled)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "o.npz"
    assert sample_npz(tiny_ckpt, out, "--num_samples", "40", "--batch_size", "4", "--steps", "1") == code
    assert len(calls) == 1  # 10 batches asked for
    assert f"stopped by {'Ctrl-C' if sig == 'SIGINT' else 'SIGTERM'}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is given back


def test_two_identical_commands_use_their_own_temporary_parts(tmp_path):
    code = "from pathlib import Path; from diffscore.lit.predict import parts_folder; print(parts_folder(Path('o')))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "DIFFSCORE_RUN_TOKEN"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env) for _ in range(2)]
    names = [r.stdout.strip() for r in runs]
    assert names[0].startswith(".o.parts-") and names[0] != names[1], names
