"""``open_model``: the one call that turns any file a `--ckpt_path` may name into a LoadedModel."""

from __future__ import annotations

from pathlib import Path

from diffscore.loading.checkpoint import open_checkpoint
from diffscore.loading.edm.network import open_edm_pickle
from diffscore.loading.model import LoadedModel
from diffscore.loading.sd_model import open_stable_diffusion


def open_model(path: str | Path, trust: bool = False) -> LoadedModel:
    """The model a file holds: an NVlabs/edm network pickle (``*.pkl``, never run), a diffusers Stable Diffusion
    folder (a directory) or a `diffscore fit` checkpoint (``trust``: allow full unpickling, or a folder's pickled
    *.bin weights). The file is opened once; every failure is one DiffscoreError line."""
    path = Path(path)
    if path.is_dir():
        return open_stable_diffusion(path, trust)
    if path.suffix == ".pkl":
        return open_edm_pickle(path)
    return open_checkpoint(path, trust)
