"""Inception-v3 features (torch-fidelity's port of the 2015-12-05 TF graph) for FID, KID and IS, offline.

No machine here can download the weights: they are looked up at ``--inception_weights``, then
``$DIFFSCORE_INCEPTION_WEIGHTS``, then torch hub's cache, and a missing file is one clear error saying
what to put where.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from diffscore.errors import DiffscoreError

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
PUBLISHED_AT = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"


def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file: ``path``, else $DIFFSCORE_INCEPTION_WEIGHTS, else torch hub's cache."""
    for candidate, origin in (
        (path, "--inception_weights"),
        (os.environ.get("DIFFSCORE_INCEPTION_WEIGHTS"), "DIFFSCORE_INCEPTION_WEIGHTS"),
    ):
        if candidate:
            if not Path(candidate).is_file():
                raise DiffscoreError(f"Inception weights {candidate} (from {origin}) do not exist")
            return Path(candidate)
    if hub_weights_path().is_file():
        return hub_weights_path()
    raise DiffscoreError(
        f"Inception weights not found and this machine cannot download them: put {WEIGHTS_NAME} "
        f"(published at {PUBLISHED_AT}) at {hub_weights_path()}, or point DIFFSCORE_INCEPTION_WEIGHTS or "
        "--inception_weights at it"
    )


class InceptionFeatures(nn.Module):
    """images [B, C, H, W] in [-1, 1] -> (pool3 features [B, 2048], unbiased logits [B, 1008])."""

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_inception_weights(weights)
        try:  # refuse anything but a plain state dict before torch-fidelity unpickles it
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise DiffscoreError(
                f"{path} is not a plain weights file ({type(e).__name__}); is it {WEIGHTS_NAME}?"
            ) from None
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # EDM's conversion to 8 bits
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        pool, logits = self.net(x)
        return pool.double(), logits.double()
