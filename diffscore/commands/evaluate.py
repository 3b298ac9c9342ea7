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

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from diffscore.core.samplers import nfe
from diffscore.errors import DiffscoreError
from diffscore.lit.checkpoint import build, load_checkpoint_datamodule, load_diffusion_checkpoint
from diffscore.lit.disback import check_one_step_options
from diffscore.lit.sample import ShardWriter, predict_over_seeds, prepare_teleport
from diffscore.lit.teleport import TeleportOptions
from diffscore.metrics.digits_classifier import digits_features
from diffscore.metrics.frechet import feature_statistics, frechet_distance, load_statistics, save_statistics
from diffscore.metrics.leakage import leaked
from diffscore.metrics.memorization import COPY_RATIO, nearest_neighbours

INCEPTION_METRICS = {"fid", "kid", "is", "fid_k"}
DIGITS_METRICS = {"fd_digits", "leakage"}  # 8x8 digits only
ALL_METRICS = INCEPTION_METRICS | DIGITS_METRICS | {"memorization"}
KID_REFERENCE_SIZE = 10_000  # reference features kept for KID (it uses subsets of 1,000)


def datamodule_from_hparams(hparams: dict[str, Any]) -> LightningDataModule:
    """Rebuild a DataModule from a ``class_path``/``init_args`` config (a YAML's data section)."""
    return build(hparams, LightningDataModule)


def train_images(dm: LightningDataModule, limit: int | None = None) -> torch.Tensor:
    """The training images of a DataModule in [-1, 1] (uint8 data mapped as on the device)."""
    dm.setup("fit")
    ds = dm.dataset("train")
    n = len(ds) if limit is None else min(limit, len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=512)
    out = []
    for batch in loader:  # uint8 images are mapped to [-1, 1] exactly as in training
        out.append(dm.on_after_batch_transfer(batch, 0)[0].float())
    return torch.cat(out)


def auto_metrics(module) -> str:
    """The default metrics of a model: FD-digits and memorization for 8x8 digits (plus leakage for ScoreAug
    runs), FID and memorization for other images."""
    if tuple(module.data_shape) != (1, 8, 8):
        return "fid,memorization"
    scoreaug = "scoreaug" in str(module.hparams.get("augment", "none"))
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


class FeatureWriter(ShardWriter):
    """Keeps per-sample features instead of samples."""

    def __init__(self, parts_dir: Path, inception=None, digits=None, train=None, leak: bool = False) -> None:
        super().__init__(parts_dir)
        self.inception, self.digits, self.train, self.leak = inception, digits, train, leak

    def reduce(self, prediction, pl_module):
        x = prediction["samples"].to(pl_module.device)
        feats = sample_features(x, self.inception, self.digits, self.train, self.leak)
        return {"seeds": prediction["seeds"], **feats}


def prompt_options(model, dm: LightningDataModule | None, prompts: str | None, guidance: float) -> dict[str, Any]:
    """predict_options for a text-conditioned model: the captions of one data split (sample i gets caption
    i mod n) and the guidance scale."""
    opts: dict[str, Any] = {} if guidance == 1.0 else {"guidance": guidance}
    if guidance != 1.0 and not model.conditional:
        raise DiffscoreError("--guidance needs a conditional model (class labels or text); this one is unconditional")
    if prompts is None:
        return opts
    if getattr(model.backbone, "text_encoder", None) is None:
        raise DiffscoreError("--prompts needs a text-conditioned checkpoint (a backbone with text_dim > 0)")
    if dm is None or not hasattr(dm, "captions") or prompts not in ("train", "val", "test"):
        raise DiffscoreError("--prompts must be train, val or test, and the checkpoint's data must have captions")
    captions = dm.captions(prompts)
    if not captions:
        raise DiffscoreError(f"the {prompts} split of the checkpoint's data has no captions")
    return {**opts, "prompts": list(captions)}


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
        pool = feats["pool"].numpy()
        for k in fid_k:
            groups = [pool[i : i + k] for i in range(0, len(pool) - k + 1, k)][:10]
            vals = [frechet_distance(*feature_statistics(g), ref["mu"], ref["sigma"]) for g in groups]
            result[f"fid_{k}"], result[f"fid_{k}_std"] = float(np.mean(vals)), float(np.std(vals))
    if "fd_digits" in wanted:
        stats = feature_statistics(feats["digits"].numpy())
        result["fd_digits"] = frechet_distance(*stats, ref["digits_mu"], ref["digits_sigma"])
        result["fd_digits_floor"] = ref["digits_floor"]
    if "memorization" in wanted:
        ratio = feats["d1"] / feats["d2"].clamp_min(1e-12)
        result["memorized_fraction"] = float((ratio < COPY_RATIO).float().mean())
        result["nn_ratio_median"] = float(ratio.median())
        result["nn_distance_median"] = float(feats["d1"].median())
    if "leakage" in wanted:
        result["leakage"] = float(feats["leak"].mean())
        result["leakage_real"] = ref["leakage_real"]
    return result


