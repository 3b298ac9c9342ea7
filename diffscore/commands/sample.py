"""`diffscore sample`: draw N samples from a checkpoint's EMA weights, split over devices by seed.

Sample i uses seed ``seed + i`` (its noise, label and churn; diffscore.sampling.seeds), so the output is the same on
any number of devices and at any batch size. Output goes to a temporary name first and is renamed at the end, so an
interrupted run leaves nothing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from diffscore.commands.sampler import command_sampler
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write, check_memory
from diffscore.lit.predict import Devices, ShardWriter, devices_in_use, parts_folder, predict_over_seeds
from diffscore.loading.open import open_model
from diffscore.outputs import check_folder, check_replaceable, folder_output
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


def check_samples_fit(count: int, shape: tuple[int, ...], factor: int = 2) -> None:
    """Refuse a sample count whose float32 results (kept per batch, then merged: ``factor`` copies) cannot fit in
    the memory available now."""
    hint = "draw them in parts (--seed S --num_samples N for consecutive ranges)"
    check_memory(count * math.prod(shape) * 4 * factor, f"--num_samples {count}", hint)


NPZ_KEYS = ("seeds", "samples", "noise", "latents")  # what a .npz holds (latents: latent models only)


def _check_out(out: Path, overwrite: bool) -> None:
    """--out may be new, or (with --overwrite) what `diffscore sample` wrote there before (diffscore.outputs)."""
    if out.name in ("", ".", "..") or out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise DiffscoreError(f"--out {out} is the working folder or above it; name a new folder or FILE.npz")
    if out.suffix == ".npz":
        check_replaceable(out, "--out", "sample", overwrite)
    else:
        check_folder(out, "--out", "sample", overwrite)


def png(image: torch.Tensor, path: Path) -> None:
    """An image [C, H, W] in [-1, 1] as an 8-bit PNG (grey for one channel), rounded as EDM's generate.py rounds."""
    from PIL import Image

    pixels = (image.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, C]
    if pixels.shape[2] == 1:
        Image.fromarray(pixels[:, :, 0], mode="L").save(path, format="png")
    else:
        Image.fromarray(pixels, mode="RGB").save(path, format="png")


def _write(out: Path, merged: dict[str, torch.Tensor]) -> None:
    """A .npz of seeds, samples, noise (and a latent model's latents), or a folder of ``<seed>.png``; written whole
    before it replaces anything."""
    seeds, samples = merged["seeds"], merged["samples"]
    if out.suffix == ".npz":
        arrays = {k: v.numpy() for k, v in merged.items() if k in NPZ_KEYS}
        with atomic_write(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays, written_by=np.array("diffscore sample"))
        return
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise DiffscoreError(f"samples of shape {tuple(samples.shape[1:])} are not images; use --out FILE.npz")
    with folder_output(out, "sample") as tmp:
        for s, img in zip(seeds.tolist(), samples):
            png(img, tmp / f"{s:06d}.png")


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
    check_samples_fit(num_samples, (math.prod(model.image_shape) + latent * (2 if model.decoder is not None else 1),))
    per_device = -(-num_samples // devices_in_use(where))
    sampler = command_sampler(model, options, progress=True, samples_per_device=per_device)
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
