"""`diffscore evaluate`: sample quality of a model, over any number of devices.

Samples are drawn per seed (as `diffscore sample`), split over devices without duplicates; each device turns
its samples into features at once (Inception pool3 + logits, digits-classifier features, nearest-training-image
distances), so only features travel. Metrics: ``fid``, ``kid``, ``is``, ``fid_k`` (MusicScore's FID-k, as its
published script computes it: the FID between the k samples of seeds 0..k-1 and the k real images they pair with,
each side's statistics from its k images; see metrics/suite.py), ``fd_digits``
(never called FID), ``memorization`` and ``leakage`` (digits: rotated or mirrored samples, ScoreAug's failure
mode; reported beside the same fraction on real digits). ``--protocol edm`` repeats everything on three seed
ranges (0.., N.., 2N..) and reports each, their minimum, mean and std.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffscore.commands.sample import check_counts, check_seeds
from diffscore.commands.sampler import command_sampler
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write, check_memory, pyplot, write_json
from diffscore.lit.datamodules.base import Captioned
from diffscore.lit.datamodules.from_file import model_datamodule
from diffscore.lit.datamodules.latents import reference_images, train_reference
from diffscore.lit.datamodules.tensor import heldout_images
from diffscore.lit.predict import Devices, ShardWriter, devices_in_use, parts_folder, predict_over_seeds
from diffscore.loading.model import LoadedModel
from diffscore.loading.open import open_model
from diffscore.metrics.memorization import COPY_RATIO
from diffscore.metrics.suite import (
    ALL_METRICS,
    DIGITS_METRICS,
    INCEPTION_METRICS,
    STATS_METRICS,
    auto_metrics,
    compute_metrics,
    pair_features,
    reference_statistics,
    sample_features,
)
from diffscore.outputs import check_replaceable
from diffscore.sampling.base import Sampler
from diffscore.sampling.options import SamplingOptions

FEATURE_BYTES = 16 * 1024  # what one sample's seed and features (Inception pool + logits, float32) take, about


class FeatureWriter(ShardWriter):
    """Keeps per-sample features instead of samples."""

    def __init__(self, parts_dir: Path, features: FeatureSet) -> None:
        super().__init__(parts_dir)
        self.features = features

    def reduce(self, prediction, pl_module):
        return {"seeds": prediction["seeds"], **self.features(prediction["samples"].to(pl_module.device))}


def captions_of(model: LoadedModel, dm, prompts: str | None) -> list[str] | None:
    """The captions of split ``prompts`` of a text model's data (seed s gets caption s mod n), or None."""
    if prompts is None:
        return None
    if not model.text_conditioned:
        raise DiffscoreError("--prompts needs a text-conditioned model (a backbone with a text encoder)")
    if not isinstance(dm, Captioned) or prompts not in ("train", "val", "test"):
        raise DiffscoreError("--prompts must be train, val or test, and the checkpoint's data must have captions")
    captions = dm.captions(prompts)
    if not captions:
        raise DiffscoreError(f"the {prompts} split of the checkpoint's data has no captions")
    return list(captions)


def _parse_seeds(seeds: str | None, num_samples: int) -> list[int]:
    """The seeds of one range: --seeds LO-HI, or 0..num_samples-1; refused up front if their features cannot fit."""
    lo, hi, what = 0, num_samples - 1, f"--num_samples {num_samples}"
    if seeds is not None:
        try:
            lo, hi = (int(v) for v in seeds.split("-"))
        except ValueError:
            raise DiffscoreError(f"--seeds must look like 0-49999, got {seeds!r}") from None
        what = f"--seeds {seeds}"
    if hi < lo or lo < 0:
        raise DiffscoreError(f"{what} is an empty or negative range")
    check_memory((hi - lo + 1) * FEATURE_BYTES, what, "evaluate fewer samples per seed range")
    return list(range(lo, hi + 1))