@torch.no_grad()
def _reference(wanted, ref_path, dm, train, inception, digits) -> dict[str, Any]:
    ref: dict[str, Any] = {}
    if wanted & INCEPTION_METRICS:
        if ref_path is not None:
            ref["mu"], ref["sigma"] = load_statistics(ref_path)
            with np.load(ref_path) as data:
                if "kid_features" in data:
                    ref["kid_features"] = data["kid_features"]
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
    held = torch.cat([dm.splits["val"][0], dm.splits["test"][0]]) if hasattr(dm, "splits") else None  # digits
    if "fd_digits" in wanted:  # images and classifier may sit on different devices (GPU training, CPU splits)
        ref["digits_mu"], ref["digits_sigma"] = feature_statistics(digits_features(train, digits))
        ref["digits_floor"] = (
            frechet_distance(*feature_statistics(digits_features(held, digits)), ref["digits_mu"], ref["digits_sigma"])
            if held is not None
            else float("nan")
        )
    if "leakage" in wanted:  # held-out digits: the orientation classifier was trained on the training split
        ref["leakage_real"] = float(leaked(held if held is not None else train).float().mean())
    return ref


def evaluate(
    ckpt_path: str,
    metrics: str = "auto",
    num_samples: int = 50000,
    seeds: str | None = None,
    protocol: str = "single",
    ref: str | None = None,
    steps: int | None = None,
    sampler: str | None = None,
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
) -> dict[str, Any] | None:
    """Evaluate a checkpoint's EMA weights: FID/KID/IS/FID-k, FD-digits, memorization.

    Args:
        ckpt_path: checkpoint written by `diffscore fit`.
        metrics: comma-separated subset of fid, kid, is, fid_k, fd_digits, memorization, leakage; "auto" picks
            fd_digits,memorization for 8x8 digits (and leakage for ScoreAug runs) and fid,memorization for other
            images.
        num_samples: samples per seed range (seeds 0..num_samples-1 unless --seeds).
        seeds: an inclusive range like 0-49999 (overrides num_samples).
        protocol: "single", or "edm": three consecutive seed ranges; min, mean and std reported.
        ref: reference statistics .npz from `diffscore refstats` (or EDM's); default: computed from the
            checkpoint's training data.
        steps: sampler steps (default: the checkpoint's); sampler: sampler name (default: the checkpoint's).
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
    """
    if num_samples < 1:
        raise DiffscoreError(f"--num_samples must be >= 1, got {num_samples}")
    if protocol not in ("single", "edm"):
        raise DiffscoreError(f"--protocol must be 'single' or 'edm', got {protocol!r}")
    if out is not None and not Path(out).parent.is_dir():
        raise DiffscoreError(f"output folder {Path(out).parent} does not exist; create it or choose another --out")
    model = load_diffusion_checkpoint(ckpt_path, trust_checkpoint)
    check_one_step_options(model, steps, sampler, teleport)
    shape = model.data_shape
    if metrics == "auto":
        metrics = auto_metrics(model)
    wanted = {m.strip() for m in metrics.split(",") if m.strip()}
    if not wanted or wanted - ALL_METRICS:
        raise DiffscoreError(
            f"--metrics {sorted(wanted - ALL_METRICS) or metrics!r} unknown; choose from {sorted(ALL_METRICS)}"
        )
    if len(shape) != 3:
        raise DiffscoreError(f"evaluate needs image data; this checkpoint makes vectors of shape {list(shape)}")
    if wanted & DIGITS_METRICS and tuple(shape) != (1, 8, 8):
        raise DiffscoreError(
            f"{'/'.join(sorted(wanted & DIGITS_METRICS))} is for 8x8 digits; this checkpoint makes {list(shape)} images"
        )

    dm = load_checkpoint_datamodule(ckpt_path)
    needs_train = "memorization" in wanted or wanted & DIGITS_METRICS or (wanted & INCEPTION_METRICS and ref is None)
    if needs_train and dm is None:
        raise DiffscoreError("this checkpoint does not name its data; pass --ref and leave out memorization/fd_digits")
    train = train_images(dm) if needs_train else None
    inception = None
    if wanted & INCEPTION_METRICS:
        from diffscore.metrics.inception import InceptionFeatures

        inception = InceptionFeatures(inception_weights)
    digits = None
    if "fd_digits" in wanted:
        from diffscore.metrics.digits_classifier import load_classifier

        digits = load_classifier()
    reference = _reference(wanted, ref, dm, train, inception, digits)

    model.predict_options = {"num_steps": steps, "sampler": sampler}
    model.predict_options.update(prompt_options(model, dm, prompts, guidance))
    model.predict_options.update(prepare_teleport(model, teleport, ckpt_path))
    run_steps = (steps or model.hparams.num_steps) - model.predict_options.get("teleport_skip", 0)
    base = _parse_seeds(seeds, num_samples)
    ranges = [base] if protocol == "single" else [[s + i * len(base) for s in base] for i in range(3)]
    runs = []
    # every rank must name the same folder: derive it from the arguments, not from a clock or a pid
    key = hashlib.sha1(f"{Path(ckpt_path).resolve()}|{seeds}|{num_samples}|{protocol}".encode()).hexdigest()[:12]
    parts = Path(out).with_name(f".{Path(out).name}.parts") if out else Path(f".diffscore-eval-{key}.parts")
    for seed_range in ranges:
        t0 = time.perf_counter()
        memo = train if "memorization" in wanted else None
        writer = FeatureWriter(parts, inception, digits, memo, leak="leakage" in wanted)
        feats = predict_over_seeds(model, seed_range, writer, batch_size, accelerator, devices, strategy)
        if feats is None:  # not rank zero
            return None
        result = compute_metrics(feats, wanted, reference, fid_k)
        result["seeds"] = f"{seed_range[0]}-{seed_range[-1]}"
        result["seconds"] = round(time.perf_counter() - t0, 1)
        runs.append(result)
        last_feats = feats
    summary: dict[str, Any] = {
        "ckpt_path": str(ckpt_path),
        "metrics": sorted(wanted),
        "protocol": protocol,
        "sampler": sampler or model.hparams.sampler,
        "steps": steps or model.hparams.num_steps,
        "teleport_skip": model.predict_options.get("teleport_skip", 0),
        "nfe": 1 if getattr(model, "one_step", False) else nfe(sampler or model.hparams.sampler, run_steps),
        "runs": runs,
    }
    if protocol == "edm":
        for key in runs[0]:
            values = [r[key] for r in runs]
            if all(isinstance(v, float) for v in values):
                summary[f"{key}_min"], summary[f"{key}_mean"] = min(values), float(np.mean(values))
                summary[f"{key}_std"] = float(np.std(values))
    _print_table(summary)
    if out is not None:
        path = Path(out)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        tmp.replace(path)
        if "memorization" in wanted:
            _histogram(last_feats, path.with_suffix(".nn_ratio.png"))
        print(f"diffscore: wrote {path}", flush=True)
    return summary


