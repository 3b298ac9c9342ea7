"""EDM's dataset format: a folder or an uncompressed ZIP of PNG/JPEG images, with optional labels.

Labels live in ``dataset.json`` at the root: ``{"labels": [["00000/img00000000.png", 6], ...]}`` (or
``"labels": null``). Images must be square with a power-of-two side, all of one size, with 1 (L) or 3 (RGB)
channels; ``diffscore dataset`` converts anything else. Items are uint8 [C, H, W] tensors (the DataModule
maps them to [-1, 1] on the device) and an int64 label (0 when unlabelled).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from diffscore.errors import DiffscoreError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CHANNELS = {"L": 1, "RGB": 3}


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


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
        self.shape = self._check_headers(self.names if verify else self.names[:1])  # (C, H, W)
        self.labels = self._read_labels() if use_labels else None
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None else 0

    # ---------------------------------------------------------------------------------------------------------
    def _all_files(self) -> list[str]:
        if self._is_zip:
            return [n for n in self._zipfile().namelist() if not n.endswith("/")]
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

    def _check_headers(self, names: list[str]) -> tuple[int, int, int]:
        """Read every image header (not the pixels): square, power-of-two side, one size, L or RGB."""
        shape = None
        for name in names:
            try:
                with self._open(name) as f, Image.open(f) as img:
                    (w, h), mode = img.size, img.mode
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                raise DiffscoreError(f"{self._where(name)} is not a readable image ({e})") from None
            if w != h or not is_power_of_two(w):
                raise DiffscoreError(
                    f"{self._where(name)} is {w}x{h}; images must be square with a power-of-two side "
                    "(convert with `diffscore dataset --resolution R --transform center-crop`)"
                )
            if mode not in CHANNELS:
                raise DiffscoreError(
                    f"{self._where(name)} has mode {mode}; images must be L (1 channel) or RGB "
                    "(convert with `diffscore dataset`)"
                )
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
