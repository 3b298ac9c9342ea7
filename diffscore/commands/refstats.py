"""`diffscore refstats`: the reference statistics (Inception or digits features) of a data set's training images,
computed once and handed to `diffscore evaluate --ref`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.from_file import config_datamodule, model_datamodule
from diffscore.lit.datamodules.latents import train_reference
from diffscore.loading.open import open_model
from diffscore.metrics.frechet import feature_statistics, save_statistics
from diffscore.metrics.suite import KID_REFERENCE_SIZE
from diffscore.outputs import check_replaceable


def refstats(
    out: str,
    ckpt_path: str | None = None,
    data_config: str | None = None,
    features: str = "auto",
    inception_weights: str | None = None,
    max_images: int | None = None,
    batch_size: int = 256,
) -> Path:
    """Reference statistics (mu, sigma, and features for KID) of a data set's training images.

    Args:
        out: the .npz to write (keys mu, sigma, kid_features; EDM's files with mu/sigma are read as well); its
            folders are created.
        ckpt_path: take the data set from this checkpoint, or
        data_config: from the ``data:`` section of this YAML (e.g. experiments/ffhq.yaml; `--config X.yaml` works
            too, as for suggest-noise).
        features: "inception" (for FID/KID), "digits" (FD-digits) or "auto": digits for 8x8 digits, else inception.
        inception_weights: path of the Inception weights (see `diffscore evaluate --help`).
        max_images: use at most this many images.
        batch_size: images per forward pass.
    """
    if (ckpt_path is None) == (data_config is None):
        raise DiffscoreError("give exactly one of --ckpt_path and --config (the YAML whose data: section to read)")
    if features not in ("auto", "inception", "digits"):
        raise DiffscoreError(f"--features must be 'auto', 'inception' or 'digits', got {features!r}")
    out_path = Path(out)
    if out_path.parent.is_dir():  # (else its folders are made when the statistics are written)
        check_replaceable(out_path, "--out", "refstats")
    if data_config is not None:
        dm = config_datamodule(data_config)
    else:
        if not Path(ckpt_path).is_file():
            raise DiffscoreError(f"checkpoint {ckpt_path} does not exist")
        dm = model_datamodule(open_model(ckpt_path))
        if dm is None:
            raise DiffscoreError(f"{ckpt_path} does not name its data; use --data_config")
    images = train_reference(dm, max_images)
    if features == "auto":
        features = "digits" if tuple(images.shape[1:]) == (1, 8, 8) else "inception"
    if features == "inception":
        from diffscore.metrics.inception import InceptionFeatures

        net = InceptionFeatures(inception_weights)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        net.to(device)
        feats = torch.cat(
            [net(images[i : i + batch_size].to(device))[0].cpu() for i in range(0, len(images), batch_size)]
        )
    elif features == "digits":
        from diffscore.metrics.digits_classifier import digits_features

        feats = torch.from_numpy(digits_features(images))
    f = feats.numpy()
    mu, sigma = feature_statistics(f)
    kid = f[:KID_REFERENCE_SIZE].astype(np.float32)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_statistics(out, mu, sigma, kid_features=kid, num_images=len(f), written_by=np.array("diffscore refstats"))
    print(f"diffscore: wrote statistics of {len(f)} images ({features}) to {out}", flush=True)
    return Path(out)
