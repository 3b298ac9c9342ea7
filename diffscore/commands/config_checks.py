"""Checks of what a user hands `diffscore fit/validate/test` that jsonargparse lets through: binary files as
configs, and non-finite numbers from YAML (``.inf``, ``.nan``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from diffscore.errors import DiffscoreError


def check_config_files(argv: list[str]) -> None:
    """Each ``--config FILE`` must be a readable text file (binary garbage made jsonargparse print a traceback)."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else arg.partition("=")[2]
        if not (arg in ("--config", "-c") or arg.startswith("--config=")) or not Path(path).is_file():
            continue  # a missing file is reported by the parser
        try:
            Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DiffscoreError(f"--config {path} is not a text (UTF-8) YAML file") from None


# Numeric settings where infinity means "no limit" (Karras et al.'s S_tmax, Lightning's time limits).
_INF_ALLOWED = ("s_max", "s_tmax", "max_time", "gradient_clip_val")


def _children(config: Any):
    if isinstance(config, dict):
        return config.items()
    if isinstance(config, list):
        return enumerate(config)
    from jsonargparse import Namespace

    return vars(config).items() if isinstance(config, Namespace) else ()


def refuse_nonfinite(config: Any, prefix: str) -> None:
    """A NaN anywhere, or an infinity outside ``_INF_ALLOWED``, in the parsed config (YAML's .inf/.nan get past
    the command line's checks) -> one line naming the option."""
    for key, value in _children(config):
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            if math.isnan(value) or not str(key).endswith(_INF_ALLOWED):
                raise DiffscoreError(f"{name} = {value} is not a finite number; give a finite value")
        refuse_nonfinite(value, name)
