"""`diffscore convert`: an NVlabs/edm network pickle as a diffscore checkpoint that loads with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import lightning
import torch

from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write
from diffscore.lit.checkpoint import is_edm_pickle, load_model


def convert(src: str, out: str, overwrite: bool = False) -> Path:
    """Write an NVlabs/edm network pickle as a diffscore checkpoint that loads with weights_only=True.

    edm-*.pkl, baseline-*.pkl or network-snapshot-*.pkl: the checkpoint holds the EMA weights, the preconditioning
    and EDM's sampler defaults for that model, as tensors and plain data; the pickle is read without running the
    code it embeds.

    Args:
        src: the network pickle.
        out: the .ckpt to write.
        overwrite: replace an existing .ckpt at ``out``.
    """
    src_path, out_path = Path(src), Path(out)
    if not is_edm_pickle(src_path):
        raise DiffscoreError(f"--src {src} is not an NVlabs/edm network pickle (*.pkl)")
    if out_path.suffix != ".ckpt":
        raise DiffscoreError(f"--out {out} must name a .ckpt file")
    if not out_path.parent.is_dir():
        raise DiffscoreError(f"output folder {out_path.parent} does not exist; create it or choose another --out")
    if out_path.exists() and not (overwrite and out_path.is_file()):
        raise DiffscoreError(f"{out} already exists; choose another --out, or pass --overwrite true to replace it")
    model = load_model(src_path)
    checkpoint = {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": {"_class_path": "diffscore.lit.modules.DiffusionModule", **dict(model.hparams)},
        "imported_from": dict(model.imported_from),
        "pytorch-lightning_version": lightning.__version__,
        "global_step": 0,
        "epoch": 0,
    }
    with atomic_write(out_path) as tmp:
        torch.save(checkpoint, tmp)
    info = model.imported_from
    print(f"diffscore: wrote {out_path}: {info['network']}; sampler heun, {model.hparams.num_steps} steps", flush=True)
    return out_path
