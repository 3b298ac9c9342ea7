"""FD-digits: the Frechet distance in the penultimate features of a small classifier of the 8x8 digits.

The classifier's weights ship with the package (``digits_classifier.pt``); ``python -m
diffscore.metrics.digits_classifier`` retrains them deterministically on the digits training split (seed 0,
the DigitsDataModule's default split), writes them to ``--out`` (``./digits_classifier.pt``; over the shipped file
only with ``--replace_shipped``) and prints their test accuracy and the FD of the held-out digits (a reference).
This is *not* FID: the features come from this network, not from Inception, and numbers compare only with each
other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write
from diffscore.metrics.frechet import feature_statistics, frechet_distance

WEIGHTS = Path(__file__).with_name("digits_classifier.pt")
FEATURES = 64


class DigitsClassifier(nn.Module):
    """conv 32 - conv 64 - pool - fc 64 (the features) - fc 10, on [B, 1, 8, 8] in [-1, 1]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv0(x))
        h = F.max_pool2d(F.relu(self.conv1(h)), 2)  # [B, 64, 4, 4]
        return F.relu(self.fc(h.flatten(1)))  # [B, 64]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | Path = WEIGHTS, device: str | torch.device = "cpu") -> DigitsClassifier:
    path = Path(path)
    if not path.is_file():
        raise DiffscoreError(f"digits classifier weights {path} are missing; run python -m {__name__} to make them")
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


@torch.no_grad()
def digits_features(images: Tensor, model: DigitsClassifier | None = None, batch: int = 1024) -> np.ndarray:
    """Penultimate features [N, 64] of digits images [N, 1, 8, 8] in [-1, 1] (clamped to it)."""
    model = model or load_classifier()
    device = next(model.parameters()).device
    out = [
        model.features(images[i : i + batch].to(device).float().clamp(-1, 1)).cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).double().numpy()


def fd_digits(images: Tensor, reference: Tensor, model: DigitsClassifier | None = None) -> float:
    """FD-digits between two sets of digits images."""
    model = model or load_classifier()
    return frechet_distance(
        *feature_statistics(digits_features(images, model)), *feature_statistics(digits_features(reference, model))
    )


def fit_classifier(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> nn.Module:
    """Cross-entropy training with Adam (lr 1e-3) on batches of 128 in a seeded order; the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def train_classifier(epochs: int = 30, seed: int = 0) -> tuple[DigitsClassifier, dict[str, float]]:
    """Deterministic training on the digits train split; returns the model and its report."""
    from diffscore.data.digits import digits_splits

    torch.manual_seed(seed)
    splits = digits_splits(seed=0)
    (x, y), (xv, _), (xt, yt) = splits["train"], splits["val"], splits["test"]
    model = fit_classifier(DigitsClassifier(), x, y, epochs, seed)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    held = torch.cat([xv, xt])
    heldout = fd_digits(held, x, model)
    return model, {"test_accuracy": acc, "fd_heldout_vs_train": heldout, "heldout_size": len(held)}


def main(argv: list[str] | None = None) -> None:
    """Retrain; the weights go to ``--out`` (the working folder by default), the shipped ones only when asked."""
    ap = argparse.ArgumentParser(description="Retrain the FD-digits classifier deterministically.")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=str, default="digits_classifier.pt", help="where to write the weights")
    ap.add_argument(
        "--replace_shipped", action="store_true", help=f"write over the weights inside the package ({WEIGHTS})"
    )
    args = ap.parse_args(argv)
    if args.replace_shipped:
        args.out = str(WEIGHTS)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bitwise reproducible on CPU
    model, report = train_classifier(args.epochs)
    with atomic_write(args.out) as tmp:
        torch.save(model.state_dict(), tmp)
    print(
        f"wrote {args.out}: test accuracy {report['test_accuracy']:.4f}, FD-digits of held-out digits (held-out "
        f"{report['heldout_size']} vs train) {report['fd_heldout_vs_train']:.3f}"
    )


if __name__ == "__main__":
    main()
