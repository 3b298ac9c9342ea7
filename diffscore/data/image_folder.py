"""EDM's dataset format: a folder or an uncompressed ZIP of PNG/JPEG images, with optional labels.

Labels live in ``dataset.json`` at the root: ``{"labels": [["00000/img00000000.png", 6], ...]}`` (or
``"labels": null``). Images must be square with a power-of-two side of at least ``MIN_SIDE`` (the smallest the
U-Nets take), all of one size, with 1 (L) or 3 (RGB) channels; ``diffscore dataset`` converts anything else.
A ZIP that repeats a member name, and an image over PIL's decompression-bomb pixel limit, are refused. Every file is
read through diffscore.io's bounded reader (regular files only: a FIFO, device or link to one named ``*.png`` is
refused, never opened blocking; at most ``MAX_USER_FILE_BYTES``, checked before and while reading, ZIP members too)
and decoded by PIL, which reports corrupt compressed data as an error (torchvision's libpng decoder could crash the
process on it). Labels are integers 0 <= label < ``MAX_CLASSES``, nothing coerced. Items are uint8 [C, H, W] tensors
(the DataModule maps them to [-1, 1] on the device) and an int64 label (0 when unlabelled).
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from diffscore.errors import DiffscoreError
from diffscore.io import open_user_file, open_zip_member

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CHANNELS = {"L": 1, "RGB": 3}
MIN_SIDE = 4  # the U-Nets (diffscore/networks) take powers of two >= 4
SIDE_RULE = f"square with a power-of-two side of at least {MIN_SIDE}"
MAX_CLASSES = 100_000  # labels become one-hot [B, num_classes]: 1e9 classes are GBs a batch (ImageNet-21k: 21,841)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def is_valid_side(n: int) -> bool:
    """Whether ``n`` x ``n`` images can be trained on (``SIDE_RULE``)."""
    return n >= MIN_SIDE and is_power_of_two(n)


def duplicate_name(names: Iterable[str]) -> str | None:
    """The first name that occurs twice in ``names`` (a ZIP may hold two members of one name), else None."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


