"""Resuming from ``--ckpt_path``: which given model settings the checkpoint's replace, and continuing the run in
its own folder (and wandb run id)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from diffscore.lit.checkpoint import same_class

_LINKED = ("backbone.init_args.data_shape", "backbone.init_args.label_dim")  # set from the data, never typed


def replaced_settings(given: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """``model.KEY=given (saved S)`` for each setting given (not None) that the saved value replaces."""
    out = []
    for key, value in given.items():
        if value is None or key not in saved or saved[key] == value or key.endswith(_LINKED):
            continue
        if key.endswith("class_path") and same_class(str(saved[key]), str(value)):
            continue
        out.append(f"model.{key}={value} (saved {saved[key]})")
    return out


def continue_run(trainer_config: Any, ckpt_path: Path) -> None:
    """A checkpoint at <save_dir>/<name>/<version>/checkpoints/ of the configured logger continues that run: the
    same folder (checkpoints, grids, metrics.jsonl) and the same wandb run id, unless a version is given."""
    logger = trainer_config.get("logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if init is None or ckpt_path.parent.name != "checkpoints" or init.get("version") or init.get("id"):
        return
    run = ckpt_path.resolve().parent.parent
    name = init.get("project") if "project" in init else init.get("name", "lightning_logs")
    save_dir = init.get("save_dir") or trainer_config.get("default_root_dir") or "."
    if name is not None and run.parent == (Path(save_dir) / str(name)).resolve():
        init.version = run.name
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        print(f"diffscore: continuing run {run}", flush=True)
