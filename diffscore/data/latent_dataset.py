"""EDM2-style latent datasets: each image's VAE posterior statistics, stored once, with the image beside them.

Layout (a folder or an uncompressed ZIP, as NVlabs/edm2's ``dataset_tool.py encode`` writes it, plus the image
and the captions): ``00000/img-mean-std-00000000.npy`` (float32 [2C, h, w]: the posterior mean, then its standard
deviation; diffscore.data.latents), ``00000/img00000000.png`` (the RGB image the VAE encoded: the pixel reference
of FID), and ``dataset.json``::

    {"labels": [[npy, label], ...] | null, "captions": [[npy, caption], ...] | null,
     "splits": [[npy, "train" | "val" | "test"], ...] | null (all train), "scaling_factor": 0.18215,
     "latent_shape": [C, h, w], "image_shape": [3, H, W], "vae": "<folder>", "written_by": "diffscore dataset"}

A latent is drawn from the statistics every time the image is used and scaled once by ``scaling_factor``
(diffscore.data.latents.sample_latents), never by the VAE encoder per step. Members are read with
``np.load(allow_pickle=False)``: nothing in the file runs.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffscore.errors import DiffscoreError
from diffscore.io import read_user_file, read_zip_member

SPLITS = ("train", "val", "test")
SHAPE_KEY = "latent_shape"  # the dataset.json key that marks a latent dataset


def latent_name(index: int) -> str:
    return f"{index // 1000:05d}/img-mean-std-{index:08d}.npy"


def image_name(index: int) -> str:
    return f"{index // 1000:05d}/img{index:08d}.png"


class _Archive:
    """Members of a folder or ZIP, read by name (one ZIP handle per process, for DataLoader workers)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_zip = path.is_file()
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def read(self, name: str) -> bytes:
        """A member's bytes through diffscore.io's bounded reader (a FIFO, device or oversized member is one
        line, never a hang); a missing one is an OSError."""
        if not self.is_zip:
            path = self.path / name
            if not (path.exists() or path.is_symlink()):
                raise FileNotFoundError(path)
            return read_user_file(path)
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return read_zip_member(self._zip, name, f"{self.path}:{name}")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """dataset.json of a latent dataset at ``path`` (None when ``path`` is not one: no such file or no
    ``latent_shape`` in it)."""
    path = Path(path)
    try:
        if path.is_dir():
            meta_path = path / "dataset.json"
            if not (meta_path.exists() or meta_path.is_symlink()):
                return None
            raw = read_user_file(meta_path)
        elif path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                raw = read_zip_member(zf, "dataset.json", f"{path}:dataset.json")
        else:
            return None
    except (OSError, KeyError):
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DiffscoreError(f"{path}/dataset.json is not valid JSON ({e})") from None
    return meta if isinstance(meta, dict) and SHAPE_KEY in meta else None


def _table(meta: dict[str, Any], key: str, names: list[str], path: Path) -> list[Any] | None:
    entries = meta.get(key)
    if entries is None:
        return None
    try:
        table = {str(name): value for name, value in entries}
        return [table[name] for name in names]
    except (TypeError, ValueError, KeyError) as e:
        raise DiffscoreError(
            f"{path}/dataset.json: {key!r} must give every latent a [file, value] pair ({e})"
        ) from None


