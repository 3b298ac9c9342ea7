"""EDM's dataset format: a folder or an uncompressed ZIP of PNG/JPEG images, with optional labels.

Labels live in ``dataset.json`` at the root: ``{"labels": [["00000/img00000000.png", 6], ...]}`` (or
``"labels": null``). Images must be square with a power-of-two side of at least ``MIN_SIDE`` (the smallest the
U-Nets take), all of one size, with 1 (L) or 3 (RGB) channels; ``diffscore dataset`` converts anything else.
A ZIP that repeats a member name, and an image over PIL's decompression-bomb pixel limit, are refused. Items are
uint8 [C, H, W] tensors (the DataModule maps them to [-1, 1] on the device) and an int64 label (0 when unlabelled).
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

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from diffscore.errors import DiffscoreError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CHANNELS = {"L": 1, "RGB": 3}
MIN_SIDE = 4  # the U-Nets (diffscore/networks) take powers of two >= 4
SIDE_RULE = f"square with a power-of-two side of at least {MIN_SIDE}"


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
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DiffscoreError(f"{where} is not a readable image ({e})") from None


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
        self._num_checked = len(self.names) if verify else 1  # images past it: their header is read on first use
        self.shape = self._check_headers(self.names[: self._num_checked])  # (C, H, W)
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
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]

    def _zipfile(self) -> zipfile.ZipFile:
        # One handle per process: a forked DataLoader worker must not share the parent's file offset.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _open(self, name: str):
        return self._zipfile().open(name, "r") if self._is_zip else open(self.path / name, "rb")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    def _where(self, name: str) -> str:
        return f"{self.path}:{name}" if self._is_zip else str(self.path / name)

    def _header(self, name: str, data: bytes | None = None) -> tuple[int, int, str]:
        """(width, height, mode) of an image from its header (the pixels are not decoded)."""
        with reading_image(self._where(name)):
            with io.BytesIO(data) if data is not None else self._open(name) as f, Image.open(f) as img:
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
        try:
            with self._open("dataset.json") as f:
                meta = json.load(f)
        except (FileNotFoundError, KeyError):
            raise DiffscoreError(
                f'data.cond is set but {where} does not exist; add it ({{"labels": [[file, label], ...]}}) '
                "or set data.cond false"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DiffscoreError(f"{where} is not valid JSON ({e})") from None
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if not isinstance(entries, list):
            raise DiffscoreError(f'{where} has no "labels" list; expected {{"labels": [[file, label], ...]}}')
        try:
            table = {str(name): label for name, label in entries}
        except (TypeError, ValueError):
            raise DiffscoreError(f'{where}: every "labels" entry must be a [file, label] pair') from None
        labels = []
        for name in self.names:
            if name not in table:
                raise DiffscoreError(f"{where} has no label for {name}")
            label = table[name]
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                raise DiffscoreError(f"{where}: the label of {name} is {label!r}; labels must be integers >= 0")
            labels.append(label)
        return torch.tensor(labels, dtype=torch.long)

    # ---------------------------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return self.num_images * (2 if self.xflip else 1)

    def read_image(self, index: int) -> Tensor:
        """The decoded image ``index`` (no flip) as uint8 [C, H, W]."""
        from torchvision.io import ImageReadMode, decode_image

        name = self.names[index]
        with self._open(name) as f:
            data = f.read()
        if index >= self._num_checked:  # not verified at start-up: no decoder sees a bomb or a wrong size
            w, h, mode = self._header(name, data)
            if (CHANNELS[mode], h, w) != self.shape:
                raise DiffscoreError(f"{self._where(name)} is {[CHANNELS[mode], h, w]}, expected {list(self.shape)}")
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except RuntimeError as e:
            raise DiffscoreError(f"{self._where(name)} could not be decoded ({str(e).splitlines()[0]})") from None
        if tuple(img.shape) != self.shape:
            raise DiffscoreError(f"{self._where(name)} is {list(img.shape)}, expected {list(self.shape)}")
        return img

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        raw = index % self.num_images
        img = self.read_image(raw)
        if index >= self.num_images:
            img = img.flip(-1)
        label = self.labels[raw] if self.labels is not None else torch.zeros((), dtype=torch.long)
        return img, label
