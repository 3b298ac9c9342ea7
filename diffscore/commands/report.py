"""`diffscore report RUN_DIR`: the run's curves as PNGs, for people without wandb (reads metrics.jsonl)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from diffscore.errors import DiffscoreError
from diffscore.io import pyplot
from diffscore.lit.callbacks.run_log import read_jsonl
from diffscore.outputs import check_folder, folder_output

LOG_SCALE = ("heldout_per_sigma", "loss", "ntk_score_error", "ntk_score_error_per_sigma", "ntk_spectrum")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: list[dict], key: str, path: Path) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``; a resume marker drops the points after its step that the killed start logged.
    A value that is not a number (a hand-edited or foreign line) is an error naming the file and the key."""
    pts: list[tuple[float, float]] = []
    for r in records:
        step = r.get("step")
        if "resumed_from" in r and _number(step):
            pts = [p for p in pts if p[0] <= step]
        elif key in r and "step" in r:
            if not (_number(step) and (_number(r[key]) or r[key] is None)):
                raise DiffscoreError(f"{path}: the record at step {step!r} has {key}={r[key]!r}, not a number")
            if r[key] is not None:
                pts.append((step, r[key]))
    return [p[0] for p in pts], [p[1] for p in pts]


def panels_of(keys: list[str]) -> dict[str, list[str]]:
    """The plots and the keys each shows (a sample count such as fd_digits_heldout_n is a constant, not a metric; the
    held-out digits' FD is drawn beside fd_digits as the reference it is)."""

    def sigma_of(key: str) -> float:
        return float(re.search(r"_s([0-9.e+-]+)$", key).group(1))

    quality = [k for k in keys if k.startswith("eval/") and not k.endswith(("_std", "_n"))]
    return {
        "loss": [k for k in keys if k in ("train/loss", "val/loss")],
        "heldout_per_sigma": sorted((k for k in keys if k.startswith("heldout/loss_s")), key=sigma_of),
        "gap_per_sigma": sorted((k for k in keys if k.startswith("gap/loss_s")), key=sigma_of),
        "sample_quality": quality,
        "gaussian_ev_per_sigma": sorted((k for k in keys if k.startswith("probe/ev_gaussian_s")), key=sigma_of),
        "ntk_score_error": [k for k in keys if k.startswith(("ntk/score_error_t", "ntk/score_error_h", "ntk/heldout"))]
        + [k for k in keys if k.startswith("ntk/twin_score_error_heldout")],
        "ntk_score_error_per_sigma": sorted((k for k in keys if k.startswith("ntk/score_error_s")), key=sigma_of),
        "ntk_kernel": [k for k in keys if k in ("ntk/drift", "ntk/alignment", "ntk/twin_rel_error")],
        "ntk_spectrum": sorted(k for k in keys if k.startswith("ntk/eig")),
        "learning_rate": ["lr"] if "lr" in keys else [],
        "throughput": ["perf/img_per_s"] if "perf/img_per_s" in keys else [],
    }


def _plot(name: str, curves: dict[str, tuple[list[float], list[float]]], file: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, (steps, values) in curves.items():
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
    if name in LOG_SCALE:
        ax.set_yscale("log")
    if name == "gap_per_sigma":
        ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("step")
    ax.set_title(name.replace("_", " "))
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(file, format="png", dpi=110, bbox_inches="tight", metadata={"Software": "diffscore report"})
    plt.close(fig)


def report(run_dir: str) -> list[Path]:
    """Plot a run's metrics.jsonl into <run_dir>/report/*.png and return the files written.

    Args:
        run_dir: the run's folder (the one holding checkpoints/ and metrics.jsonl).
    """
    root = Path(run_dir)
    path = root / "metrics.jsonl"
    if not path.is_file():
        raise DiffscoreError(f"{path} does not exist; is {root} a run folder of a fit with the RunLog callback?")
    records = read_jsonl(path)
    keys = sorted({k for r in records for k in r})
    out_dir = root / "report"
    check_folder(out_dir, "the report folder", "report")
    panels = {name: {k: _series(records, k, path) for k in series} for name, series in panels_of(keys).items()}
    written = []
    with folder_output(out_dir, "report") as tmp:
        for name, curves in panels.items():
            if curves:
                _plot(name, curves, tmp / f"{name}.png")
                written.append(out_dir / f"{name}.png")
    print("diffscore: wrote", *(str(p) for p in written), sep="\n  ", flush=True)
    return written
