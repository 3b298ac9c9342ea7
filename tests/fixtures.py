"""Small data sets written by the tests: EDM ZIPs/folders, CIFAR-10 pickles, and broken variants."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def random_images(n: int, size: int = 16, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, channels] (or [n, size, size] for one channel)."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels) if channels == 3 else (n, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="png")
    return buf.getvalue()


def write_dataset(dest: Path, images: np.ndarray, labels: list[int] | None = None, as_zip: bool = False) -> Path:
    """EDM layout: 00000/img00000000.png ... plus dataset.json (when labels are given)."""
    files = {f"{i // 1000:05d}/img{i:08d}.png": png_bytes(img) for i, img in enumerate(images)}
    if labels is not None:
        files["dataset.json"] = json.dumps({"labels": [[n, int(lab)] for n, lab in zip(files, labels)]}).encode()
    if as_zip:
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
    return dest


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0, archive: bool = False) -> tuple[np.ndarray, list]:
    """CIFAR-10's python format with ``per_batch`` images per batch file; returns the training images/labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f)
        if name != "test_batch":
            train_x.append(data.reshape(-1, 3, 32, 32))
            train_y += labels
    if archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    return np.concatenate(train_x), train_y
