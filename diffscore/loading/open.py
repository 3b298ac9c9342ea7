"""``open_model``: the one call that turns any file a `--ckpt_path` may name into a LoadedModel."""

from __future__ import annotations

from pathlib import Path

from diffscore.errors import DiffscoreError
from diffscore.loading.checkpoint import open_checkpoint
from diffscore.loading.edm.network import edm_pickle_model
from diffscore.loading.edm.pickle import read_edm_pickle
from diffscore.loading.edm2.model import edm2_pickle_model, is_edm2_pickle
from diffscore.loading.model import LoadedModel
from diffscore.loading.sd_model import open_stable_diffusion


def open_model(path: str | Path, trust: bool = False) -> LoadedModel:
    """The model a file holds: an NVlabs/edm or NVlabs/edm2 network pickle (``*.pkl``, never run; told apart by
    the network it records), a diffusers Stable Diffusion folder (a directory) or a `diffscore fit` checkpoint
    (``trust``: allow full unpickling, or a folder's pickled *.bin weights). The file is opened once; every failure
    is one DiffscoreError line."""
    path = Path(path)
    if path.is_dir():
        return open_stable_diffusion(path, trust)
    if path.suffix == ".pkl":
        data = read_edm_pickle(path)
        return edm2_pickle_model(data, path) if is_edm2_pickle(data) else edm_pickle_model(data, path)
    return open_checkpoint(path, trust)


def open_guide(path: str | Path, trust: bool = False) -> LoadedModel:
    """The guiding network of --guide (guidance by a second network): any diffusion model ``open_model`` opens;
    every failure is one DiffscoreError line naming --guide."""
    try:
        guide = open_model(path, trust)
        guide.denoiser("guidance by a second network")
    except DiffscoreError as e:
        raise DiffscoreError(f"--guide {path}: {e}") from None
    return guide
