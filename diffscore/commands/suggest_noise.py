"""`diffscore suggest-noise`: sigma_data, sigma_min, sigma_max, P_mean and P_std from the Gaussian model of the data.

Reads the training split of a config's data module (``--config X.yaml``), of an image data set (``--data PATH``,
an EDM ZIP or folder of PNGs) or of a checkpoint, fits its mean and covariance (GaussianDenoiser.from_data) and
applies the rules of diffscore.core.noise_levels (Karras et al. 2022's settings; Wang & Vastola 2024's closed-form
Gaussian denoiser). With ``--ckpt_path`` it also measures the network's score against the Gaussian score (EV per
sigma) and reports the teleportation level. Writes noise.yaml (to paste into a config, or to pass as a second
``--config`` of `diffscore fit`), noise.json (every quantity behind the numbers) and noise.png.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from diffscore.core.gaussian import GaussianDenoiser
from diffscore.core.noise_levels import (
    BAND_MASS,
    EV_THRESHOLD,
    KL_TOLERANCE,
    MMSE_BAND,
    QUANTIZATION_STEP,
    NoiseSuggestion,
    gaussian_mmse,
    kl_to_isotropic,
    spectrum,
    suggest_noise_levels,
    teleport_level,
)
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write, pyplot, write_json
from diffscore.lit.datamodules.base import train_images
from diffscore.lit.datamodules.from_file import config_datamodule, training_data
from diffscore.lit.datamodules.images import ImageDataModule
from diffscore.loading.model import LoadedModel
from diffscore.loading.open import open_model
from diffscore.outputs import check_folder, folder_output
from diffscore.probes.gaussian import NetworkDenoiser, explained_variance_table

SIGMA_DATA_RULE = (
    "sigma_data = the RMS about zero, sqrt((tr Sigma + |mu|^2) / D): the magnitude of the data the network sees, "
    "which EDM's c_in, c_skip, c_out make unit (bench/RESULTS.md, issue 34)"
)
EDM_DEFAULTS = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "P_mean": -1.2, "P_std": 1.2}
YAML_KEYS = ("sigma_data", "sigma_min", "sigma_max", "P_mean", "P_std")  # DiffusionModule's argument names
EV_SIGMAS = tuple(float(s) for s in torch.logspace(-2, math.log10(80.0), 22, dtype=torch.float64))


def _data_module(data_config: str | None, data: str | None, model: LoadedModel | None):
    """The data module whose training split is read, and a name for it."""
    if data_config is not None and data is not None:
        raise DiffscoreError("give --config X.yaml or --data PATH, not both")
    if data_config is not None:
        return config_datamodule(data_config, "--config"), Path(data_config).stem
    if data is not None:
        if not Path(data).exists():
            raise DiffscoreError(f"--data {data} does not exist; pass an EDM dataset ZIP or folder of PNGs")
        return ImageDataModule(data, num_workers=0, pin_memory=False), Path(data).stem
    if model is not None:
        return training_data(model, None, what_to_pass="--config X.yaml or --data PATH"), run_name(model.path)
    raise DiffscoreError("say which data to read: --config X.yaml, --data PATH (an EDM ZIP or folder) or --ckpt_path")


def run_name(ckpt: Path) -> str:
    """A name for a checkpoint's suggestions: its run folder's for ``<run>/checkpoints/X.ckpt``, else its stem."""
    ckpt = Path(ckpt).resolve()
    return f"{ckpt.parent.parent.name}-{ckpt.stem}" if ckpt.parent.name == "checkpoints" else ckpt.stem


def _check_options(kl_tolerance: float, quantization_step: float, ev_threshold: float, num_points: int) -> None:
    if not kl_tolerance > 0:
        raise DiffscoreError(f"--kl_tolerance must be > 0 (nats), got {kl_tolerance}")
    if not quantization_step > 0:
        raise DiffscoreError(
            f"--quantization_step must be > 0 (2/255 for 8-bit images in [-1, 1]), got {quantization_step}"
        )
    if not 0 < ev_threshold < 1:
        raise DiffscoreError(f"--ev_threshold must be in (0, 1), got {ev_threshold}")
    if num_points < 2:
        raise DiffscoreError(f"--num_points must be >= 2, got {num_points}")


def network_ev(
    model: LoadedModel, train: torch.Tensor, gaussian: GaussianDenoiser, num_points: int
) -> dict[float, float]:
    """{sigma: mean EV} of the model's (EMA) score against the Gaussian score on noised training points."""
    denoiser = NetworkDenoiser(model.denoiser("suggest-noise's teleport level"))
    if tuple(model.data_shape) != tuple(train.shape[1:]):
        raise DiffscoreError(
            f"--ckpt_path makes {list(model.data_shape)} data but the data are {list(train.shape[1:])}; "
            "pass the checkpoint's own data (or leave out --config/--data)"
        )
    table = explained_variance_table(denoiser, train, {"gaussian": gaussian}, EV_SIGMAS, num_points)
    return table["gaussian"]


