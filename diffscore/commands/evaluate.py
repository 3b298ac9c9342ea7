"""`diffscore evaluate` and `diffscore refstats`: sample quality of a checkpoint, over any number of devices.

Samples are drawn per seed (as `diffscore sample`), split over devices without duplicates; each device turns
its samples into features at once (Inception pool3 + logits, digits-classifier features, nearest-training-image
distances), so only features travel. Metrics: ``fid``, ``kid``, ``is``, ``fid_k`` (FID on groups of k samples,
our reading of MusicScore's FID-k, unverified: the paper's definition could not be checked), ``fd_digits``
(never called FID), ``memorization`` and ``leakage`` (digits: rotated or mirrored samples, ScoreAug's failure
mode; reported beside the same fraction on real digits). ``--protocol edm`` repeats everything on three seed
ranges (0.., N.., 2N..) and reports each, their minimum, mean and std.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffscore.commands.sample import check_counts, check_sampler, check_seeds
from diffscore.commands.teleport import TeleportOptions, with_teleport
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write, pyplot, write_json
from diffscore.lit.checkpoint import config_datamodule, load_checkpoint_datamodule, load_model
from diffscore.lit.data.base import Captioned, train_images
from diffscore.lit.data.tensor import heldout_images
from diffscore.lit.sampling import SamplingOptions, SeedSampler, ShardWriter, parts_folder, predict_over_seeds
from diffscore.metrics.frechet import feature_statistics, save_statistics
from diffscore.metrics.memorization import COPY_RATIO
from diffscore.metrics.suite import (
    ALL_METRICS,
    DIGITS_METRICS,
    INCEPTION_METRICS,
    KID_REFERENCE_SIZE,
    auto_metrics,
    compute_metrics,
    reference_statistics,
    sample_features,
)


class FeatureWriter(ShardWriter):
    """Keeps per-sample features instead of samples."""

    def __init__(self, parts_dir: Path, features: FeatureSet) -> None:
        super().__init__(parts_dir)
        self.features = features

    def reduce(self, prediction, pl_module):
        return {"seeds": prediction["seeds"], **self.features(prediction["samples"].to(pl_module.device))}


def captions_of(model, dm, prompts: str | None) -> list[str] | None:
    """The captions of split ``prompts`` of a text model's data (seed s gets caption s mod n), or None."""
    if prompts is None:
        return None
    if not model.text_conditioned:
        raise DiffscoreError("--prompts needs a text-conditioned checkpoint (a backbone with text_dim > 0)")
    if not isinstance(dm, Captioned) or prompts not in ("train", "val", "test"):
        raise DiffscoreError("--prompts must be train, val or test, and the checkpoint's data must have captions")
    captions = dm.captions(prompts)
    if not captions:
        raise DiffscoreError(f"the {prompts} split of the checkpoint's data has no captions")
    return list(captions)


def _parse_seeds(seeds: str | None, num_samples: int) -> list[int]:
    if seeds is None:
        return list(range(num_samples))
    try:
        lo, hi = (int(v) for v in seeds.split("-"))
    except ValueError:
        raise DiffscoreError(f"--seeds must look like 0-49999, got {seeds!r}") from None
    if hi < lo or lo < 0:
        raise DiffscoreError(f"--seeds {seeds} is an empty or negative range")
    return list(range(lo, hi + 1))


