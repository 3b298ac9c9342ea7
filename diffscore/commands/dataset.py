"""`diffscore dataset`: images as EDM's dataset format (diffscore.data.dataset_writer), or, with ``--encode``, as an
EDM2-style latent dataset of a Stable Diffusion VAE (diffscore.data.latent_dataset): every image's posterior mean
and std (8 channels for SD's VAE), the image itself, labels or captions (a MusicScore folder's captions, by split),
and the VAE's scaling factor. The output is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffscore.data.dataset_writer import (
    MARKER,
    WRITER,
    _check_options,
    _check_paths,
    _iter_images,
    _prepare,
    convert_dataset,
    dataset_output,
)
from diffscore.data.latent_dataset import SPLITS, write_latents
from diffscore.data.latents import encode_latent_stats
from diffscore.data.musicscore import (
    DEFAULT_PREFIX,
    DEFAULT_TEMPLATE,
    MusicScoreDataset,
    find_scale_dir,
    index_split,
    read_metadata,
)
from diffscore.errors import DiffscoreError
from diffscore.loading.stable_diffusion import read_vae

Item = tuple[Tensor, int | None, str | None, str]  # (uint8 RGB [3, H, W], label, caption, split)


def _musicscore_pages(scale_dir: Path, resolution: int | None) -> tuple[int, Iterator[Item]]:
    """Every page of a MusicScore scale folder with its caption and split, as RGB squares (policy "top")."""
    if resolution is None:
        raise DiffscoreError(f"--source {scale_dir} is MusicScore: pass --resolution R (the paper's: 512)")
    metadata = read_metadata(scale_dir / "metadata.json")
    splits = {s: MusicScoreDataset(index_split(scale_dir, s, metadata, DEFAULT_TEMPLATE, DEFAULT_PREFIX), resolution)
              for s in SPLITS}  # fmt: skip

    def items() -> Iterator[Item]:
        for split, pages in splits.items():
            for i in range(len(pages)):
                image, caption = pages[i]
                yield image.expand(3, -1, -1).contiguous(), None, caption, split

    return sum(len(p) for p in splits.values()), items()


def _image_items(src: Path, resolution: int | None, transform: str | None) -> tuple[int, Iterator[Item]]:
    """An image folder / ZIP's images (RGB) with their labels, all in the training split."""
    count, images = _iter_images(src)

    def items() -> Iterator[Item]:
        for name, img, label in images:
            img = _prepare(img, f"{src}/{name}", resolution, transform).convert("RGB")
            yield torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label, None, "train"

    return count, items()


def _source_items(src: Path, resolution: int | None, transform: str | None) -> tuple[int, Iterator[Item]]:
    if src.is_dir():
        try:
            return _musicscore_pages(find_scale_dir(src), resolution)
        except DiffscoreError as e:
            if "metadata.json" in str(e) or "pass --resolution" in str(e):
                raise
    return _image_items(src, resolution, transform)


def encode_dataset(
    source: str, dest: str, vae_folder: str, options: dict, overwrite: bool = False, trust: bool = False
) -> Path:
    """The latent dataset of ``source`` at ``dest`` (``options``: resolution, transform, max_images, batch_size)."""
    src, out = Path(source), Path(dest)
    _check_options(options["resolution"], options["transform"], options["max_images"])
    _check_paths(src, out, overwrite)
    vae, scaling_factor, vae_dir = read_vae(vae_folder, trust)
    if vae.config.in_channels != 3:
        raise DiffscoreError(f"{vae_dir}: the VAE takes {vae.config.in_channels}-channel images, not RGB")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae.to(device)
    count, items = _source_items(src, options["resolution"], options["transform"])
    total = min(count, options["max_images"] or count)
    limited = (item for _, item in zip(range(total), items))
    from tqdm import tqdm

    with dataset_output(out) as output:
        progress = tqdm(limited, total=total, desc="diffscore dataset --encode", unit="img")
        meta = write_latents(output.write, progress, _encoder(vae), options["batch_size"])
        extra = {"scaling_factor": scaling_factor, "vae": str(vae_dir.resolve()), MARKER: WRITER}
        output.close(json.dumps({**meta, **extra}))
    print(f"diffscore: wrote {total} latents {meta['latent_shape']} (scaling factor {scaling_factor}) to {out}")
    return out


def _encoder(vae):
    def encode(images: Tensor) -> Tensor:
        return encode_latent_stats(vae, images)

    return encode


def dataset(
    source: str,
    dest: str,
    resolution: int | None = None,
    transform: str | None = None,
    max_images: int | None = None,
    overwrite: bool = False,
    encode: str | None = None,
    trust_checkpoint: bool = False,
    batch_size: int = 16,
) -> Path:
    """Convert images into EDM's dataset format (``dest`` a .zip or folder), or with ``--encode`` into an EDM2-style
    latent dataset of a Stable Diffusion VAE.

    Args:
        source: an image folder (optionally with dataset.json), a ZIP, CIFAR-10's cifar-10-python.tar.gz /
            cifar-10-batches-py folder, or (with --encode) a MusicScore scale folder (its pages, captions, splits).
        dest: output path, outside the source; ending in .zip gives an uncompressed ZIP, otherwise a folder.
            Missing parent folders are created.
        resolution: output side (a power of two >= 4); images are resized with Lanczos if needed (MusicScore:
            required, its pages are made square by the "top" policy).
        transform: None (images must already be square) or "center-crop".
        max_images: stop after this many images.
        overwrite: replace an existing dest, if it is an output of `diffscore dataset` (nothing else is replaced).
        encode: a Stable Diffusion folder (its vae/) or a VAE folder: write each image's posterior mean and std
            (``00000/img-mean-std-00000000.npy``, float32 [2C, h, w]), the image (``00000/img00000000.png``) and
            dataset.json with the labels or captions, splits and the VAE's scaling factor.
        trust_checkpoint: --encode: also read a VAE's pickled *.bin weights (only for files you trust).
        batch_size: --encode: images per VAE call.
    """
    if encode is None:
        return convert_dataset(source, dest, resolution, transform, max_images, overwrite)
    if batch_size < 1:
        raise DiffscoreError(f"--batch_size must be >= 1, got {batch_size}")
    options = {"resolution": resolution, "transform": transform, "max_images": max_images, "batch_size": batch_size}
    return encode_dataset(source, dest, encode, options, overwrite, trust_checkpoint)
