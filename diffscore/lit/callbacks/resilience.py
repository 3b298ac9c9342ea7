"""Surviving interruptions: atomic checkpoint files and a checkpoint on SIGTERM / Ctrl-C.

A week-long run on a preemptible cluster gets SIGTERM (SLURM sends it before the kill; with
``#SBATCH --signal=SIGTERM@90`` and Lightning's SLURM environment the job is also requeued) or a Ctrl-C:
PreemptionCheckpoint writes ``last.ckpt`` before the process exits, and ``diffscore fit --ckpt_path
<run>/checkpoints/last.ckpt`` resumes exactly. AtomicCheckpointIO writes every checkpoint to a temporary file
and renames it, so a kill in the middle of a write leaves the previous file intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffscore.io import atomic_write
from diffscore.lit.modules.diffusion import DiffusionModule


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to ``.<name>.tmp<pid>`` in the same folder, then os.replace onto the real name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)


class PreemptionCheckpoint(Callback):
    """``last.ckpt`` is always the run's last step: on SIGTERM or Ctrl-C during fit it is saved before exiting, and
    at the end of fit when ModelCheckpoint's last periodic save is older than the last step (max_steps not a
    multiple of every_n_train_steps, an early stop).

    Other exceptions (a bug, a non-finite loss) save nothing: the last regular checkpoint stays the last good one.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != "fit":
            return
        if isinstance(pl_module, DiffusionModule) and pl_module.has_nonfinite():
            return
        path = self._save_last(trainer)
        if trainer.is_global_zero:
            print(
                f"\ndiffscore: interrupted at step {trainer.global_step}; saved {path}; resume with --ckpt_path {path}",
                flush=True,
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ckpt = self._model_checkpoint(trainer)
        if ckpt is None or not ckpt.save_last or trainer.global_step == 0:
            return
        if ckpt.last_model_path and self._saved_step(ckpt.last_model_path) == trainer.global_step:
            return
        self._save_last(trainer)

    @staticmethod
    def _model_checkpoint(trainer: Trainer) -> ModelCheckpoint | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)

    @staticmethod
    def _saved_step(path: str) -> int | None:
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))
        except Exception:  # not there or not readable: save a new one
            return None

    def _save_last(self, trainer: Trainer) -> Path:
        ckpt = self._model_checkpoint(trainer)
        folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir)
        path = folder / "last.ckpt"
        if ckpt is not None:  # saved as ModelCheckpoint's own last.ckpt: a resumed run overwrites it (not last-v1)
            ckpt.last_model_path = str(path)
        trainer.save_checkpoint(path)
        return path
