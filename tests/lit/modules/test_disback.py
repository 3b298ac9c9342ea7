"""DisBackModule: the recorded path, the target's walk back to the teacher, Diff-Instruct, resume, CLI."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.distill import DistillBatches
from diffscore.lit.modules.disback import DisBackModule, fingerprint
from diffscore.loading.open import open_model
from tests.conftest import REPO, run_cli

N, RECORD, BACK = 3, 2, 2
DIGITS = str(REPO / "experiments" / "disback_digits.yaml")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tiny networks run 50x slower with two threads on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _module(teacher, path_dir, **kw):
    opts = dict(num_path=N, record_interval=RECORD, backtrack_interval=BACK, generator_steps=N * BACK + 1)
    opts.update(kw)
    return DisBackModule(str(teacher), path_dir=str(path_dir), **opts)


def _trainer(callbacks=(), **kw):
    return Trainer(
        accelerator="cpu",
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kw,
    )


class TargetWatch(Callback):
    """The target network's fingerprint before every training step (independent of the module's own log)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.stage1_step) >= module.num_record_steps and int(module.generator_step) > 0:
            self.seen.append((int(module.generator_step), fingerprint(module.target)))


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_path_and_backtracking_reach_the_teacher(tiny_ckpt, tmp_path):
    torch.manual_seed(0)
    module = _module(tiny_ckpt, tmp_path / "path")
    watch = TargetWatch()
    _trainer([watch]).fit(module, DistillBatches(batch_size=8, batches_per_epoch=5))
    assert int(module.stage1_step) == N * RECORD and int(module.generator_step) == N * BACK + 1

    # the path: N nodes with distinct weights, none of them the teacher, the last = the fake score's start
    nodes = [torch.load(module.path_file(k), weights_only=True) for k in range(1, N + 1)]
    assert [n["index"] for n in nodes] == list(range(1, N + 1))
    assert [n["stage1_step"] for n in nodes] == [RECORD * k for k in range(1, N + 1)]
    prints = [n["fingerprint"] for n in nodes]
    assert len(set(prints + [module.teacher_fingerprint])) == N + 1
    copy_ = open_model(tiny_ckpt).network
    for n in nodes:  # the stored fingerprint is the one of the stored weights
        copy_.load_state_dict(n["state_dict"], strict=True)
        assert fingerprint(copy_) == n["fingerprint"]

    # the target: loaded N times (nodes N-1, ..., 0), N-1 moves, every one a real change of weights
    log = module.target_log
    assert [(step, k, kind) for step, k, _, kind in log] == [
        (BACK * i, N - 1 - i, "start" if i == 0 else "move") for i in range(N)
    ]
    loaded = [fp for *_, fp, _ in log]
    assert loaded == prints[:-1][::-1] + [module.teacher_fingerprint]
    assert all(a != b for a, b in zip(loaded, loaded[1:]))
    changes = [i for i in range(1, len(watch.seen)) if watch.seen[i][1] != watch.seen[i - 1][1]]
    assert len(changes) == N - 1  # seen from outside: the weights changed exactly N-1 times after the start
    assert len({fp for _, fp in watch.seen}) == N
    assert _equal_states(module.target.state_dict(), module.teacher.state_dict())  # bit-identical at the end
    assert int(module.target_index) == 0


def test_diffinstruct_targets_the_teacher_without_a_path(tiny_ckpt, tmp_path):
    torch.manual_seed(0)
    module = _module(tiny_ckpt, tmp_path / "path", method="diffinstruct", generator_steps=3)
    start = {k: v.clone() for k, v in module.generator.state_dict().items()}
    _trainer().fit(module, DistillBatches(batch_size=8, batches_per_epoch=5))
    assert int(module.stage1_step) == 0 and int(module.generator_step) == 3
    assert not (tmp_path / "path").exists()
    assert [(s, k, kind) for s, k, _, kind in module.target_log] == [(0, 0, "start")]
    assert _equal_states(module.target.state_dict(), module.teacher.state_dict())
    assert not _equal_states(module.generator.state_dict(), start)  # the generator did move
    module.to(torch.float64)  # the frozen networks (outside the module tree) move with the module
    assert {p.dtype for net in (module.teacher, module.target, module.generator) for p in net.parameters()} == {
        torch.float64
    }


