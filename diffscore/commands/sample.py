"""`diffscore sample`: draw N samples from a checkpoint's EMA weights, split over devices by seed.

Sample i uses seed ``seed + i`` (its noise, label and churn; diffscore.sampling.seeds), so the output is the same on
any number of devices and at any batch size. Output goes to a temporary name first and is renamed at the end, so an
interrupted run leaves nothing.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from diffscore.commands.sampler import command_sampler
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write
from diffscore.lit.predict import Devices, ShardWriter, parts_folder, predict_over_seeds
from diffscore.loading.open import open_model
from diffscore.sampling.options import SamplingOptions


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


NPZ_KEYS = ("seeds", "samples", "noise", "latents")  # what a .npz holds (latents: latent models only)
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


def _write(out: Path, merged: dict[str, torch.Tensor]) -> None:
    """A .npz of seeds, samples, noise (and a latent model's latents), or a folder of ``<seed>.png``; never left
    half-written."""
    seeds, samples = merged["seeds"], merged["samples"]
    if out.suffix == ".npz":
        with atomic_write(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: v.numpy() for k, v in merged.items() if k in NPZ_KEYS})
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
    seed: int = 0,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    options: SamplingOptions = SamplingOptions(),
    where: Devices = Devices(),
) -> Path | None:
    """Draw samples from a model (a diffscore checkpoint's EMA weights, or an NVlabs/edm network .pkl) into a folder
    of PNGs or a .npz file; sample i uses seed ``seed + i``.

    Args:
        ckpt_path: a checkpoint written by `diffscore fit` (e.g. .../checkpoints/last.ckpt), an NVlabs/edm network
            pickle (edm-*.pkl, network-snapshot-*.pkl; read without running its code) or a diffusers Stable
            Diffusion folder.
        out: a folder (one PNG per seed, ``<seed>.png``) or a ``.npz`` file (arrays ``seeds``, ``samples`` in
            data space (a latent model's decoded images), ``noise`` (each seed's unit initial draw, before the
            multiplication by sigma_max) and, for a latent model, ``latents``; vector data need .npz).
        num_samples: how many samples; seeds ``seed .. seed + num_samples - 1``.
        seed: the first seed.
        overwrite: replace an existing output that `diffscore sample` wrote.
        trust_checkpoint: allow a checkpoint that needs full unpickling, or a folder's pickled *.bin weights (only
            for files you trust).
    """
    check_counts(num_samples=num_samples)
    check_seeds(seed, num_samples)
    out_path = Path(out)
    _check_out(out_path, overwrite)
    model = open_model(ckpt_path, trust_checkpoint)
    latent = math.prod(model.data_shape)  # the noise, and a latent model's latents, travel with the images
    check_memory(num_samples, (math.prod(model.image_shape) + latent * (2 if model.decoder is not None else 1),))
    sampler = command_sampler(model, options, progress=True)
    seeds = list(range(seed, seed + num_samples))
    writer = ShardWriter(parts_folder(out_path))
    t0 = time.perf_counter()
    merged = predict_over_seeds(sampler, seeds, writer, options.batch_size, where)
    if merged is None:
        return None
    _write(out_path, merged)
    rate = writer.rate()
    after_first = f", {rate:.1f} img/s per device after the first batch" if rate else ""
    print(
        f"diffscore: wrote {num_samples} samples to {out_path} ({time.perf_counter() - t0:.1f} s{after_first})",
        flush=True,
    )
    return out_path