def suggest_noise(
    data_config: str | None = None,
    data: str | None = None,
    ckpt_path: str | None = None,
    out: str | None = None,
    kl_tolerance: float = KL_TOLERANCE,
    quantization_step: float = QUANTIZATION_STEP,
    ev_threshold: float = EV_THRESHOLD,
    max_images: int | None = None,
    num_points: int = 256,
) -> dict[str, Any]:
    """Suggest EDM's noise settings for a data set from its Gaussian model (rules: diffscore/core/noise_levels.py).

    sigma_data = sqrt((tr(Sigma) + ||mu||^2)/D), the RMS about zero (EDM's unit-magnitude derivation applied to the
    data the network sees, mean included; SIGMA_DATA_RULE); sigma_max = the smallest sigma with
    KL(N(mu, Sigma + sigma^2 I) || N(0, sigma^2 I)) <= kl_tolerance (the sampler starts at N(0, sigma_max^2 I); the
    level for a start at N(mu, .) is reported as sigma_max_centered); sigma_min = where the Gaussian posterior's
    rms error per coordinate equals quantization_step / sqrt(12); P_mean/P_std = the lognormal with 90% of its mass
    where the Gaussian denoiser's error sum_k lambda_k sigma^2 / (lambda_k + sigma^2) is between 5% and 95% of
    tr(Sigma). With a checkpoint: the teleportation level, the smallest sigma from which up the network's score has
    EV >= ev_threshold against the Gaussian score (Wang & Vastola 2024), for `diffscore sample --teleport.sigma`.

    Args:
        data_config: a training YAML whose data: section names the data (`--config X.yaml` works too).
        data: or an image data set: an EDM dataset ZIP or folder of PNGs.
        ckpt_path: a checkpoint of a model of these data (its data are used when neither of the above is given).
        out: folder for noise.yaml, noise.json and noise.png (default runs/suggest-noise/<name>).
        kl_tolerance: the KL budget (nats) of sigma_max; by Pinsker, total variation <= sqrt(tol / 2).
        quantization_step: the data's quantisation step (2/255: 8-bit images in [-1, 1]).
        ev_threshold: EV against the Gaussian score that counts as "the Gaussian is a good model" (with ckpt_path).
        max_images: read at most this many training images.
        num_points: training points noised at each sigma for the EV (with ckpt_path).
    """
    _check_options(kl_tolerance, quantization_step, ev_threshold, num_points)
    model = open_model(ckpt_path) if ckpt_path is not None else None
    dm, name = _data_module(data_config, data, model)
    folder = Path(out) if out is not None else Path("runs") / "suggest-noise" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    check_folder(folder, "--out", "suggest-noise")
    train = train_images(dm, max_images)
    if len(train) < 2:
        raise DiffscoreError("the training split has fewer than 2 items: a covariance needs at least 2")
    gaussian = GaussianDenoiser.from_data(train)
    try:
        result = suggest_noise_levels(gaussian, kl_tolerance, quantization_step, MMSE_BAND, BAND_MASS)
    except ValueError as e:
        raise DiffscoreError(f"cannot suggest noise levels for these data: {e}") from None
    ev = network_ev(model, train, gaussian, num_points) if model is not None else None
    teleport = teleport_level(list(ev), list(ev.values()), ev_threshold) if ev is not None else None
    summary = _summary(result, name, len(train), ev, teleport, ev_threshold)
    print(_format(summary), flush=True)
    with folder_output(folder, "suggest-noise") as tmp:
        _write_yaml(tmp / "noise.yaml", summary)
        write_json(tmp / "noise.json", summary)
        plot_suggestion(tmp / "noise.png", gaussian, result, ev, teleport, name, ev_threshold)
    print(f"diffscore: wrote {folder / 'noise.yaml'}, noise.json and noise.png", flush=True)
    return summary


