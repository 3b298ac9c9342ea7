"""`diffscore sample`: draw N samples from a checkpoint's EMA weights, split over devices by seed.

Sample i uses seed ``seed + i`` (its noise, label and churn; diffscore.lit.sampling), so the output is the same on
any number of devices and at any batch size. Output goes to a temporary name first and is renamed at the end, so an
interrupted run leaves nothing.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffscore.commands.teleport import TeleportOptions, with_teleport
from diffscore.core.samplers import SAMPLERS
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write
from diffscore.lit.checkpoint import load_model
from diffscore.lit.sampling import SamplingOptions, SeedSampler, ShardWriter, parts_folder, predict_over_seeds


def check_counts(**counts: int | None) -> None:
    """Each named count (None: not given) must be >= 1."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise DiffscoreError(f"--{name} must be >= 1, got {value}")


def check_seeds(first: int, count: int) -> None:
    """Seeds first .. first + count - 1 must fit torch's 64-bit generator seeds."""
    if first < 0 or first + count > 2**63:
        raise DiffscoreError(f"seeds {first}..{first + count - 1} must lie in 0..2**63-1; choose a smaller --seed")


def check_memory(count: int, shape: tuple[int, ...], factor: int = 2) -> None:
    """Refuse a sample count whose float32 results (kept per batch, then merged: ``factor`` copies) cannot fit in
    the memory available now."""
    need = count * math.prod(shape) * 4 * factor
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if free is not None and need > free:
        raise DiffscoreError(
            f"--num_samples {count} needs about {need / 2**30:.1f} GiB for the samples but {free / 2**30:.1f} GiB is "
            "free; draw them in parts (--seed S --num_samples N for consecutive ranges)"
        )


def check_sampler(sampler: str | None) -> None:
    if sampler is not None and sampler not in SAMPLERS:
        raise DiffscoreError(f"--sampler {sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")


MARKER = ".diffscore-samples"  # in every PNG folder `diffscore sample` writes: --overwrite may replace only these


def _written_by_sample(out: Path) -> bool:
    if out.is_dir():
        return (out / MARKER).is_file()
    try:
        with np.load(out) as data:
            return {"seeds", "samples"} <= set(data.files)
    except (OSError, ValueError):
        return False


def _check_out(out: Path, overwrite: bool) -> None:
    if out.name in ("", ".", "..") or out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise DiffscoreError(f"--out {out} is the working folder or above it; name a new folder or FILE.npz")
    if not out.parent.is_dir():
        raise DiffscoreError(
            f"output folder {out.parent} does not exist (or is not a folder); create it or choose another --out"
        )
    if not os.access(out.parent, os.W_OK):
        raise DiffscoreError(f"output folder {out.parent} is not writable; choose another --out")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if out.is_file() != (out.suffix == ".npz"):
        raise DiffscoreError(f"{out} exists and is not a {'file' if out.suffix == '.npz' else 'folder'}")
    if not overwrite:
        raise DiffscoreError(f"{out} already exists; remove it, choose another --out, or pass --overwrite true")
    if not _written_by_sample(out):
        raise DiffscoreError(
            f"{out} was not written by `diffscore sample` (no {MARKER} marker / seeds+samples arrays): "
            "--overwrite replaces only diffscore's own samples; remove it yourself or choose another --out"
        )


def _write(out: Path, seeds: torch.Tensor, samples: torch.Tensor) -> None:
    """A .npz of seeds and samples, or a folder of ``<seed>.png``; never left half-written."""
    if out.suffix == ".npz":
        with atomic_write(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, seeds=seeds.numpy(), samples=samples.numpy())
        return
    if samples.ndim != 4:
        raise DiffscoreError(f"samples of shape {tuple(samples.shape[1:])} are not images; use --out FILE.npz")
    from torchvision.utils import save_image

    with atomic_write(out, directory=True) as tmp:
        (tmp / MARKER).write_text("samples written by `diffscore sample`; --overwrite may replace this folder\n")
        for s, img in zip(seeds.tolist(), samples):
            save_image((img.clamp(-1, 1) + 1) / 2, tmp / f"{s:06d}.png", format="png")


