"""The sample-quality metrics that `diffscore evaluate` and the SampleQuality callback share: per-sample features
(Inception pool3 + logits, digits-classifier features, leakage flags, nearest training images), the reference
statistics they compare with, and the metric values from gathered features."""

from __future__ import annotations

import zipfile
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffscore.errors import DiffscoreError
from diffscore.metrics.digits_classifier import digits_features
from diffscore.metrics.frechet import feature_statistics, frechet_distance, load_statistics, open_statistics
from diffscore.metrics.inception import POOL_FEATURES
from diffscore.metrics.leakage import leaked
from diffscore.metrics.memorization import COPY_RATIO, nearest_neighbours

INCEPTION_METRICS = {"fid", "kid", "is", "fid_k"}
STATS_METRICS = {"fid", "kid"}  # compared with the reference statistics of the training images (or --ref)
DIGITS_METRICS = {"fd_digits", "leakage"}  # 8x8 digits only
ALL_METRICS = INCEPTION_METRICS | DIGITS_METRICS | {"memorization"}
KID_REFERENCE_SIZE = 10_000  # reference features kept for KID (it uses subsets of 1,000)


def auto_metrics(data_shape: tuple[int, ...], scoreaug: bool = False) -> str:
    """The default metrics of a model: FD-digits and memorization for 8x8 digits (plus leakage for runs trained
    with ScoreAug), FID and memorization for other images."""
    if tuple(data_shape) != (1, 8, 8):
        return "fid,memorization"
    return "fd_digits,memorization" + (",leakage" if scoreaug else "")


@torch.no_grad()
def sample_features(x: torch.Tensor, inception=None, digits=None, train: torch.Tensor | None = None, leak=False):
    """Per-sample features of samples x [B, C, H, W]: Inception pool/logits, digits-classifier features and
    leakage flags, distances to the nearest and second-nearest training images."""
    out = {}
    if inception is not None:
        out["pool"], out["logits"] = inception.to(x.device)(x)
    if digits is not None:
        out["digits"] = digits.to(x.device).features(x.clamp(-1, 1)).double()
    if leak:
        out["leak"] = leaked(x).double()
    if train is not None:
        out["d1"], out["d2"] = nearest_neighbours(x, train.to(x.device))
    return out


