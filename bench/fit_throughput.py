"""Training throughput of the whole `diffscore fit` loop (Lightning, EMA, logging, data loading) on a GPU.

    python bench/fit_throughput.py --config experiments/cifar10.yaml --steps 400 --batch 256

Writes a CIFAR-10 fixture of random images in the python format (the config's data module reads it), trains
``--steps`` steps with the config's own settings (bf16, compile, channels-last, fused Adam, EMA, RunLog) and a CSV
logger, and reports the median img/s that RunLog measured after the first 100 steps (compilation excluded).
Extra `diffscore fit` options pass through, e.g. ``--set=--model.init_args.compile=false``.
Several GPUs (``--batch`` is the total batch; rank 0 reports the total img/s): scaling at 256 images per GPU,

    for n in 1 2 4 8; do python bench/fit_throughput.py --batch $((256 * n)) --set=--trainer.devices=$n; done

``--sync-debug`` turns on torch's CUDA sync debug mode and prints each place that waits for the GPU once, with
its call stack (setup's reads included: look for the ones inside the training step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "experiments" / "cifar10.yaml"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], help="a `diffscore fit` option (repeatable): --set=--x=1")
    ap.add_argument("--sync-debug", action="store_true", help="print each GPU->host sync site once, with its stack")
    args = ap.parse_args()
    if args.sync_debug:
        report_host_syncs()
    from diffscore.commands import main as cli
    from tests.fixtures import write_cifar10

    # Under DDP, Lightning starts the other ranks by running this script again: they share rank 0's data folder.
    shared = os.environ.get("FIT_THROUGHPUT_ROOT")
    with contextlib.nullcontext(shared) if shared else tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not shared:
            write_cifar10(root, per_batch=2000)  # 10,000 training images (5 batches), random pixels
            os.environ["FIT_THROUGHPUT_ROOT"] = tmp
        t0 = time.perf_counter()
        try:
            cli(
                [
                    "fit",
                    f"--config={args.config}",
                    f"--data.init_args.root={root}",
                    f"--data.init_args.batch_size={args.batch}",
                    f"--trainer.max_steps={args.steps}",
                    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",  # the LR monitor needs a logger
                    f"--trainer.logger.save_dir={root / 'run'}",
                    "--trainer.enable_progress_bar=false",
                    f"--trainer.default_root_dir={root / 'run'}",
                    "--trainer.val_check_interval=100000",
                    *args.set,
                ]
            )
        except SystemExit as e:
            if e.code:
                raise
        if shared:  # not rank 0: RunLog writes on rank 0 only, and rank 0 reports
            return
        wall = time.perf_counter() - t0
        logs = list((root / "run").glob("**/metrics.jsonl"))  # none when the run is shorter than RunLog's interval
        rows = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    rates = [r["perf/img_per_s"] for r in rows if "perf/img_per_s" in r and r["step"] > 100]
    print(
        json.dumps(
            {
                "config": Path(args.config).name,
                "steps": args.steps,
                "batch": args.batch,
                "set": args.set,
                "img_s_median": round(statistics.median(rates), 1) if rates else None,
                "img_s_all": [round(r) for r in rates],
                "wall_s": round(wall, 1),
            }
        )
    )


def report_host_syncs() -> None:
    """Print the call stack of each distinct place that synchronises with the GPU (torch's sync debug mode)."""
    import torch

    seen: set[tuple[str, int]] = set()
    show = warnings.showwarning

    def show_sync(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        if (filename, lineno) not in seen:
            seen.add((filename, lineno))
            stack = "".join(traceback.format_stack(limit=14)[:-2])
            print(f"host sync #{len(seen)} at {filename}:{lineno}: {message}\n{stack}", file=sys.stderr, flush=True)

    warnings.showwarning = show_sync
    warnings.simplefilter("always", UserWarning)
    torch.cuda.set_sync_debug_mode("warn")


if __name__ == "__main__":
    main()
