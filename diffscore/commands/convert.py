"""`diffscore convert`: an NVlabs/edm or NVlabs/edm2 network pickle as a diffscore checkpoint that loads with
weights_only=True."""

from __future__ import annotations

from pathlib import Path

import lightning
import torch

from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write
from diffscore.loading.checkpoint import checkpoint_of
from diffscore.loading.open import open_model
from diffscore.outputs import check_replaceable


def convert(src: str, out: str, overwrite: bool = False) -> Path:
    """Write an NVlabs/edm or NVlabs/edm2 network pickle as a diffscore checkpoint that loads with
    weights_only=True.

    EDM's edm-*.pkl, baseline-*.pkl or network-snapshot-*.pkl, EDM2's edm2-img64-*.pkl, network-snapshot-*.pkl or
    phema-*.pkl (pixel models): the checkpoint holds the EMA weights, the preconditioning (EDM2's with its
    uncertainty head) and the original's sampler defaults for that model, as tensors and plain data; the pickle is
    read without running the code it embeds.

    Args:
        src: the network pickle.
        out: the .ckpt to write.
        overwrite: replace a .ckpt that `diffscore convert` wrote at ``out``.
    """
    src_path, out_path = Path(src), Path(out)
    if (src_path / "model_index.json").is_file():
        raise DiffscoreError(
            f"--src {src} is a diffusers folder: pass it as it is to --ckpt_path (sample, evaluate, probe, DisBack's "
            "teacher) or --model.init_args.pretrained (fit); convert turns NVlabs/edm pickles into checkpoints"
        )
    if src_path.suffix != ".pkl":
        raise DiffscoreError(f"--src {src} is not an NVlabs/edm or edm2 network pickle (*.pkl)")
    if out_path.suffix != ".ckpt":
        raise DiffscoreError(f"--out {out} must name a .ckpt file")
    check_replaceable(out_path, "--out", "convert", overwrite)
    model = open_model(src_path)
    with atomic_write(out_path) as tmp:
        torch.save({**checkpoint_of(model, lightning.__version__), "written_by": "diffscore convert"}, tmp)
    d = model.defaults
    print(f"diffscore: wrote {out_path}: {model.info['network']}; sampler {d.sampler}, {d.steps} steps", flush=True)
    return out_path
