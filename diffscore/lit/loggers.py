"""Weights & Biases logging that never blocks an offline machine."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from diffscore.errors import DiffscoreError


def wandb_online() -> bool:
    """True when the user asked for online logging: WANDB_MODE=online, or an API key / netrc login exists."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return False
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8", errors="ignore").read()


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, offline unless the user logged in or set WANDB_MODE=online.

    Offline runs land in ``<save_dir>/wandb`` and can be uploaded later with ``wandb sync``.
    """

    def __init__(
        self,
        project: str = "diffscore",  # wandb project
        name: str | None = None,  # run name
        save_dir: str = "runs",  # local folder for run files (and checkpoints under Lightning)
        offline: bool | None = None,  # None = decide from WANDB_MODE / login
        log_model: bool = False,  # upload checkpoints as artifacts
        **kwargs: Any,
    ) -> None:
        from lightning.pytorch.loggers.wandb import _WANDB_AVAILABLE

        if not _WANDB_AVAILABLE:
            raise DiffscoreError(
                "trainer.logger: WandbLogger needs the wandb package; `pip install wandb`, or log to CSV with "
                "--trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir runs"
            )
        if offline is None:  # WANDB_MODE=disabled is left to wandb itself (offline=True would override it)
            offline = not wandb_online() and os.environ.get("WANDB_MODE", "").lower() != "disabled"
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model, **kwargs)
