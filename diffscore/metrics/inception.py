"""Inception-v3 features (torch-fidelity's port of the 2015-12-05 TF graph) for FID, KID and IS, offline.

No machine here can download the weights: they are looked up at ``--inception_weights``, then
``$DIFFSCORE_INCEPTION_WEIGHTS``, then torch hub's cache, and a missing file is one clear error saying
what to put where. The file is read once, through diffscore.io's bounded reader, and unpickled only with
``weights_only=True``; torch-fidelity's module is built around the resulting state dict and never opens the file
(its own loader would unpickle it again with ``weights_only=False``: a file swapped in between would run code).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from diffscore.errors import DiffscoreError
from diffscore.io import check_finite_weights, read_user_file

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
PUBLISHED_AT = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
POOL_FEATURES = 2048  # the pool3 features FID and KID compare
MAX_WEIGHTS_BYTES = 1 << 30  # the real file is 95.6 MB


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


def load_inception_state(path: Path) -> dict[str, Tensor]:
    """The state dict in ``path``, read once (a regular file of at most MAX_WEIGHTS_BYTES) and unpickled with
    ``weights_only=True``: tensors only, nothing run; non-finite weights refused (they give NaN metrics)."""
    data = read_user_file(path, f"Inception weights {path}", MAX_WEIGHTS_BYTES)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on foreign or tampered files
        raise DiffscoreError(
            f"{path} is not a plain weights file ({type(e).__name__}); is it {WEIGHTS_NAME}?"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DiffscoreError(f"{path} does not hold a state dict of tensors; is it {WEIGHTS_NAME}?")
    check_finite_weights(state, path)
    return state


def _inception_module(state: dict[str, Tensor]) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with the weights ``state``. Its constructor insists on loading
    weights itself (torch.load(path, weights_only=False), or a download): it is given an in-memory empty state dict
    that diffscore wrote, whose load is skipped, and ``state`` is loaded strictly afterwards."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class FromStateDict(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not state_dict:  # the constructor's load of the empty placeholder below (its result is unused)
                return None
            return super().load_state_dict(state_dict, strict, assign)

    placeholder = io.BytesIO()
    torch.save({}, placeholder)
    placeholder.seek(0)
    net = FromStateDict("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=placeholder)
    net.load_state_dict(state, strict=True)
    return net


class InceptionFeatures(nn.Module):
    """images [B, C, H, W] in [-1, 1] -> (pool3 features [B, 2048], unbiased logits [B, 1008])."""

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        path = find_inception_weights(weights)
        state = load_inception_state(path)
        try:
            self.net = _inception_module(state)
        except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped tensors
            raise DiffscoreError(
                f"{path} does not hold Inception-v3 weights ({str(e).splitlines()[0][:160]}); is it {WEIGHTS_NAME}?"
            ) from None

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # EDM's conversion to 8 bits
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        pool, logits = self.net(x)
        return pool.double(), logits.double()
