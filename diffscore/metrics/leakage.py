"""Augmentation leakage: do samples drawn with the identity label look like transformed digits?

ScoreAug (Hou et al. 2025) conditions the denoiser on the transform so that sampling with the zero label gives
untransformed images; if the conditioning fails, rotated or mirrored digits leak into the samples. A small
classifier of the transform (identity, rot90, rot180, rot270, hflip, vflip), trained on real 8x8 digits, tells
what fraction of samples look transformed. The fraction is meaningful only next to the same fraction on real
digits (a 0 or an 8 survives a half turn, a 6 turned is a 9), which evaluation reports beside it.

The weights ship with the package (``digits_orientation.pt``); ``python -m diffscore.metrics.leakage``
retrains them deterministically on the digits training split and prints the confusion on the test split.
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from diffscore.errors import DiffscoreError
from diffscore.metrics.digits_classifier import DigitsClassifier, fit_classifier

WEIGHTS = Path(__file__).with_name("digits_orientation.pt")
# class k of the orientation classifier: the transform applied to an upright digit (0 = none)
TRANSFORMS = {
    "identity": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
}


@lru_cache(maxsize=1)
def _load_cpu(path: str) -> DigitsClassifier:
    if not Path(path).is_file():
        raise DiffscoreError(f"orientation classifier weights {path} are missing; run python -m {__name__}")
    model = DigitsClassifier(num_classes=len(TRANSFORMS))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def load_orientation_classifier(path: str | Path = WEIGHTS) -> DigitsClassifier:
    return _load_cpu(str(path))


@torch.no_grad()
def transform_class(images: Tensor, model: DigitsClassifier | None = None) -> Tensor:
    """[N] long: the index in TRANSFORMS that the classifier sees applied to each 8x8 digit [N, 1, 8, 8]."""
    if tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"the orientation classifier takes 8x8 digits [N, 1, 8, 8], got {tuple(images.shape)}")
    model = (model or load_orientation_classifier()).to(images.device)
    return model(images.float().clamp(-1, 1)).argmax(1)


def leaked(images: Tensor, model: DigitsClassifier | None = None) -> Tensor:
    """[N] bool: the digit looks rotated or mirrored."""
    return transform_class(images, model) != 0


def train_orientation_classifier(epochs: int = 15, seed: int = 0) -> tuple[DigitsClassifier, dict[str, list]]:
    """Deterministic training on the six transforms of the digits training split; returns the model and the
    fraction of test digits classified as transformed, per true transform."""
    from diffscore.data.digits import digits_splits

    torch.manual_seed(seed)
    splits = digits_splits(seed=0)
    x, xt = splits["train"][0], splits["test"][0]
    views = torch.cat([t(x) for t in TRANSFORMS.values()])  # [6N, 1, 8, 8]
    labels = torch.arange(len(TRANSFORMS)).repeat_interleave(len(x))
    model = fit_classifier(DigitsClassifier(num_classes=len(TRANSFORMS)), views, labels, epochs, seed)
    report = {name: float(leaked(t(xt), model).float().mean()) for name, t in TRANSFORMS.items()}
    return model, {"flagged_as_transformed": report, "test_size": len(xt)}


def main() -> None:
    ap = argparse.ArgumentParser(description="Retrain the digits orientation classifier deterministically.")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", type=str, default=str(WEIGHTS))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bitwise reproducible on CPU
    model, report = train_orientation_classifier(args.epochs)
    torch.save(model.state_dict(), args.out)
    flagged = ", ".join(f"{k} {v:.3f}" for k, v in report["flagged_as_transformed"].items())
    print(f"wrote {args.out}: test digits flagged as transformed, by the transform applied: {flagged}")


if __name__ == "__main__":
    main()
