"""Weights & Biases logging that never blocks an offline machine."""

from __future__ import annotations

import os
import secrets
import time
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
        if os.environ.get("WANDB_MODE", "").lower() == "disabled" and not (kwargs.get("id") or kwargs.get("version")):
            # a disabled run has a fixed dummy id: give each run its own folder for checkpoints and grids
            kwargs["id"] = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        if kwargs.get("resume") is None:  # a config passes every option, None included: keep Lightning's "allow"
            kwargs["resume"] = "allow"  # (a resumed fit continues its run id)
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb warns that the setting has no effect
            self._wandb_init.pop("anonymous", None)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        # end the wandb run with the fit, so that the next fit in this process starts its own (wandb would
        # otherwise hand the old run, and its folder, to every later WandbLogger)
        if self._experiment is not None and hasattr(self._experiment, "finish"):
            self._experiment.finish()
            self._experiment = None
