"""``open_model``: the one call that turns any file a `--ckpt_path` may name into a LoadedModel."""

from __future__ import annotations

from pathlib import Path

from diffscore.loading.checkpoint import open_checkpoint
from diffscore.loading.edm.network import open_edm_pickle
from diffscore.loading.model import LoadedModel


def open_model(path: str | Path, trust: bool = False) -> LoadedModel:
    """The model a file holds: an NVlabs/edm network pickle (``*.pkl``, never run) or a `diffscore fit` checkpoint
    (``trust``: allow full unpickling). The file is opened once; every failure is one DiffscoreError line."""
    path = Path(path)
    if path.suffix == ".pkl":
        return open_edm_pickle(path)
    return open_checkpoint(path, trust)