def _summary(
    result: NoiseSuggestion, name: str, n: int, ev: dict | None, teleport: float | None, ev_threshold: float
) -> dict[str, Any]:
    """The YAML's numbers (6 significant digits) and everything behind them."""
    return {
        "data": name,
        "num_train": n,
        "sigma_data_rule": SIGMA_DATA_RULE,
        "suggested": {k: float(f"{getattr(result, k):.6g}") for k in YAML_KEYS},
        "edm_defaults": dict(EDM_DEFAULTS),
        **result.as_dict(),
        "band": list(result.band),
        "ev_threshold": ev_threshold if ev is not None else None,
        "ev_gaussian": {str(s): v for s, v in ev.items()} if ev is not None else None,
        "teleport_sigma": teleport,
    }


def _format(summary: dict[str, Any]) -> str:
    lines = [f"noise settings for {summary['data']} ({summary['num_train']} training items, D = {summary['dim']}):"]
    lines += [f"  {k:<10} {v:>10.4g}   (EDM {EDM_DEFAULTS[k]:g})" for k, v in summary["suggested"].items()]
    scales = summary["data_scales"]
    lines.append(f"  {SIGMA_DATA_RULE}:")
    lines.append(
        f"    per-pixel std {scales['per_pixel']:.4g}, pooled std {scales['pooled']:.4g}, RMS {scales['rms']:.4g}"
    )
    lo, hi = summary["band"]
    lines.append(
        f"  mmse 5%-95% band: sigma {lo:.4g} .. {hi:.4g}; sigma_max_centered {summary['sigma_max_centered']:.4g}"
    )
    if summary["ev_gaussian"] is not None:
        tele = summary["teleport_sigma"]
        said = f"{tele:.4g}" if tele is not None else "none (the EV at the largest sigma is below the threshold)"
        lines.append(f"  teleport level (EV >= {summary['ev_threshold']:g}): {said}")
    return "\n".join(lines)


def module_settings(suggested: dict[str, float]) -> dict[str, Any]:
    """The suggested values where a DiffusionModule takes them: the sampler's grid ends under ``sampling``."""
    grid = {k: suggested[k] for k in ("sigma_min", "sigma_max")}
    return {**{k: v for k, v in suggested.items() if k not in grid}, "sampling": grid}


def _write_yaml(path: Path, summary: dict[str, Any]) -> None:
    import yaml

    head = [
        f"# `diffscore suggest-noise` for {summary['data']}: the Gaussian model's noise levels",
        "# (rules: diffscore/core/noise_levels.py). Paste into a config, or pass it as a second config:",
        "#   diffscore fit --config X.yaml --config noise.yaml",
    ]
    if summary["teleport_sigma"] is not None:
        head.append(f"# teleportation level: diffscore sample ... --teleport.sigma {summary['teleport_sigma']:.4g}")
    body = yaml.safe_dump({"model": {"init_args": module_settings(summary["suggested"])}}, sort_keys=False)
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(head) + "\n" + body)