def evaluate(
    ckpt_path: str,
    metrics: str = "auto",
    num_samples: int | None = None,
    seeds: str | None = None,
    protocol: str = "single",
    ref: str | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    sampler_kwargs: dict[str, Any] | None = None,
    batch_size: int = 256,
    inception_weights: str | None = None,
    fid_k: list[int] = [8, 16, 32, 64],  # noqa: B006
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    out: str | None = None,
    teleport: TeleportOptions | None = None,
    trust_checkpoint: bool = False,
    prompts: str | None = None,
    guidance: float = 1.0,
    precision: str | None = None,
    compile: bool | None = None,
    channels_last: bool | None = None,
) -> dict[str, Any] | None:
    """Evaluate a checkpoint's EMA weights: FID/KID/IS/FID-k, FD-digits, memorization.

    Args:
        ckpt_path: checkpoint written by `diffscore fit`.
        metrics: comma-separated subset of fid, kid, is, fid_k, fd_digits, memorization, leakage; "auto" picks
            fd_digits,memorization for 8x8 digits (and leakage for ScoreAug runs) and fid,memorization for other
            images.
        num_samples: samples per seed range (seeds 0..num_samples-1 unless --seeds). Default: for 8x8 digits
            the size of the held-out split (360), the N at which the FD-digits floor is measured; else 50,000
            (EDM's FID protocol).
        seeds: an inclusive range like 0-49999 (overrides num_samples).
        protocol: "single", or "edm": three consecutive seed ranges; min, mean and std reported.
        ref: reference statistics .npz from `diffscore refstats` (or EDM's); default: computed from the
            checkpoint's training data.
        steps: sampler steps (default: the checkpoint's); sampler: sampler name (default: the checkpoint's).
        sampler_kwargs: sampler options as JSON (see `diffscore sample --help`).
        batch_size: samples per device and forward pass.
        inception_weights: path of weights-inception-2015-12-05-6726825d.pth (else $DIFFSCORE_INCEPTION_WEIGHTS,
            else torch hub's cache).
        fid_k: group sizes k for fid_k.
        accelerator, devices, strategy: as for Lightning's Trainer; seeds are split across devices.
        out: write the results as JSON here (and a histogram of nearest-neighbour ratios beside it).
        teleport: skip the first steps with the Gaussian model of the data (see `diffscore sample --help`).
        trust_checkpoint: allow a checkpoint that needs full unpickling (only for files you trust).
        prompts: text-conditioned models: "train", "val" or "test" conditions sample i on caption i (cycled) of
            that split of the checkpoint's data (MusicScore's text-to-image protocol); default: the empty caption.
        guidance: classifier-free guidance scale (1 = the conditional model as trained).
        precision, compile, channels_last: the GPU speed switches of sampling (see `diffscore sample --help`).
    """
    check_counts(num_samples=num_samples, steps=steps, batch_size=batch_size)
    check_sampler(sampler)
    devices_of = (accelerator, devices, strategy)
    if protocol not in ("single", "edm"):
        raise DiffscoreError(f"--protocol must be 'single' or 'edm', got {protocol!r}")
    _check_out(out)
    model = load_model(ckpt_path, trust_checkpoint)
    wanted = wanted_metrics(metrics, model)
    dm = load_checkpoint_datamodule(ckpt_path, trust_checkpoint)
    speed = dict(precision=precision, compile=compile, channels_last=channels_last)
    options = SamplingOptions(steps, sampler, sampler_kwargs, guidance=guidance, **speed)
    options.prompts = captions_of(model, dm, prompts)
    model.check(options)
    options = with_teleport(model, options, teleport, ckpt_path, trust_checkpoint)
    features = FeatureSet(wanted, dm, ref, inception_weights)
    ranges = seed_ranges(seeds, num_samples or default_count(model, features.held), protocol)
    parts = parts_folder(Path(out) if out else Path(".diffscore-evaluate"))
    sampling = SeedSampler(model, options)
    runs, feats = [], None
    for seed_range in ranges:
        t0 = time.perf_counter()
        feats = predict_over_seeds(sampling, seed_range, FeatureWriter(parts, features), batch_size, *devices_of)
        if feats is None:  # not rank zero
            return None
        result = compute_metrics(feats, wanted, features.reference, fid_k)
        runs.append({**result, "seeds": f"{seed_range[0]}-{seed_range[-1]}", "seconds": time.perf_counter() - t0})
    summary = summarize(model, options, ckpt_path, wanted, protocol, runs)
    _print_table(summary)
    if out is not None:
        _write_outputs(Path(out), summary, feats)
    return summary