def compute_metrics(feats: dict[str, torch.Tensor], wanted: set[str], ref: dict[str, np.ndarray], fid_k: list[int]):
    """Metric values from gathered features and reference statistics."""
    result: dict[str, Any] = {"num_samples": len(feats["seeds"])}
    if "fid" in wanted:
        result["fid"] = frechet_distance(*feature_statistics(feats["pool"].numpy()), ref["mu"], ref["sigma"])
    if "kid" in wanted:
        from torch_fidelity.metric_kid import kid_features_to_metric

        gen, refk = feats["pool"].float(), torch.from_numpy(ref["kid_features"]).float()
        size = min(1000, len(gen), len(refk))
        kid = kid_features_to_metric(
            gen,
            refk,
            kid_subsets=100,
            kid_subset_size=size,
            kid_degree=3,
            kid_gamma=None,
            kid_coef0=1,
            rng_seed=2020,
            verbose=False,
        )
        result["kid"], result["kid_std"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
    if "is" in wanted:
        from torch_fidelity.metric_isc import isc_features_to_metric

        isc = isc_features_to_metric(feats["logits"].float(), splits=10, shuffle=True, rng_seed=2020)
        result["is"], result["is_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    if "fid_k" in wanted:
        result.update(fid_k_values(feats["pool"].numpy(), feats["seeds"].numpy(), ref["fid_k_pool"], fid_k))
    if "fd_digits" in wanted:
        stats = feature_statistics(feats["digits"].numpy())
        result["fd_digits"] = frechet_distance(*stats, ref["digits_mu"], ref["digits_sigma"])
        result["fd_digits_heldout"] = ref["digits_heldout"]
        result["fd_digits_heldout_n"] = ref["digits_heldout_n"]  # FD grows as N shrinks: compare at equal N
    if "memorization" in wanted:
        ratio = feats["d1"] / feats["d2"].clamp_min(1e-12)
        result["memorized_fraction"] = float((ratio < COPY_RATIO).float().mean())
        result["nn_ratio_median"] = float(ratio.median())
        result["nn_distance_median"] = float(feats["d1"].median())
    if "leakage" in wanted:
        result["leakage"] = float(feats["leak"].mean())
        result["leakage_real"] = ref["leakage_real"]
    return result


def load_kid_features(path: str) -> np.ndarray | None:
    """The reference features [N, 2048] for KID in a statistics file (None when it holds none), checked."""
    with open_statistics(path) as data:
        if "kid_features" not in data.files:
            return None
        try:
            feats = data["kid_features"]
        except (ValueError, OSError, MemoryError, zipfile.BadZipFile) as e:
            raise DiffscoreError(f"{path}: kid_features cannot be read ({e})") from None
    if feats.ndim != 2 or feats.shape[1] != POOL_FEATURES or len(feats) < 2 or feats.dtype.kind != "f":
        raise DiffscoreError(
            f"{path}: kid_features is {feats.dtype} {list(feats.shape)}; expected float [N >= 2, {POOL_FEATURES}]"
        )
    if not np.isfinite(feats).all():
        raise DiffscoreError(f"{path}: kid_features holds NaN or Inf values; the file is damaged, make it again")
    return feats


@torch.no_grad()
def reference_statistics(
    wanted: set[str], ref_path: str | None, train: Tensor | None, held: Tensor | None, inception=None, digits=None
) -> dict[str, Any]:
    """What the metrics compare with: Inception statistics (from ``ref_path`` or the training images ``train``),
    the digits-feature statistics of ``train`` and the FD-digits of the held-out digits ``held`` against them (a
    reference: what real data not trained on scores), and the leakage of real digits."""
    ref: dict[str, Any] = {}
    if wanted & STATS_METRICS:
        if ref_path is not None:  # checked as read: finite, a covariance, of Inception's pool features
            ref["mu"], ref["sigma"] = load_statistics(ref_path, POOL_FEATURES)
            kid = load_kid_features(ref_path) if "kid" in wanted else None
            if kid is not None:
                ref["kid_features"] = kid
        if "mu" not in ref or ("kid" in wanted and "kid_features" not in ref):
            if train is None:
                raise DiffscoreError(
                    "FID/KID need --ref (from `diffscore refstats`) or a checkpoint that names its data"
                )
            print(
                f"diffscore: computing Inception reference statistics of {len(train)} training images "
                "(cache them with `diffscore refstats`)",
                flush=True,
            )
            pool = torch.cat([inception(train[i : i + 256])[0].cpu() for i in range(0, len(train), 256)]).numpy()
            if "mu" not in ref:
                ref["mu"], ref["sigma"] = feature_statistics(pool)
            ref["kid_features"] = pool[:KID_REFERENCE_SIZE].astype(np.float32)
    if "fd_digits" in wanted:  # images and classifier may sit on different devices (GPU training, CPU splits)
        ref["digits_mu"], ref["digits_sigma"] = feature_statistics(digits_features(train, digits))
        ref["digits_heldout_n"] = len(held) if held is not None else 0
        ref["digits_heldout"] = (
            frechet_distance(*feature_statistics(digits_features(held, digits)), ref["digits_mu"], ref["digits_sigma"])
            if held is not None
            else float("nan")
        )
    if "leakage" in wanted:  # held-out digits: the orientation classifier was trained on the training split
        ref["leakage_real"] = float(leaked(held if held is not None else train).float().mean())
    return ref


@torch.no_grad()
def pair_features(images: Tensor | None, inception, split: str) -> np.ndarray:
    """Inception pool features [N, 2048] of the real images that FID-k pairs samples with."""
    if images is None or len(images) < 2:
        raise DiffscoreError(f"fid_k needs at least 2 real images in the {split} split of the model's data")
    pool = [inception(images[i : i + 256])[0].cpu() for i in range(0, len(images), 256)]
    return torch.cat(pool).numpy().astype(np.float64)


def fid_k_values(pool: np.ndarray, seeds: np.ndarray, real: np.ndarray, sizes: list[int]) -> dict[str, float]:
    """MusicScore's FID-k (Lin, Dai & Kong 2024, Sec. 4.2; their evaluation/t2i_eval.py generates one page per real
    page from its caption and runs pytorch-fid on the two folders of k pages): for each k, the Frechet distance
    between the Inception statistics of the first k samples (seed order) and those of the k real images they pair
    with (sample of seed s <-> real image s mod len(real): the caption it was generated from). Each side's
    covariance comes from k images only (rank < k), as pytorch-fid's does for folders of k images."""
    out = {}
    for k in sizes:
        if len(pool) < k:
            raise DiffscoreError(f"fid_{k} needs at least {k} samples; pass --num_samples {k} or more")
        paired = real[seeds[:k] % len(real)]  # [k, 2048]
        out[f"fid_{k}"] = frechet_distance(*feature_statistics(pool[:k]), *feature_statistics(paired))
    return out