@dataclass(frozen=True)
class EvaluationOptions:
    """What `diffscore evaluate` measures, on how many samples.

    Args:
        metrics: comma-separated subset of fid, kid, is, fid_k, fd_digits, memorization, leakage; "auto" picks
            fd_digits,memorization for 8x8 digits (and leakage for ScoreAug runs) and fid,memorization for other
            images.
        num_samples: samples per seed range (seeds 0..num_samples-1 unless --seeds). Default: for 8x8 digits the
            size of the held-out split (360), the N of the FD-digits reference; else 50,000 (EDM's FID protocol).
        seeds: an inclusive range like 0-49999 (overrides num_samples).
        protocol: "single", or "edm": three consecutive seed ranges; min, mean and std reported.
        ref: reference statistics .npz from `diffscore refstats` (or EDM's); default: computed from the model's
            training data.
        inception_weights: path of weights-inception-2015-12-05-6726825d.pth (else $DIFFSCORE_INCEPTION_WEIGHTS,
            else torch hub's cache).
        fid_k: the sample counts k of fid_k (MusicScore: 8, 16, 32, 64): sample s (its caption s mod n with
            --prompts) pairs with real image s mod n of the --prompts split (default: the first max(k) training
            images); FID of k samples against their k real images.
        prompts: text-conditioned models: "train", "val" or "test" conditions sample i on caption i (cycled) of that
            split of the model's data (MusicScore's text-to-image protocol); default: --prompt or the empty caption.
    """

    metrics: str = "auto"
    num_samples: int | None = None
    seeds: str | None = None
    protocol: str = "single"
    ref: str | None = None
    inception_weights: str | None = None
    fid_k: tuple[int, ...] = (8, 16, 32, 64)
    prompts: str | None = None

    def __post_init__(self) -> None:
        check_counts(num_samples=self.num_samples)
        if self.protocol not in ("single", "edm"):
            raise DiffscoreError(f"--protocol must be 'single' or 'edm', got {self.protocol!r}")
        if any(k < 2 for k in self.fid_k):
            raise DiffscoreError(f"--fid_k group sizes must be >= 2, got {list(self.fid_k)}")