def _check_out(out: str | None) -> None:
    if out is not None and not Path(out).parent.is_dir():
        raise DiffscoreError(f"output folder {Path(out).parent} does not exist; create it or choose another --out")
    if out is not None and (Path(out).is_dir() or Path(out).name in ("", ".", "..")):
        raise DiffscoreError(f"--out {out} is a folder; --out names the results file, e.g. {Path(out) / 'eval.json'}")


def seed_ranges(seeds: str | None, num_samples: int, protocol: str) -> list[list[int]]:
    """The seed range(s) to evaluate: one, or EDM's three consecutive ones (0.., N.., 2N..)."""
    base = _parse_seeds(seeds, num_samples)
    check_seeds(base[0], len(base) * (1 if protocol == "single" else 3))
    ranges = [base] if protocol == "single" else [[s + i * len(base) for s in base] for i in range(3)]
    print(f"diffscore: evaluate: {len(base)} samples per seed range, {len(ranges)} range(s)", flush=True)
    return ranges


def default_count(model, held: torch.Tensor | None) -> int:
    """Samples per seed range when --num_samples is not given: the held-out digits' count for 8x8 digits (so
    FD-digits and its floor are at the same N), else EDM's 50,000."""
    return len(held) if held is not None and tuple(model.data_shape) == (1, 8, 8) else 50_000


def _write_outputs(out: Path, summary: dict[str, Any], feats: dict[str, torch.Tensor]) -> None:
    """The summary as JSON at ``out`` and, with memorization, the nearest-neighbour ratios' histogram beside it."""
    write_json(out, summary)
    if "memorization" in summary["metrics"]:
        _histogram(feats, out.with_suffix(".nn_ratio.png"))
    print(f"diffscore: wrote {out}", flush=True)


def wanted_metrics(metrics: str, model) -> set[str]:
    """The set of metric names ``--metrics`` asks for, checked against the model's data."""
    shape = tuple(model.data_shape)
    if metrics == "auto":
        metrics = auto_metrics(shape, str(model.hparams.get("augment", "none")))
    wanted = {m.strip() for m in metrics.split(",") if m.strip()}
    if not wanted or wanted - ALL_METRICS:
        raise DiffscoreError(
            f"--metrics {sorted(wanted - ALL_METRICS) or metrics!r} unknown; choose from {sorted(ALL_METRICS)}"
        )
    if len(shape) != 3:
        raise DiffscoreError(f"evaluate needs image data; this checkpoint makes vectors of shape {list(shape)}")
    if wanted & DIGITS_METRICS and shape != (1, 8, 8):
        raise DiffscoreError(
            f"{'/'.join(sorted(wanted & DIGITS_METRICS))} is for 8x8 digits; this checkpoint makes {list(shape)} images"
        )
    return wanted


class FeatureSet:
    """The feature extractors and reference statistics that the wanted metrics need."""

    def __init__(self, wanted: set[str], dm, ref: str | None, inception_weights: str | None) -> None:
        needs_train = "memorization" in wanted or wanted & DIGITS_METRICS or (wanted & INCEPTION_METRICS and not ref)
        if needs_train and dm is None:
            raise DiffscoreError(
                "this checkpoint does not name its data; pass --ref and leave out memorization/fd_digits"
            )
        train = train_images(dm) if needs_train else None
        self.inception = self.digits = None
        if wanted & INCEPTION_METRICS:
            from diffscore.metrics.inception import InceptionFeatures

            self.inception = InceptionFeatures(inception_weights)
        if "fd_digits" in wanted:
            from diffscore.metrics.digits_classifier import load_classifier

            self.digits = load_classifier()
        held = self.held = heldout_images(dm)  # (its count is the default sample count for digits)
        self.reference = reference_statistics(wanted, ref, train, held, self.inception, self.digits)
        self.train = train if "memorization" in wanted else None
        self.leak = "leakage" in wanted

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return sample_features(x, self.inception, self.digits, self.train, self.leak)


