"""`diffscore report RUN_DIR`: the run's curves as PNGs, for people without wandb (reads metrics.jsonl)."""

from __future__ import annotations

import re
from pathlib import Path

from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write, pyplot
from diffscore.lit.callbacks.run_log import read_jsonl


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``; a resume marker drops the points after its step that the killed start logged."""
    pts: list[tuple[float, float]] = []
    for r in records:
        if "resumed_from" in r:
            pts = [p for p in pts if p[0] <= r["step"]]
        elif key in r and "step" in r:
            pts.append((r["step"], r[key]))
    return [p[0] for p in pts], [p[1] for p in pts]


def report(run_dir: str) -> list[Path]:
    """Plot a run's metrics.jsonl into <run_dir>/report/*.png and return the files written.

    Args:
        run_dir: the run's folder (the one holding checkpoints/ and metrics.jsonl).
    """
    plt = pyplot()
    root = Path(run_dir)
    path = root / "metrics.jsonl"
    if not path.is_file():
        raise DiffscoreError(f"{path} does not exist; is {root} a run folder of a fit with the RunLog callback?")
    records = read_jsonl(path)
    keys = sorted({k for r in records for k in r})
    out_dir = root / "report"
    if out_dir.exists() and not out_dir.is_dir():
        raise DiffscoreError(f"{out_dir} is a file, but the report is written into a folder of that name; move it away")
    out_dir.mkdir(exist_ok=True)
    written = []

    def sigma_of(key: str) -> float:
        return float(re.search(r"_s([0-9.e+-]+)$", key).group(1))

    panels = {
        "loss": [k for k in keys if k in ("train/loss", "val/loss")],
        "heldout_per_sigma": sorted((k for k in keys if k.startswith("heldout/loss_s")), key=sigma_of),
        "gap_per_sigma": sorted((k for k in keys if k.startswith("gap/loss_s")), key=sigma_of),
        "sample_quality": [k for k in keys if k.startswith("eval/") and not k.endswith(("_std", "_floor"))],
        "gaussian_ev_per_sigma": sorted((k for k in keys if k.startswith("probe/ev_gaussian_s")), key=sigma_of),
        "ntk_score_error": [k for k in keys if k.startswith(("ntk/score_error_t", "ntk/score_error_h", "ntk/heldout"))]
        + [k for k in keys if k.startswith("ntk/twin_score_error_heldout")],
        "ntk_score_error_per_sigma": sorted((k for k in keys if k.startswith("ntk/score_error_s")), key=sigma_of),
        "ntk_kernel": [k for k in keys if k in ("ntk/drift", "ntk/alignment", "ntk/twin_rel_error")],
        "ntk_spectrum": sorted(k for k in keys if k.startswith("ntk/eig")),
        "learning_rate": ["lr"] if "lr" in keys else [],
        "throughput": ["perf/img_per_s"] if "perf/img_per_s" in keys else [],
    }
    for name, series in panels.items():
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key in series:
            steps, values = _series(records, key)
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        if name in ("heldout_per_sigma", "loss", "ntk_score_error", "ntk_score_error_per_sigma", "ntk_spectrum"):
            ax.set_yscale("log")
        if name == "gap_per_sigma":
            ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.legend(fontsize=6, ncol=2)
        file = out_dir / f"{name}.png"
        with atomic_write(file) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(file)
    print("diffscore: wrote", *(str(p) for p in written), sep="\n  ", flush=True)
    return written
