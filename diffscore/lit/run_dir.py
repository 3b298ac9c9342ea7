"""Where a run's files go: the folder that holds Lightning's ``checkpoints/`` for the active logger."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer


def run_dir(trainer: Trainer) -> Path:
    """The run's folder (no collective: safe to call on rank zero alone)."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    if getattr(logger, "log_dir", None):  # CSV / TensorBoard: <save_dir>/<name>/version_<n>
        return Path(logger.log_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version  # wandb: <project>/<id>
