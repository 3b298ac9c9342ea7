"""CIFAR-10 in its official python format (the ``cifar-10-python.tar.gz`` archive or its extracted folder).

Read with a restricted unpickler that only rebuilds numpy arrays, lists and dicts, so a tampered file cannot
run code. (torchvision's reader insists on the official MD5 sums, so it cannot read test fixtures; the
format is six small pickles.)
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffscore.errors import DiffscoreError
from diffscore.io import MAX_USER_FILE_BYTES, open_user_file, read_user_file

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def missing_message(root: Path) -> str:
    return (
        f"CIFAR-10 not found at {root}: place the official archive {ARCHIVE} ({URL}) there, or its extracted "
        f"folder {FOLDER}/ (data_batch_1..5, test_batch); no download is attempted"
    )


def _batch_sources(root: Path) -> dict[str, bytes]:
    """name -> pickle bytes, from a folder, a folder holding the archive, or the archive itself."""
    archive = root if root.is_file() else root / ARCHIVE
    for folder in (root, root / FOLDER):
        if folder.is_dir() and all((folder / n).is_file() for n in TRAIN_FILES + TEST_FILES):
            return {n: read_user_file(folder / n) for n in TRAIN_FILES + TEST_FILES}
    if archive.is_file():  # read through the bounded reader: a regular file; members no larger than the cap
        try:
            with open_user_file(archive, max_bytes=None) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                if not all(n in members for n in TRAIN_FILES + TEST_FILES):
                    raise DiffscoreError(f"{archive} lacks some of {TRAIN_FILES + TEST_FILES}; is it CIFAR-10?")
                big = next((n for n in TRAIN_FILES + TEST_FILES if members[n].size > MAX_USER_FILE_BYTES), None)
                if big is not None:
                    size = members[big].size
                    raise DiffscoreError(f"{archive}: member {big} declares {size:,} bytes; is it CIFAR-10?")
                return {n: tar.extractfile(members[n]).read() for n in TRAIN_FILES + TEST_FILES}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DiffscoreError(f"{archive} is not a readable tar archive ({e})") from None
    raise DiffscoreError(missing_message(root))


def _decode(name: str, blob: bytes) -> tuple[Tensor, Tensor]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
        raise DiffscoreError(f"CIFAR-10 file {name} is malformed ({e})") from None
    if len(labels) != len(data) or (labels < 0).any() or (labels > 9).any():
        raise DiffscoreError(f"CIFAR-10 file {name}: labels must be 0..9, one per image")
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def read_cifar10(root: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """{"train": (uint8 [50000, 3, 32, 32], int64 [50000]), "test": (... [10000] ...)}."""
    blobs = _batch_sources(Path(root))
    out = {}
    for split, names in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        parts = [_decode(n, blobs[n]) for n in names]
        out[split] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return out
