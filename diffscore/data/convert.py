"""`diffscore dataset`: convert an image folder, an EDM ZIP or CIFAR-10 into EDM's ZIP/folder format.

Output layout (as EDM's dataset_tool): ``00000/img00000000.png`` ... with a ``dataset.json`` holding
``{"labels": [[name, label], ...]}`` or ``{"labels": null}``. Images are square with a power-of-two side;
``--transform center-crop`` crops the largest centred square first, ``--resolution R`` resizes (Lanczos).
The output is written under a temporary name and renamed at the end: an interrupted run leaves nothing.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from diffscore.data.cifar10 import ARCHIVE, FOLDER, read_cifar10
from diffscore.data.image_folder import IMAGE_EXTENSIONS, is_power_of_two
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write

TRANSFORMS = (None, "center-crop")


def _is_cifar(source: Path) -> bool:
    return (
        source.name == ARCHIVE
        or (source.is_dir() and ((source / ARCHIVE).is_file() or (source / FOLDER).is_dir()))
        or (source.is_dir() and (source / "data_batch_1").is_file())
    )


def _iter_cifar(source: Path) -> tuple[int, Iterator[tuple[str, Image.Image, int | None]]]:
    x, y = read_cifar10(source)["train"]

    def items():
        for i in range(len(x)):
            yield f"cifar10-train-{i:05d}", Image.fromarray(x[i].permute(1, 2, 0).numpy(), "RGB"), int(y[i])

    return len(x), items()


def _iter_images(source: Path) -> tuple[int, Iterator[tuple[str, Image.Image, int | None]]]:
    """Images of a folder or ZIP (sorted by path), with labels from its dataset.json when present."""
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise DiffscoreError(f"--source {source} is neither a folder, a ZIP, nor the CIFAR-10 archive")
        zf = zipfile.ZipFile(source)
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))
        read = zf.read
        has_meta = "dataset.json" in zf.namelist()
    elif source.is_dir():
        names = sorted(
            p.relative_to(source).as_posix() for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
        )

        def read(name: str) -> bytes:
            return (source / name).read_bytes()

        has_meta = (source / "dataset.json").is_file()
    else:
        raise DiffscoreError(f"--source {source} does not exist")
    if not names:
        raise DiffscoreError(f"--source {source} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels = None
    if has_meta:
        try:
            entries = json.loads(read("dataset.json")).get("labels")
            labels = {str(n): int(v) for n, v in entries} if entries is not None else None
        except (ValueError, TypeError, AttributeError) as e:
            raise DiffscoreError(f"{source}/dataset.json is malformed ({e})") from None

    def items():
        for name in names:
            try:
                img = Image.open(io.BytesIO(read(name)))
                img.load()
            except (UnidentifiedImageError, OSError) as e:
                raise DiffscoreError(f"{source}/{name} is not a readable image ({e})") from None
            if labels is not None and name not in labels:
                raise DiffscoreError(f"{source}/dataset.json has no label for {name}")
            yield name, img, (labels[name] if labels is not None else None)

    return len(names), items()


def _prepare(img: Image.Image, name: str, resolution: int | None, transform: str | None) -> Image.Image:
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    w, h = img.size
    if transform == "center-crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        w = h = side
    elif w != h:
        raise DiffscoreError(f"{name} is {w}x{h}, not square; pass --transform center-crop")
    target = resolution or w
    if not is_power_of_two(target):
        raise DiffscoreError(f"{name} would be {target}x{target}; pass --resolution with a power of two")
    if target != w:
        img = img.resize((target, target), Image.Resampling.LANCZOS)
    return img


def _check_options(
    out: Path, resolution: int | None, transform: str | None, max_images: int | None, overwrite: bool
) -> None:
    """Refuse bad converter options before anything is read or written."""
    if transform not in TRANSFORMS:
        raise DiffscoreError(f"--transform must be one of {TRANSFORMS}, got {transform!r}")
    if resolution is not None and not is_power_of_two(resolution):
        raise DiffscoreError(f"--resolution must be a power of two, got {resolution}")
    if max_images is not None and max_images < 1:
        raise DiffscoreError(f"--max_images must be >= 1, got {max_images}")
    if not out.parent.is_dir():
        raise DiffscoreError(f"output folder {out.parent} does not exist; create it or choose another --dest")
    if out.exists() and not overwrite:
        raise DiffscoreError(f"--dest {out} already exists; remove it or pass --overwrite true")


class _Output:
    """Images and ``dataset.json`` written into ``tmp``: a ZIP file there, or files in that folder."""

    def __init__(self, tmp: Path, as_zip: bool) -> None:
        self.tmp = tmp
        self.zf = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) if as_zip else None

    def write(self, arcname: str, data: bytes) -> None:
        if self.zf is not None:
            self.zf.writestr(arcname, data)
        else:
            (self.tmp / arcname).parent.mkdir(exist_ok=True)
            (self.tmp / arcname).write_bytes(data)

    def close(self, meta: str | None = None) -> None:
        """Write ``dataset.json`` (unless None) and close the ZIP."""
        if meta is not None:
            self.write("dataset.json", meta.encode())
        if self.zf is not None:
            self.zf.close()
            self.zf = None


def _write_images(
    output: _Output,
    items: Iterable[tuple[str, Image.Image, int | None]],
    total: int,
    src: Path,
    resolution: int | None,
    transform: str | None,
) -> tuple[list[list], tuple[str, tuple[int, int]]]:
    """Write the first ``total`` images as ``00000/img00000000.png`` ...; return (labels, (mode, size))."""
    labels: list[list] = []
    shape = None
    for idx, (name, img, label) in enumerate(items):
        if idx >= total:
            break
        img = _prepare(img, f"{src}/{name}", resolution, transform)
        this = (img.mode, img.size)
        if shape is None:
            shape = this
        elif this != shape:
            raise DiffscoreError(
                f"{src}/{name} gives {this} but the first image gave {shape}; pass --resolution "
                "(and --transform center-crop) so that all images come out alike"
            )
        arcname = f"{idx // 1000:05d}/img{idx:08d}.png"
        buf = io.BytesIO()
        img.save(buf, format="png", compress_level=0 if output.zf is not None else 6)
        output.write(arcname, buf.getvalue())
        if label is not None:
            labels.append([arcname, label])
    return labels, shape


def convert_dataset(
    source: str,
    dest: str,
    resolution: int | None = None,
    transform: str | None = None,
    max_images: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert ``source`` (image folder, EDM ZIP, or CIFAR-10 archive/folder) into ``dest`` (.zip or folder).

    Args:
        source: an image folder (optionally with dataset.json), a ZIP, or CIFAR-10's cifar-10-python.tar.gz /
            cifar-10-batches-py folder (its 50,000 training images with labels).
        dest: output path; ending in .zip gives an uncompressed ZIP, otherwise a folder.
        resolution: output side (a power of two); images are resized with Lanczos if needed.
        transform: None (images must already be square) or "center-crop".
        max_images: stop after this many images.
        overwrite: replace an existing dest.
    """
    from tqdm import tqdm

    src, out = Path(source), Path(dest)
    _check_options(out, resolution, transform, max_images, overwrite)
    count, items = _iter_cifar(src) if _is_cifar(src) else _iter_images(src)
    total = min(count, max_images or count)
    as_zip = out.suffix.lower() == ".zip"
    if out.is_file() and not as_zip:  # --overwrite: a folder replaces a file of the same name
        out.unlink()
    with atomic_write(out, directory=not as_zip) as tmp:
        output = _Output(tmp, as_zip)
        try:
            progress = tqdm(items, total=total, desc="diffscore dataset", unit="img")
            labels, shape = _write_images(output, progress, total, src, resolution, transform)
            output.close(json.dumps({"labels": labels if labels else None}))
        finally:
            output.close()
    print(f"diffscore: wrote {total} images ({shape[1][0]}x{shape[1][1]} {shape[0]}) to {out}", flush=True)
    return out
