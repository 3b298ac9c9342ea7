"""One-line status messages of long callback work (sample grids, sample quality), so training never pauses
without a word."""

from __future__ import annotations

from lightning.pytorch import Trainer


def say(trainer: Trainer, message: str) -> None:
    """Print ``diffscore: <message>`` on rank 0, above the progress bar when there is one."""
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    if bar is not None and getattr(bar, "is_enabled", False) and hasattr(bar, "print"):
        bar.print(f"diffscore: {message}")
    else:
        print(f"diffscore: {message}", flush=True)
