"""Soak: a long CPU quickstart run with periodic validation, sample grids and sample-quality evaluation,
recording the process's resident memory every 50 steps; it must stay flat.

    python bench/soak.py --steps 3000 --out bench/soak        # writes soak.csv and soak.png

The run is experiments/quickstart.yaml (digits, CPU) with more steps, validation every 250 steps, sample
grids and FD-digits/memorization every 500.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RSSRecorder(Callback):
    def __init__(self, every: int = 50) -> None:
        self.every, self.rows, self.t0 = every, [], time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.rows.append((trainer.global_step, time.perf_counter() - self.t0, rss_mib()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default="bench/soak")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    from diffscore.commands.lightning import DiffscoreCLI

    overrides = [
        "--config",
        str(REPO / "experiments" / "quickstart.yaml"),
        f"--trainer.max_steps={args.steps}",
        "--trainer.val_check_interval=250",
        "--trainer.enable_progress_bar=false",
        f"--data.init_args.epoch_size={args.steps * 256}",
    ]
    cli = DiffscoreCLI(args=overrides, run=False)
    for cb in cli.trainer.callbacks:  # evaluate and draw grids every 500 steps
        if type(cb).__name__ in ("SampleQuality", "SampleGrid"):
            cb.every_n_steps = 500
    rec = RSSRecorder()
    cli.trainer.callbacks.append(rec)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    minutes = (time.perf_counter() - start) / 60
    out = Path(args.out)
    out.with_suffix(".csv").write_text(
        "step,seconds,rss_mib\n" + "".join(f"{s},{t:.1f},{r:.1f}\n" for s, t, r in rec.rows)
    )
    from diffscore.io import pyplot

    plt = pyplot()

    steps, rss = [r[0] for r in rec.rows], [r[2] for r in rec.rows]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(steps, rss, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"quickstart soak: {args.steps} steps in {minutes:.1f} min (2 CPU cores)")
    fig.savefig(out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    late = [r for s, r in zip(steps, rss) if s >= steps[len(steps) // 4]]
    print(
        f"{args.steps} steps in {minutes:.1f} min; RSS {rss[0]:.0f} MiB at step {steps[0]}, "
        f"{min(late):.0f}-{max(late):.0f} MiB over the last three quarters, {rss[-1]:.0f} MiB at the end"
    )


if __name__ == "__main__":
    main()