class LatentDataset(Dataset):
    """The latent dataset at ``path``: item i is (statistics float32 [2C, h, w], caption str) when the dataset has
    captions, else (statistics, label int64); ``split`` picks the images of one split."""

    def __init__(self, path: str | Path, split: str = "train") -> None:
        self.path = Path(path)
        meta = read_meta(self.path)
        if meta is None:
            raise DiffscoreError(
                f"{self.path} is not a latent dataset (no dataset.json with {SHAPE_KEY!r}); make one with "
                "`diffscore dataset --source SRC --dest out.zip --encode SD_FOLDER`"
            )
        self.meta = meta
        self.archive = _Archive(self.path)
        count = len(meta.get("splits") or meta.get("labels") or meta.get("captions") or [])
        names = [latent_name(i) for i in range(int(meta.get("count", count)))]
        splits = _table(meta, "splits", names, self.path) or ["train"] * len(names)
        keep = [i for i, s in enumerate(splits) if s == split]
        self.indices = keep  # positions in the whole dataset (the member index)
        self.names = [names[i] for i in keep]
        captions = _table(meta, "captions", names, self.path)
        labels = _table(meta, "labels", names, self.path)
        self.captions = [captions[i] for i in keep] if captions is not None else None
        self.labels = [int(labels[i]) for i in keep] if labels is not None else None
        self.latent_shape = tuple(int(v) for v in meta[SHAPE_KEY])
        self.scaling_factor = float(meta.get("scaling_factor", 0.18215))

    def __len__(self) -> int:
        return len(self.names)

    def statistics(self, i: int) -> Tensor:
        """The posterior statistics of item i, float32 [2C, h, w] (checked against the declared shape)."""
        name = self.names[i]
        try:
            stats = torch.from_numpy(np.load(io.BytesIO(self.archive.read(name)), allow_pickle=False))
        except (KeyError, OSError, ValueError) as e:
            raise DiffscoreError(f"{self.path}:{name} is missing or not a .npy array ({e})") from None
        c, h, w = self.latent_shape
        if tuple(stats.shape) != (2 * c, h, w):
            raise DiffscoreError(f"{self.path}:{name} is {list(stats.shape)}, expected {[2 * c, h, w]}")
        return stats.to(torch.float32)

    def image(self, i: int) -> Tensor:
        """The image item i was encoded from, uint8 [3, H, W]."""
        from torchvision.io import ImageReadMode, decode_image

        name = image_name(self.indices[i])
        try:
            data = self.archive.read(name)
        except (KeyError, OSError):
            raise DiffscoreError(f"{self.path} has no image {name} (written without images?)") from None
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        cond = self.captions[i] if self.captions is not None else torch.tensor(self.labels[i] if self.labels else 0)
        return self.statistics(i), cond


def write_latents(
    write: Callable[[str, bytes], None],
    items: Iterable[tuple[Tensor, int | None, str | None, str]],
    encode: Callable[[Tensor], Tensor],
    batch_size: int,
) -> dict[str, Any]:
    """Encode ``items`` (uint8 RGB image [3, H, W], label, caption, split) in batches of ``batch_size`` with
    ``encode`` (images in [-1, 1] [B, 3, H, W] -> statistics [B, 2C, h, w]) and ``write(name, bytes)`` each
    latent and image; returns the dataset.json entries (labels, captions, splits, latent_shape, image_shape)."""
    import PIL.Image

    rows: list[tuple[int | None, str | None, str]] = []
    batch: list[Tensor] = []
    shapes: dict[str, list[int]] = {}

    def flush() -> None:
        images = torch.stack(batch)  # [b, 3, H, W] uint8
        stats = encode(images.to(torch.float32) / 127.5 - 1)  # [b, 2C, h, w]
        shapes.setdefault(SHAPE_KEY, [stats.shape[1] // 2, *stats.shape[2:]])
        shapes.setdefault("image_shape", list(images.shape[1:]))
        start = len(rows) - len(batch)  # the member index of the batch's first image
        for k, (image, stat) in enumerate(zip(images, stats)):
            buf = io.BytesIO()
            np.save(buf, stat.to(torch.float32).cpu().numpy())
            write(latent_name(start + k), buf.getvalue())
            png = io.BytesIO()
            PIL.Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").save(png, format="png", compress_level=6)
            write(image_name(start + k), png.getvalue())
        batch.clear()

    for image, label, caption, split in items:
        if split not in SPLITS:
            raise DiffscoreError(f"internal: split {split!r}")
        rows.append((label, caption, split))
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    names = [latent_name(i) for i in range(len(rows))]
    labelled = all(r[0] is not None for r in rows)
    captioned = all(r[1] is not None for r in rows)
    return {
        "labels": [[n, r[0]] for n, r in zip(names, rows)] if labelled and rows else None,
        "captions": [[n, r[1]] for n, r in zip(names, rows)] if captioned and rows else None,
        "splits": [[n, r[2]] for n, r in zip(names, rows)],
        "count": len(rows),
        **shapes,
    }