def plot_suggestion(
    path: Path,
    gaussian: GaussianDenoiser,
    result: NoiseSuggestion,
    ev: dict[float, float] | None,
    teleport: float | None,
    title: str,
    ev_threshold: float = EV_THRESHOLD,
) -> None:
    """The spectrum, the closed-form error and KL vs sigma with the suggested (and EDM's) levels, and the EV."""
    plt = pyplot()
    panels = 3 if ev is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    _plot_spectrum(axes[0], spectrum(gaussian.eigvals, gaussian.dim), result)
    _plot_error(axes[1], spectrum(gaussian.eigvals, gaussian.dim), result)
    if ev is not None:
        ax = axes[2]
        ax.plot(list(ev), list(ev.values()), marker="o", ms=3, label="network vs Gaussian score")
        ax.axhline(ev_threshold, color="gray", lw=0.6, label=f"threshold {ev_threshold:g}")
        if teleport is not None:
            ax.axvline(teleport, color="C3", ls="--", label=f"teleport level {teleport:.3g}")
        ax.set_xscale("log")
        ax.set_ylim(max(-0.5, min(ev.values()) - 0.05), 1.05)
        ax.set_xlabel("sigma")
        ax.set_ylabel("explained variance")
        ax.legend(fontsize=7)
    fig.suptitle(f"suggest-noise: {title}", fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_spectrum(ax, lam: torch.Tensor, result: NoiseSuggestion) -> None:
    values = lam.sort(descending=True).values.numpy()
    ax.semilogy(
        range(1, len(values) + 1), values.clip(min=1e-12), ".", ms=3, label="eigenvalues (zeros drawn at 1e-12)"
    )
    ax.axhline(result.sigma_data**2, color="C1", ls="--", lw=1, label=f"sigma_data^2 = {result.sigma_data**2:.3g}")
    q2 = result.quantization_step**2 / 12
    ax.axhline(q2, color="C2", ls=":", lw=1, label=f"quantisation noise q^2 = {q2:.2g}")
    ax.set_xlabel("component")
    ax.set_ylabel("lambda_k")
    ax.legend(fontsize=7)


def _plot_error(ax, lam: torch.Tensor, result: NoiseSuggestion) -> None:
    lo = min(result.sigma_min, EDM_DEFAULTS["sigma_min"]) / 3
    hi = max(result.sigma_max, EDM_DEFAULTS["sigma_max"]) * 3
    s = torch.logspace(math.log10(lo), math.log10(hi), 300, dtype=torch.float64)
    ax.semilogx(s, gaussian_mmse(lam, s) / lam.sum(), label="mmse(sigma) / tr(Sigma)")
    ax.set_ylabel("Gaussian denoiser's error / its maximum")
    kl_ax = ax.twinx()  # the KL of sigma_max's rule, on its own log axis
    kl_ax.loglog(s, kl_to_isotropic(lam, s, result.mean_sq), color="C1", lw=1)
    kl_ax.axhline(result.kl_tolerance, color="C1", ls=":", lw=1)
    kl_ax.set_ylim(1e-6, 1e4)
    kl_ax.set_ylabel(f"KL to N(0, sigma^2 I), nats (orange; dotted: tolerance {result.kl_tolerance:g})", fontsize=7)
    ax.axvspan(*result.band, color="C0", alpha=0.1, label="5%-95% band")
    log_s = s.log()
    for (mean, std), style, who in (((result.P_mean, result.P_std), "-", "suggested"), ((-1.2, 1.2), ":", "EDM")):
        density = torch.exp(-((log_s - mean) ** 2) / (2 * std**2))  # the lognormal's density in ln(sigma), peak 1
        ax.semilogx(s, density, color="C4", ls=style, lw=1, label=f"{who} ln sigma ~ N({mean:.2f}, {std:.2f}^2)")
    for value, color, label in ((result.sigma_min, "C2", "sigma_min"), (result.sigma_max, "C3", "sigma_max")):
        ax.axvline(value, color=color, ls="--", lw=1, label=f"{label} {value:.3g}")
    for key in ("sigma_min", "sigma_max"):
        ax.axvline(EDM_DEFAULTS[key], color="gray", ls=":", lw=1)
    ax.set_xlabel("sigma (gray dotted: EDM's 0.002 and 80)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6, loc="center left")
