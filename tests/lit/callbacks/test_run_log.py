import json

import pytest
from lightning.pytorch import Trainer

from diffscore.commands.report import report
from diffscore.errors import DiffscoreError
from diffscore.lit.callbacks import RunLog, SampleQuality
from diffscore.lit.datamodules import DigitsDataModule
from diffscore.lit.modules import DiffusionModule
from diffscore.networks import UNet
from tests.conftest import run_cli


def test_run_log_and_sample_quality_feed_the_report(tmp_path):
    model = DiffusionModule(
        UNet(data_shape=[1, 8, 8], model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
        sampling={"steps": 2},
        val_sigmas=[0.1, 1.0],
    )
    dm = DigitsDataModule(batch_size=64, num_train=300)
    quality = SampleQuality(every_n_steps=3, num_samples=40, batch_size=20)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=6,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        callbacks=[RunLog(every_n_steps=2), quality],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/fd_digits" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["eval/fd_digits"] > 0 and 0 <= r["eval/memorized_fraction"] <= 1 for r in evals)
    perf = [r for r in records if "perf/img_per_s" in r]
    assert perf and all(r["perf/img_per_s"] > 0 and r["lr"] == 1e-3 for r in perf)
    assert any("gap/loss_s0.1" in r for r in records)
    written = report(str(tmp_path))
    names = {p.name for p in written}
    assert {"loss.png", "gap_per_sigma.png", "sample_quality.png", "throughput.png"} <= names


def test_report_without_metrics_is_one_clear_error(tmp_path, capsys):
    assert run_cli(["report", str(tmp_path)]) != 0
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_read_jsonl_skips_a_truncated_last_line_once(tmp_path, capsys):
    from diffscore.lit.callbacks.run_log import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lr": 0.1}\n\n{"step": 2, "lr": 0.2}\n{"step": 3, "l')  # a kill mid-line
    assert read_jsonl(path) == [{"step": 1, "lr": 0.1}, {"step": 2, "lr": 0.2}]
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "line 4" in err and str(path) in err


@pytest.mark.parametrize("text, line", [('{"step": 1}\n{"st\n{"step": 3}\n', 2), ('{"step": 1}\n[1, 2]\n', 2)])
def test_read_jsonl_names_file_and_line_of_a_corrupt_record(tmp_path, text, line):
    from diffscore.lit.callbacks.run_log import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(DiffscoreError, match=rf"metrics\.jsonl line {line} "):
        read_jsonl(path)