@contextmanager
def reading_image(where: str) -> Iterator[None]:
    """PIL's errors while reading the image ``where`` as one-line DiffscoreErrors; an image over PIL's
    decompression-bomb pixel limit (its warning as well as its error) is refused before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DiffscoreError(
            f"{where} is refused as a possible decompression bomb ({e}); remove or shrink it"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:  # a damaged file
        raise DiffscoreError(f"{where} is not a readable image ({e})") from None


def parse_labels(meta: object, where: str) -> dict[str, int] | None:
    """The ``{file: label}`` table of a parsed ``dataset.json`` (None for ``"labels": null``). Each label must be a
    JSON integer with 0 <= label < MAX_CLASSES: ``-3``, ``"7"``, ``2.9``, ``true``, ``1e30`` and 10**9 are refused in
    one line naming ``where`` and the file, never coerced."""
    entries = meta.get("labels", ...) if isinstance(meta, dict) else ...
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise DiffscoreError(f'{where} has no "labels" list; expected {{"labels": [[file, label], ...]}}')
    table: dict[str, int] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DiffscoreError(f'{where}: every "labels" entry must be a [file, label] pair, got {entry!r:.80}')
        name, label = entry
        if type(label) is not int or not 0 <= label < MAX_CLASSES:
            raise DiffscoreError(
                f"{where}: the label of {name} is {label!r:.40}; labels must be integers >= 0 and < {MAX_CLASSES:,} "
                "(written as JSON integers, not strings, floats or booleans)"
            )
        table[name] = label
    return table


def read_labels_json(f, where: str) -> dict[str, int] | None:
    """``parse_labels`` of the JSON stream ``f`` (malformed or too deeply nested JSON is one line)."""
    try:
        meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DiffscoreError(f"{where} is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    return parse_labels(meta, where)


class ImageFolderDataset(Dataset):
    """Images of a folder or ZIP in EDM's layout; ``xflip`` appends a mirrored copy of every image."""

    def __init__(self, path: str | Path, use_labels: bool = False, xflip: bool = False, verify: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DiffscoreError(
                f"dataset {self.path} does not exist; point data.path at a ZIP or folder of images "
                "(make one with `diffscore dataset --source SRC --dest out.zip`)"
            )
        self._is_zip = self.path.is_file()
        if self._is_zip and not zipfile.is_zipfile(self.path):
            raise DiffscoreError(f"dataset {self.path} is a file but not a ZIP archive; pass a ZIP or a folder")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        self.names = sorted(n for n in self._all_files() if n.lower().endswith(IMAGE_EXTENSIONS))
        if not self.names:
            raise DiffscoreError(f"dataset {self.path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.xflip = xflip
        num_checked = len(self.names) if verify else 1  # images past it: their header is checked on first read
        self.shape = self._check_headers(self.names[:num_checked])  # (C, H, W)
        self.labels = self._read_labels() if use_labels else None
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None else 0

    # ---------------------------------------------------------------------------------------------------------
    def _all_files(self) -> list[str]:
        if self._is_zip:
            names = [n for n in self._zipfile().namelist() if not n.endswith("/")]
            dup = duplicate_name(names)
            if dup is not None:
                raise DiffscoreError(
                    f"dataset {self.path} holds two members named {dup!r} (twice: only one could be read); "
                    "rebuild the ZIP from the original images with unique names"
                )
            return names
        # everything but folders: a FIFO or device named *.png is refused when read, not skipped in silence
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if not p.is_dir()]

    def _zipfile(self) -> zipfile.ZipFile:
        # One handle per process: a forked DataLoader worker must not share the parent's file offset.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _open(self, name: str):
        """The bounded reader (diffscore.io) of a member or file: regular files only, at most MAX_USER_FILE_BYTES."""
        if self._is_zip:
            return open_zip_member(self._zipfile(), name, self._where(name))
        return open_user_file(self.path / name, self._where(name))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    def _where(self, name: str) -> str:
        return f"{self.path}:{name}" if self._is_zip else str(self.path / name)

    def _header(self, name: str) -> tuple[int, int, str]:
        """(width, height, mode) of an image from its header (the pixels are not decoded)."""
        with reading_image(self._where(name)), self._open(name) as f, Image.open(f) as img:
            return self._check_header(name, img)

    def _check_header(self, name: str, img: Image.Image) -> tuple[int, int, str]:
        """(width, height, mode) of an opened image that is square, of a valid side, L or RGB."""
        (w, h), mode = img.size, img.mode
        if w != h or not is_valid_side(w):
            raise DiffscoreError(
                f"{self._where(name)} is {w}x{h}; images must be {SIDE_RULE} "
                "(convert with `diffscore dataset --resolution R --transform center-crop`)"
            )
        if mode not in CHANNELS:
            raise DiffscoreError(
                f"{self._where(name)} has mode {mode}; images must be L (1 channel) or RGB "
                "(convert with `diffscore dataset`)"
            )
        return w, h, mode

    def _check_headers(self, names: list[str]) -> tuple[int, int, int]:
        """Read every image header (not the pixels): square, power-of-two side, one size, L or RGB."""
        shape = None
        for name in names:
            w, h, mode = self._header(name)
            this = (CHANNELS[mode], h, w)
            if shape is None:
                shape = this
            elif this != shape:
                raise DiffscoreError(
                    f"{self._where(name)} is {list(this)} but {self._where(names[0])} is {list(shape)}; "
                    "all images must have one size and channel count"
                )
        assert shape is not None
        return shape

    def _read_labels(self) -> Tensor:
        where = self._where("dataset.json")
        exists = "dataset.json" in self._zipfile().namelist() if self._is_zip else (self.path / "dataset.json").exists()
        if not exists and not (self.path / "dataset.json").is_symlink():
            raise DiffscoreError(
                f'data.cond is set but {where} does not exist; add it ({{"labels": [[file, label], ...]}}) '
                "or set data.cond false"
            )
        with self._open("dataset.json") as f:
            table = read_labels_json(f, where)
        if table is None:
            raise DiffscoreError(f'data.cond is set but {where} says "labels": null; add labels or set data.cond false')
        missing = next((name for name in self.names if name not in table), None)
        if missing is not None:
            raise DiffscoreError(f"{where} has no label for {missing}")
        return torch.tensor([table[name] for name in self.names], dtype=torch.long)

    # ---------------------------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return self.num_images * (2 if self.xflip else 1)

    def read_image(self, index: int) -> Tensor:
        """The decoded image ``index`` (no flip) as uint8 [C, H, W]: read whole through the bounded reader, its
        header checked again (the file may have changed since start-up), decoded by PIL (a corrupt stream is a
        one-line error naming the file, also inside a DataLoader worker)."""
        name = self.names[index]
        with self._open(name) as f:
            data = f.read()
        with reading_image(self._where(name)), Image.open(io.BytesIO(data)) as img:
            w, h, mode = self._check_header(name, img)
            if (CHANNELS[mode], h, w) != self.shape:
                raise DiffscoreError(f"{self._where(name)} is {[CHANNELS[mode], h, w]}, expected {list(self.shape)}")
            img.load()  # decodes: a corrupt stream raises here, inside reading_image
            pixels = np.asarray(img)  # [H, W] (L) or [H, W, 3] (RGB) uint8
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # [C, H, W]
        return torch.from_numpy(np.array(chw, order="C"))  # a writable copy

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        raw = index % self.num_images
        img = self.read_image(raw)
        if index >= self.num_images:
            img = img.flip(-1)
        label = self.labels[raw] if self.labels is not None else torch.zeros((), dtype=torch.long)
        return img, label