def sample(
    ckpt_path: str,
    out: str,
    num_samples: int = 64,
    steps: int | None = None,
    sampler: str | None = None,
    sampler_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    class_label: int | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    overwrite: bool = False,
    teleport: TeleportOptions | None = None,
    trust_checkpoint: bool = False,
    prompt: str | None = None,
    guidance: float = 1.0,
    precision: str | None = None,
    compile: bool | None = None,
    channels_last: bool | None = None,
) -> Path | None:
    """Sample from a diffscore checkpoint (its EMA weights) into a folder of PNGs or a .npz file.

    Args:
        ckpt_path: checkpoint written by `diffscore fit` (e.g. .../checkpoints/last.ckpt).
        out: a folder (one PNG per seed, ``<seed>.png``) or a ``.npz`` file (arrays ``seeds``, ``samples`` in
            data space; vector data need .npz).
        num_samples: how many samples; seeds ``seed .. seed + num_samples - 1``.
        steps: sampler steps (default: the checkpoint's num_steps; Heun 18 -> 35 evaluations).
        sampler: sampler name (default: the checkpoint's sampler).
        sampler_kwargs: sampler options as JSON, e.g. '{"s_churn": 40, "s_min": 0.05, "s_max": 50, "s_noise":
            1.003}' (EDM's ImageNet-64 Heun; default: the checkpoint's, for its own sampler).
        seed: the first seed.
        batch_size: samples per forward pass on each device.
        class_label: class for every sample of a class-conditional model (default: a label drawn from each seed).
        accelerator: "cpu", "gpu" or "auto".
        devices: number of devices (or "auto"); the seeds are split across them.
        strategy: Lightning strategy ("auto", "ddp", ...).
        overwrite: replace an existing output.
        teleport: skip the first steps with the Gaussian model of the training data (--teleport.skip K or
            --teleport.sigma S; --teleport.gaussian FILE caches the fit).
        trust_checkpoint: allow a checkpoint that needs full unpickling (only for files you trust).
        prompt: caption for every sample of a text-conditioned model (default: the empty caption).
        guidance: classifier-free guidance scale w (1 = the conditional model as trained; 4 = MusicScore's CFG).
        precision: on a GPU, "bf16" (autocast) or "32" (default: as the checkpoint trained; EDM pickles: 32).
        compile: on a GPU, torch.compile the denoiser (default: as the checkpoint trained).
        channels_last: on a GPU, channels-last memory (default: as the checkpoint trained).
    """
    check_counts(num_samples=num_samples, steps=steps, batch_size=batch_size)
    check_sampler(sampler)
    check_seeds(seed, num_samples)
    out_path = Path(out)
    _check_out(out_path, overwrite)
    model = load_model(ckpt_path, trust_checkpoint)
    check_memory(num_samples, tuple(model.data_shape))
    options = SamplingOptions(
        num_steps=steps,
        sampler=sampler,
        sampler_kwargs=sampler_kwargs,
        class_label=class_label,
        prompts=None if prompt is None else [prompt],
        guidance=guidance,
        precision=precision,
        compile=compile,
        channels_last=channels_last,
        progress=True,
    )
    model.check(options)
    options = with_teleport(model, options, teleport, ckpt_path, trust_checkpoint)
    seeds = list(range(seed, seed + num_samples))
    writer = ShardWriter(parts_folder(out_path))
    t0 = time.perf_counter()
    merged = predict_over_seeds(SeedSampler(model, options), seeds, writer, batch_size, accelerator, devices, strategy)
    if merged is None:
        return None
    _write(out_path, merged["seeds"], merged["samples"])
    rate = writer.rate()
    after_first = f", {rate:.1f} img/s per device after the first batch" if rate else ""
    print(
        f"diffscore: wrote {num_samples} samples to {out_path} ({time.perf_counter() - t0:.1f} s{after_first})",
        flush=True,
    )
    return out_path
