"""Resuming from ``--ckpt_path``: the classes its saved settings may name, which given model settings the
checkpoint's replace, and continuing the run in its own folder (and wandb run id)."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.from_file import DATA_MODULES
from diffscore.loading.classes import AUGMENTERS, BACKBONES

TABLES = (BACKBONES, AUGMENTERS, DATA_MODULES)  # every class a saved setting may name, besides torch's optimizers

_LINKED = ("backbone.init_args.data_shape", "backbone.init_args.label_dim")  # set from the data, never typed


def same_class(a: str, b: str) -> bool:
    """Two spellings of one class path (``diffscore.networks.UNet`` and ``diffscore.networks.unet.UNet``; the
    LightningModules under ``diffscore.lit`` and ``diffscore.lit.modules``)."""
    if a == b:
        return True
    if any(table.get(a) is not None and table.get(a) == table.get(b) for table in TABLES):
        return True
    module_a, _, name_a = a.rpartition(".")
    module_b, _, name_b = b.rpartition(".")
    lit = ("diffscore.lit", "diffscore.lit.modules")
    return name_a == name_b and module_a.startswith(lit) and module_b.startswith(lit)


def _allowed_anywhere(class_path: str) -> bool:
    if any(class_path in table for table in TABLES):
        return True
    module, _, name = class_path.rpartition(".")  # an optimizer or LR schedule torch ships
    if module in ("torch.optim", "torch.optim.lr_scheduler"):
        return isinstance(getattr(importlib.import_module(module), name, None), type)
    return False


def check_class_paths(tree: Any, where: str) -> None:
    """Refuse saved settings that name a class diffscore does not build from a file (checked before anything it
    names is imported)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("class_path", "_class_path") and not (isinstance(value, str) and _allowed_anywhere(value)):
                raise DiffscoreError(f"{where} names {value!r}, a class diffscore does not build from a file")
            check_class_paths(value, where)
    elif isinstance(tree, list | tuple):
        for value in tree:
            check_class_paths(value, where)


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
