import json

from diffscore.outputs import MANIFEST
from tests.conftest import run_cli

RECORDS = [{"step": 2, "train/loss": 0.5, "lr": 1e-3}, {"step": 4, "train/loss": 0.25, "lr": 1e-3}]


def _run_dir(tmp_path, tail=""):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + tail)
    return tmp_path


def test_report_plots_a_run_whose_last_line_was_cut_by_a_kill(tmp_path, capsys):
    assert run_cli(["report", _run_dir(tmp_path, '{"step": 6, "train/lo')]) == 0
    assert (tmp_path / "report" / "loss.png").stat().st_size > 0
    hidden = [p.name for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]
    assert hidden == [MANIFEST]  # the folder's record of what diffscore wrote; no temporary files
    assert capsys.readouterr().err.count("diffscore: warning:") == 1


def test_report_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    (_run_dir(tmp_path) / "report").write_text("not a folder")
    assert run_cli(["report", tmp_path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffscore: error:") and len(err.splitlines()) == 1 and "report" in err


def test_report_of_a_corrupt_middle_line_is_one_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nGARBAGE\n{"step": 3}\n')
    assert run_cli(["report", tmp_path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl line 2" in err


def test_sample_quality_plots_the_heldout_reference_not_its_sample_count():
    from diffscore.commands.report import panels_of

    keys = ["eval/fd_digits", "eval/fd_digits_heldout", "eval/fd_digits_heldout_n", "eval/fid", "eval/fid_std"]
    assert panels_of(keys)["sample_quality"] == ["eval/fd_digits", "eval/fd_digits_heldout", "eval/fid"]