def summarize(model, options: SamplingOptions, ckpt_path: str, wanted: set[str], protocol: str, runs: list) -> dict:
    """The JSON summary of an evaluation: what was sampled how, each seed range's metrics (and EDM's min/mean/std)."""
    name, num_steps, _ = ("one-step", 1, None) if model.one_step else model.sampler_of(options)
    for run in runs:
        run["seconds"] = round(run["seconds"], 1)
    return {
        "ckpt_path": str(ckpt_path),
        "metrics": sorted(wanted),
        "protocol": protocol,
        "sampler": name,
        "steps": num_steps,
        "teleport_skip": options.teleport_skip,
        "nfe": model.nfe(options),
        "runs": runs,
        **(summarize_runs(runs) if protocol == "edm" else {}),
    }


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, float]:
    """EDM's protocol: the minimum, mean and std over the seed ranges of every float metric."""
    summary = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if all(isinstance(v, float) for v in values):
            summary[f"{key}_min"], summary[f"{key}_mean"] = min(values), float(np.mean(values))
            summary[f"{key}_std"] = float(np.std(values))
    return summary


def _print_table(summary: dict[str, Any]) -> None:
    keys = [k for k in summary["runs"][0] if k not in ("seeds",)]
    print(f"\n{'seeds':<22}" + "".join(f"{k:>20}" for k in keys))
    for r in summary["runs"]:
        print(
            f"{r['seeds']:<22}" + "".join(f"{r[k]:>20.5g}" if isinstance(r[k], float) else f"{r[k]:>20}" for k in keys)
        )


def _histogram(feats: dict[str, torch.Tensor], path: Path) -> None:
    plt = pyplot()
    ratio = (feats["d1"] / feats["d2"].clamp_min(1e-12)).numpy()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(ratio, bins=50, range=(0, 1))
    ax.axvline(COPY_RATIO, color="red", ls="--", label="copy threshold 1/3")
    ax.set_xlabel("nearest / second-nearest training distance")
    ax.set_ylabel("samples")
    ax.legend()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def refstats(
    out: str,
    ckpt_path: str | None = None,
    data_config: str | None = None,
    features: str = "inception",
    inception_weights: str | None = None,
    max_images: int | None = None,
    batch_size: int = 256,
) -> Path:
    """Reference statistics (mu, sigma, and features for KID) of a data set's training images.

    Args:
        out: the .npz to write (keys mu, sigma, kid_features; EDM's files with mu/sigma are read as well).
        ckpt_path: take the data set from this checkpoint, or
        data_config: from the ``data:`` section of this YAML (e.g. experiments/ffhq.yaml).
        features: "inception" (for FID/KID) or "digits" (FD-digits).
        inception_weights: path of the Inception weights (see `diffscore evaluate --help`).
        max_images: use at most this many images.
        batch_size: images per forward pass.
    """
    if (ckpt_path is None) == (data_config is None):
        raise DiffscoreError("give exactly one of --ckpt_path and --data_config")
    if not Path(out).parent.is_dir():
        raise DiffscoreError(f"output folder {Path(out).parent} does not exist")
    if data_config is not None:
        dm = config_datamodule(data_config)
    else:
        if not Path(ckpt_path).is_file():
            raise DiffscoreError(f"checkpoint {ckpt_path} does not exist")
        dm = load_checkpoint_datamodule(ckpt_path)
        if dm is None:
            raise DiffscoreError(f"{ckpt_path} does not name its data; use --data_config")
    images = train_images(dm, max_images)
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
    else:
        raise DiffscoreError(f"--features must be 'inception' or 'digits', got {features!r}")
    f = feats.numpy()
    mu, sigma = feature_statistics(f)
    save_statistics(out, mu, sigma, kid_features=f[:KID_REFERENCE_SIZE].astype(np.float32), num_images=len(f))
    print(f"diffscore: wrote statistics of {len(f)} images ({features}) to {out}", flush=True)
    return Path(out)