def _print_table(summary: dict[str, Any]) -> None:
    keys = [k for k in summary["runs"][0] if k not in ("seeds",)]
    print(f"\n{'seeds':<22}" + "".join(f"{k:>20}" for k in keys))
    for r in summary["runs"]:
        print(
            f"{r['seeds']:<22}" + "".join(f"{r[k]:>20.5g}" if isinstance(r[k], float) else f"{r[k]:>20}" for k in keys)
        )


def _histogram(feats: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = (feats["d1"] / feats["d2"].clamp_min(1e-12)).numpy()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(ratio, bins=50, range=(0, 1))
    ax.axvline(COPY_RATIO, color="red", ls="--", label="copy threshold 1/3")
    ax.set_xlabel("nearest / second-nearest training distance")
    ax.set_ylabel("samples")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def refstats(
    out: str,
    ckpt_path: str | None = None,
    config: str | None = None,
    features: str = "inception",
    inception_weights: str | None = None,
    max_images: int | None = None,
    batch_size: int = 256,
) -> Path:
    """Reference statistics (mu, sigma, and features for KID) of a data set's training images.

    Args:
        out: the .npz to write (keys mu, sigma, kid_features; EDM's files with mu/sigma are read as well).
        ckpt_path: take the data set from this checkpoint, or
        config: from the ``data:`` section of this YAML (e.g. experiments/ffhq.yaml).
        features: "inception" (for FID/KID) or "digits" (FD-digits).
        inception_weights: path of the Inception weights (see `diffscore evaluate --help`).
        max_images: use at most this many images.
        batch_size: images per forward pass.
    """
    import yaml

    if (ckpt_path is None) == (config is None):
        raise DiffscoreError("give exactly one of --ckpt_path and --config")
    if not Path(out).parent.is_dir():
        raise DiffscoreError(f"output folder {Path(out).parent} does not exist")
    if config is not None:
        if not Path(config).is_file():
            raise DiffscoreError(f"config {config} does not exist")
        data = (yaml.safe_load(Path(config).read_text()) or {}).get("data")
        if not isinstance(data, dict):
            raise DiffscoreError(f"{config} has no data: section")
        dm = datamodule_from_hparams(data)
    else:
        if not Path(ckpt_path).is_file():
            raise DiffscoreError(f"checkpoint {ckpt_path} does not exist")
        dm = load_checkpoint_datamodule(ckpt_path)
        if dm is None:
            raise DiffscoreError(f"{ckpt_path} does not name its data; use --config")
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