def evaluate(
    ckpt_path: str,
    out: str | None = None,
    trust_checkpoint: bool = False,
    evaluation: EvaluationOptions = EvaluationOptions(),
    options: SamplingOptions = SamplingOptions(),
    where: Devices = Devices(),
) -> dict[str, Any] | None:
    """Evaluate a model's samples (a diffscore checkpoint's EMA weights or an NVlabs/edm .pkl): FID/KID/IS/FID-k,
    FD-digits, memorization.

    Args:
        ckpt_path: a checkpoint written by `diffscore fit`, or an NVlabs/edm network pickle (pass --ref).
        out: write the results as JSON here (and a histogram of nearest-neighbour ratios beside it).
        trust_checkpoint: allow a checkpoint that needs full unpickling (only for files you trust).
    """
    _check_out(out)
    model = open_model(ckpt_path, trust_checkpoint)
    wanted = wanted_metrics(evaluation.metrics, model)
    dm = model_datamodule(model)
    per_device = -(-planned_count(evaluation, model) // devices_in_use(where))
    sampler = command_sampler(model, options, captions_of(model, dm, evaluation.prompts), False, per_device)
    features = FeatureSet(wanted, dm, evaluation, evaluation.inception_weights)
    ranges = seed_ranges(evaluation, default_count(model, features.held))
    parts = parts_folder(Path(out) if out else Path(".diffscore-evaluate"))
    runs, feats = [], None
    for seed_range in ranges:
        t0 = time.perf_counter()
        writer = FeatureWriter(parts, features)
        feats = predict_over_seeds(sampler, seed_range, writer, options.batch_size, where)
        if feats is None:  # not rank zero
            return None
        result = compute_metrics(feats, wanted, features.reference, list(evaluation.fid_k))
        runs.append({**result, "seeds": f"{seed_range[0]}-{seed_range[-1]}", "seconds": time.perf_counter() - t0})
    summary = summarize(sampler, ckpt_path, wanted, evaluation.protocol, runs)
    _print_table(summary)
    if out is not None:
        _write_outputs(Path(out), summary, feats)
    return summary


def _check_out(out: str | None) -> None:
    """--out names a results file that is new or one `diffscore evaluate` wrote (and so is its histogram)."""
    if out is None:
        return
    if Path(out).is_dir() or Path(out).name in ("", ".", ".."):
        raise DiffscoreError(f"--out {out} is a folder; --out names the results file, e.g. {Path(out) / 'eval.json'}")
    check_replaceable(Path(out), "--out", "evaluate")
    check_replaceable(_histogram_path(Path(out)), "--out's histogram", "evaluate")


def _histogram_path(out: Path) -> Path:
    return out.with_suffix(".nn_ratio.png")


def seed_ranges(evaluation: EvaluationOptions, default: int) -> list[list[int]]:
    """The seed range(s) to evaluate: one, or EDM's three consecutive ones (0.., N.., 2N..)."""
    protocol = evaluation.protocol
    base = _parse_seeds(evaluation.seeds, evaluation.num_samples or default)
    check_seeds(base[0], len(base) * (1 if protocol == "single" else 3))
    ranges = [base] if protocol == "single" else [[s + i * len(base) for s in base] for i in range(3)]
    print(f"diffscore: evaluate: {len(base)} samples per seed range, {len(ranges)} range(s)", flush=True)
    return ranges


def planned_count(evaluation: EvaluationOptions, model: LoadedModel) -> int:
    """About how many samples the evaluation draws (before the data are read): for deciding whether to compile."""
    if evaluation.seeds is not None:
        lo, _, hi = evaluation.seeds.partition("-")
        count = int(hi) - int(lo) + 1 if lo.isdigit() and hi.isdigit() else 1
    else:
        count = evaluation.num_samples or (400 if tuple(model.image_shape) == (1, 8, 8) else 50_000)
    return count * (3 if evaluation.protocol == "edm" else 1)


def default_count(model: LoadedModel, held: torch.Tensor | None) -> int:
    """Samples per seed range when --num_samples is not given: the held-out digits' count for 8x8 digits (so
    FD-digits and the held-out digits' reference are at the same N), else EDM's 50,000."""
    return len(held) if held is not None and tuple(model.image_shape) == (1, 8, 8) else 50_000


def _write_outputs(out: Path, summary: dict[str, Any], feats: dict[str, torch.Tensor]) -> None:
    """The summary as JSON at ``out`` and, with memorization, the nearest-neighbour ratios' histogram beside it."""
    write_json(out, {**summary, "written_by": "diffscore evaluate"})
    if "memorization" in summary["metrics"]:
        _histogram(feats, _histogram_path(out))
    print(f"diffscore: wrote {out}", flush=True)


def wanted_metrics(metrics: str, model: LoadedModel) -> set[str]:
    """The set of metric names ``--metrics`` asks for, checked against the model's data."""
    shape = tuple(model.image_shape)
    if metrics == "auto":
        metrics = auto_metrics(shape, model.trained_with_scoreaug)
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

    def __init__(self, wanted: set[str], dm, evaluation: EvaluationOptions, inception_weights: str | None) -> None:
        ref = evaluation.ref
        needs_train = "memorization" in wanted or wanted & DIGITS_METRICS or (wanted & STATS_METRICS and not ref)
        if (needs_train or "fid_k" in wanted) and dm is None:
            raise DiffscoreError(
                "this checkpoint does not name its data; pass --ref and leave out memorization/fd_digits/fid_k"
            )
        train = train_reference(dm) if needs_train else None
        self.inception = self.digits = None
        if wanted & INCEPTION_METRICS:
            from diffscore.metrics.inception import InceptionFeatures

            self.inception = InceptionFeatures(inception_weights)
        if "fd_digits" in wanted:
            from diffscore.metrics.digits_classifier import load_classifier

            self.digits = load_classifier()
        held = self.held = heldout_images(dm)  # (its count is the default sample count for digits)
        self.reference = reference_statistics(wanted, ref, train, held, self.inception, self.digits)
        if "fid_k" in wanted:  # the real images the samples pair with (MusicScore's FID-k)
            split = evaluation.prompts or "train"
            limit = None if evaluation.prompts else max(evaluation.fid_k)
            self.reference["fid_k_pool"] = pair_features(reference_images(dm, split, limit), self.inception, split)
        self.train = train if "memorization" in wanted else None
        self.leak = "leakage" in wanted

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return sample_features(x, self.inception, self.digits, self.train, self.leak)


def summarize(sampler: Sampler, ckpt_path: str, wanted: set[str], protocol: str, runs: list) -> dict:
    """The JSON summary of an evaluation: what was sampled how, each seed range's metrics (and EDM's min/mean/std)."""
    for run in runs:
        run["seconds"] = round(run["seconds"], 1)
    return {
        "ckpt_path": str(ckpt_path),
        "metrics": sorted(wanted),
        "protocol": protocol,
        "sampler": sampler.name,
        "steps": sampler.steps,
        "teleport_skip": getattr(sampler, "teleport_skip", 0),
        "nfe": sampler.nfe,
        **guidance_summary(sampler),
        "runs": runs,
        **(summarize_runs(runs) if protocol == "edm" else {}),
    }


def guidance_summary(sampler: Sampler) -> dict[str, Any]:
    """The guidance the samples were drawn with (scale, guiding network, interval), when there was any."""
    o = sampler.options
    if o.guidance == 1.0 and o.guide is None:
        return {}
    interval = list(o.guidance_interval) if o.guidance_interval is not None else None
    return {"guidance": o.guidance, "guide": o.guide, "guidance_interval": interval}


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
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": "diffscore evaluate"})
    plt.close(fig)