def test_stages_run_separately(tiny_ckpt, tmp_path):
    """stage record writes the path and stops; stage backtrack starts the fake score from node N."""
    torch.manual_seed(0)
    record = _module(tiny_ckpt, tmp_path / "path", stage="record")
    _trainer().fit(record, DistillBatches(batch_size=8))
    assert int(record.stage1_step) == N * RECORD and int(record.generator_step) == 0
    assert sorted(p.name for p in (tmp_path / "path").iterdir()) == [f"node_{k:03d}.pt" for k in range(1, N + 1)]
    assert fingerprint(record.fake) == torch.load(record.path_file(N), weights_only=True)["fingerprint"]

    class FakeAtStart(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                self.before = fingerprint(module.fake)

    back = _module(tiny_ckpt, tmp_path / "path", stage="backtrack")
    _trainer().fit(back, DistillBatches(batch_size=8))
    assert int(back.stage1_step) == 0 and int(back.generator_step) == N * BACK + 1
    assert [k for _, k, _, _ in back.target_log] == list(range(N - 1, -1, -1))
    # the fake score started from the teacher copy and was replaced by node N at stage 2's first step
    assert back.target_log[0][2] == torch.load(back.path_file(N - 1), weights_only=True)["fingerprint"]

    missing = _module(tiny_ckpt, tmp_path / "empty", stage="backtrack")
    with pytest.raises(DiffscoreError, match="node_003.pt is missing"):
        _trainer().fit(missing, DistillBatches(batch_size=8))


class StopAt(Callback):
    def __init__(self, generator_step=None, stage1_step=None):
        self.generator_step, self.stage1_step = generator_step, stage1_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.generator_step is not None and int(module.generator_step) == self.generator_step:
            trainer.should_stop = True
        if self.stage1_step is not None and int(module.stage1_step) == self.stage1_step:
            trainer.should_stop = True


def test_interrupted_in_stage_two_and_resumed_equals_uninterrupted(tiny_ckpt, tmp_path):
    steps = N * BACK + 2

    def fresh(name):
        torch.manual_seed(0)
        return _module(tiny_ckpt, tmp_path / name, generator_steps=steps)

    straight = fresh("a")
    _trainer().fit(straight, DistillBatches(batch_size=8, batches_per_epoch=4))

    part = fresh("b")
    trainer = _trainer([StopAt(3)])  # mid stage 2: target node 1 (moves at 2 and 4)
    trainer.fit(part, DistillBatches(batch_size=8, batches_per_epoch=4))
    assert int(part.generator_step) == 3 and int(part.target_index) == N - 2
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG at restart

    resumed = fresh("b")
    _trainer().fit(resumed, DistillBatches(batch_size=8, batches_per_epoch=4), ckpt_path=str(ckpt))
    assert int(resumed.generator_step) == steps and int(resumed.target_index) == 0
    assert _equal_states(resumed.state_dict(), straight.state_dict())  # generator, fake score, counters
    assert _equal_states(resumed.target.state_dict(), straight.target.state_dict())
    kinds = [(s, k, kind) for s, k, _, kind in resumed.target_log]
    assert kinds == [(0, 2, "start"), (2, 1, "move"), (3, 1, "resume"), (4, 0, "move")]
    assert [e for e in resumed.target_log if e[3] != "resume"] == straight.target_log


def test_interrupted_in_stage_one_and_resumed_records_the_same_path(tiny_ckpt, tmp_path):
    def fresh(name):
        torch.manual_seed(0)
        return _module(tiny_ckpt, tmp_path / name)

    straight = fresh("a")
    _trainer().fit(straight, DistillBatches(batch_size=8, batches_per_epoch=4))
    part = fresh("b")
    trainer = _trainer([StopAt(stage1_step=3)])  # between nodes 1 and 2
    trainer.fit(part, DistillBatches(batch_size=8, batches_per_epoch=4))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["node_001.pt"]
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = fresh("b")
    _trainer().fit(resumed, DistillBatches(batch_size=8, batches_per_epoch=4), ckpt_path=str(tmp_path / "mid.ckpt"))
    for k in range(1, N + 1):
        a = torch.load(straight.path_file(k), weights_only=True)
        b = torch.load(resumed.path_file(k), weights_only=True)
        assert a["fingerprint"] == b["fingerprint"] and a["stage1_step"] == b["stage1_step"]
    assert _equal_states(resumed.state_dict(), straight.state_dict())
    assert resumed.target_log == straight.target_log


def test_bad_options(tiny_ckpt, tmp_path):
    with pytest.raises(DiffscoreError, match="teacher_ckpt is required"):
        DisBackModule()
    with pytest.raises(DiffscoreError, match="never reaches the teacher"):
        _module(tiny_ckpt, tmp_path, generator_steps=(N - 1) * BACK)
    with pytest.raises(DiffscoreError, match="method"):
        _module(tiny_ckpt, tmp_path, method="dmd")
    with pytest.raises(DiffscoreError, match="does not exist"):
        DisBackModule(str(tmp_path / "no.ckpt"))
    with pytest.raises(DiffscoreError, match="path_dir"):
        m = DisBackModule(str(tiny_ckpt), stage="backtrack", num_path=2, backtrack_interval=1, generator_steps=2)
        _trainer().fit(m, DistillBatches(batch_size=4))


def test_digits_config_then_sample_and_evaluate_the_generator(tiny_ckpt, in_tmp, capsys):
    """experiments/disback_digits.yaml through the CLI (both stages, shrunk), then `diffscore sample/evaluate`
    read the one-step generator (NFE = 1) and draw exactly what the trained module draws."""
    args = [
        "fit",
        "--config",
        DIGITS,
        f"--model.init_args.teacher_ckpt={tiny_ckpt}",
        "--model.init_args.num_path=2",
        "--model.init_args.record_interval=2",
        "--model.init_args.backtrack_interval=1",
        "--model.init_args.generator_steps=3",
        "--data.init_args.batch_size=8",
        "--trainer.enable_progress_bar=false",
    ]
    assert run_cli(args) == 0
    (ckpt,) = in_tmp.glob("runs/**/checkpoints/last.ckpt")
    assert len(list(in_tmp.glob("runs/**/disback_path/node_*.pt"))) == 2
    raw = torch.load(ckpt, weights_only=True)
    assert raw["datamodule_hyper_parameters"]["_class_path"].endswith("DigitsDataModule")  # the teacher's data

    gen = open_model(ckpt)
    assert gen.kind == "one-step" and gen.sampler().nfe == 1
    state = {k[len("generator.") :]: v for k, v in raw["state_dict"].items() if k.startswith("generator.")}
    assert _equal_states(gen.network.state_dict(), state)

    assert run_cli(["sample", "--ckpt_path", ckpt, "--num_samples", 5, "--seed", 10, "--out", "s.npz"]) == 0
    import numpy as np

    with np.load("s.npz") as f:
        samples = torch.from_numpy(f["samples"])
    torch.testing.assert_close(samples, gen.sampler().generate(range(10, 15)), rtol=0, atol=0)
    assert run_cli(["sample", "--ckpt_path", ckpt, "--steps", 18, "--out", "t.npz"]) == 2
    assert "one-step generator" in capsys.readouterr().err

    out = in_tmp / "eval.json"
    assert run_cli(["evaluate", "--ckpt_path", ckpt, "--num_samples", 64, "--accelerator", "cpu", "--out", out]) == 0
    import json

    summary = json.loads(out.read_text())
    assert summary["nfe"] == 1 and summary["sampler"] == "one-step"
    assert summary["runs"][0]["fd_digits"] > 0


@pytest.mark.parametrize("name", ["disback_ffhq", "disback_afhqv2", "disback_imagenet64"])
def test_image_configs_need_a_teacher_and_run_with_one(name, tiny_ckpt, in_tmp, capsys):
    config = str(REPO / "experiments" / f"{name}.yaml")
    assert run_cli(["fit", "--config", config]) == 2
    assert "model.teacher_ckpt is required" in capsys.readouterr().err
    fast = ["--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--data.init_args.batch_size=4"]
    assert run_cli(["fit", "--config", config, f"--model.init_args.teacher_ckpt={tiny_ckpt}", *fast]) == 0


def test_fingerprint_sees_one_ulp_and_scalar_buffers():
    net = torch.nn.Linear(3, 2)
    net.register_buffer("count", torch.tensor(3))
    before = fingerprint(net)
    with torch.no_grad():
        net.weight[0, 0] = torch.nextafter(net.weight[0, 0], torch.tensor(1e9))
    assert fingerprint(net) != before
    after = fingerprint(net)
    net.count += 1
    assert fingerprint(net) != after
