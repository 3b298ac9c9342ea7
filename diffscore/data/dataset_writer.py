"""`diffscore dataset`: convert an image folder, an EDM ZIP or CIFAR-10 into EDM's ZIP/folder format.

Output layout (as EDM's dataset_tool): ``00000/img00000000.png`` ... with a ``dataset.json`` holding
``{"labels": [[name, label], ...]}`` or ``{"labels": null}``, plus ``"written_by": "diffscore dataset"`` (EDM's
readers ignore it): ``--overwrite`` replaces only a ZIP/folder that carries it and holds nothing else. Images come
out square with a power-of-two side of at least 4 (what `fit` takes); ``--transform center-crop`` crops the largest
centred square first, ``--resolution R`` resizes (Lanczos); 16-bit grayscale becomes 8-bit (0..65535 -> 0..255).
The output is written under a temporary name and renamed at the end: an interrupted run leaves nothing.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from diffscore.data.cifar10 import ARCHIVE, FOLDER, read_cifar10
from diffscore.data.image_folder import (
    IMAGE_EXTENSIONS,
    MIN_SIDE,
    SIDE_RULE,
    duplicate_name,
    is_valid_side,
    read_labels_json,
    reading_image,
)
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write, read_user_file, read_zip_member

TRANSFORMS = (None, "center-crop")
MARKER, WRITER = "written_by", "diffscore dataset"  # the dataset.json entry that lets --overwrite replace an output
# every member of an output (folders end in /): images, and the latents of `diffscore dataset --encode`
LAYOUT = re.compile(r"dataset\.json|[0-9]{5}/(img[0-9]{8}\.png|img-mean-std-[0-9]{8}\.npy)?")
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL's modes of 16-bit grayscale PNGs


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
    """Images of a folder or ZIP (sorted by path), with labels from its dataset.json when present. Every file is
    read through diffscore.io's bounded reader (a FIFO, device or oversized member is one line, never a hang)."""
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise DiffscoreError(f"--source {source} is neither a folder, a ZIP, nor the CIFAR-10 archive")
        zf = zipfile.ZipFile(source)
        dup = duplicate_name(zf.namelist())
        if dup is not None:
            raise DiffscoreError(
                f"--source {source} holds two members named {dup!r} (twice: only one could be read); "
                "rebuild the ZIP with unique names"
            )
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))

        def read(name: str) -> bytes:
            return read_zip_member(zf, name, f"{source}:{name}")

        has_meta = "dataset.json" in zf.namelist()
    elif source.is_dir():
        names = sorted(
            p.relative_to(source).as_posix() for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
        )

        def read(name: str) -> bytes:
            return read_user_file(source / name, f"{source}/{name}")

        has_meta = (source / "dataset.json").exists() or (source / "dataset.json").is_symlink()
    else:
        raise DiffscoreError(f"--source {source} does not exist")
    if not names:
        raise DiffscoreError(f"--source {source} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels = read_labels_json(io.BytesIO(read("dataset.json")), f"{source}/dataset.json") if has_meta else None

    def items():
        for name in names:
            with reading_image(f"{source}/{name}"):
                img = Image.open(io.BytesIO(read(name)))
                img.load()
            if labels is not None and name not in labels:
                raise DiffscoreError(f"{source}/dataset.json has no label for {name}")
            yield name, img, (labels[name] if labels is not None else None)

    return len(names), items()


def eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (``SIXTEEN_BIT`` modes) as 8-bit L: 0..65535 maps onto 0..255, rounded."""
    levels = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)  # [H, W]
    return Image.fromarray(np.rint(levels * (255 / 65535)).astype(np.uint8))


def _prepare(img: Image.Image, name: str, resolution: int | None, transform: str | None) -> Image.Image:
    if img.mode in SIXTEEN_BIT:
        img = eight_bit(img)  # PIL's own convert() would clip at 255: a white image
    elif img.mode not in ("L", "RGB"):
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
    if not is_valid_side(target):
        raise DiffscoreError(
            f"{name} is {w}x{w}{' after the crop' if transform else ''}; images must be {SIDE_RULE} (what fit "
            f"takes): pass --resolution R (a power of two >= {MIN_SIDE}) to resize"
        )
    if target != w:
        img = img.resize((target, target), Image.Resampling.LANCZOS)
    return img


def _check_options(resolution: int | None, transform: str | None, max_images: int | None) -> None:
    """Refuse bad converter options before anything is read or written."""
    if transform not in TRANSFORMS:
        raise DiffscoreError(f"--transform must be one of {TRANSFORMS}, got {transform!r}")
    if resolution is not None and not is_valid_side(resolution):
        raise DiffscoreError(f"--resolution must be a power of two of at least {MIN_SIDE}, got {resolution}")
    if max_images is not None and max_images < 1:
        raise DiffscoreError(f"--max_images must be >= 1, got {max_images}")


def _not_ours(out: Path) -> str | None:
    """Why ``out`` is not only an output of `diffscore dataset` (None: it is one, which --overwrite may replace)."""
    if out.is_symlink():
        return "is a link"
    try:
        if out.is_dir():
            meta = read_user_file(out / "dataset.json") if (out / "dataset.json").is_file() else None
            names = [p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir()]
        elif zipfile.is_zipfile(out):
            with zipfile.ZipFile(out) as zf:
                names = zf.namelist()
                meta = read_zip_member(zf, "dataset.json", f"{out}:dataset.json") if "dataset.json" in names else None
        else:
            return "is not a ZIP or a folder"
    except (OSError, zipfile.BadZipFile, DiffscoreError) as e:
        return f"cannot be read ({e})"
    if meta is None:
        return "has no dataset.json"
    try:
        marked = json.loads(meta).get(MARKER) == WRITER
    except (ValueError, AttributeError):
        marked = False
    if not marked:
        return f'has a dataset.json without "{MARKER}": "{WRITER}"'
    foreign = next((n for n in names if not LAYOUT.fullmatch(n)), None)
    return f"holds {foreign}, which `diffscore dataset` did not write" if foreign is not None else None


def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse a --dest that overlaps the --source, sits under a file, or is something --overwrite must keep."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        how = "is" if o == s else "is inside" if s in o.parents else "holds"
        raise DiffscoreError(f"--dest {out} {how} --source {src}; choose a --dest outside the source")
    existing = next(p for p in o.parents if p.exists())
    if not existing.is_dir():
        raise DiffscoreError(f"--dest {out} lies under {existing}, which is a file; choose another --dest")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise DiffscoreError(f"--dest {out} already exists; remove it or pass --overwrite true")
        reason = _not_ours(out)
        if reason is not None:
            raise DiffscoreError(
                f"--overwrite replaces only what `diffscore dataset` wrote, and --dest {out} {reason}; "
                "remove it yourself or choose another --dest"
            )


def _make_parents(out: Path) -> list[Path]:
    """Create the missing folders above ``out``; return them, deepest first (to remove after a failure)."""
    missing = [p for p in out.absolute().parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffscoreError(f"cannot create {out.parent} for --dest ({e.strerror}); choose another --dest") from None
    return missing


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


def _check_alike(first: tuple[str, str, Image.Image], name: str, mode: str, img: Image.Image) -> None:
    """Refuse an image that comes out unlike the first one, ``first`` = (its path, its source mode, it)."""
    first_name, first_mode, first_img = first
    if img.mode != first_img.mode:
        kind = {"L": "grayscale", "RGB": "color"}
        raise DiffscoreError(
            f"{name} is {kind[img.mode]} (mode {mode}) but {first_name} is {kind[first_img.mode]} (mode {first_mode}); "
            f"all images must have one mode: convert {name} to {first_img.mode} (or remove it) and run again"
        )
    if img.size != first_img.size:  # only without --resolution, which resizes every image alike
        (w, h), (fw, fh) = img.size, first_img.size
        raise DiffscoreError(
            f"{name} is {w}x{h} but {first_name} is {fw}x{fh}; pass --resolution R to resize every image to one size"
        )


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
    first = None
    for idx, (name, img, label) in enumerate(items):
        if idx >= total:
            break
        mode = img.mode
        img = _prepare(img, f"{src}/{name}", resolution, transform)
        if first is None:
            first = (f"{src}/{name}", mode, img)
        else:
            _check_alike(first, f"{src}/{name}", mode, img)
        arcname = f"{idx // 1000:05d}/img{idx:08d}.png"
        buf = io.BytesIO()
        img.save(buf, format="png", compress_level=0 if output.zf is not None else 6)
        output.write(arcname, buf.getvalue())
        if label is not None:
            labels.append([arcname, label])
    assert first is not None
    return labels, (first[2].mode, first[2].size)


@contextmanager
def dataset_output(out: Path) -> Iterator[_Output]:
    """Where `diffscore dataset` writes ``out`` (a .zip, else a folder): missing parents are made, the output is
    written under a temporary name and swapped in only when whole (an --overwrite, already checked, of a folder by
    a ZIP or the reverse sets the old one aside until then). The caller writes through the yielded output and
    closes it with its ``dataset.json``. On any failure the old output is back and the parents made are removed."""
    as_zip = out.suffix.lower() == ".zip"
    created = _make_parents(out)
    old = None
    if out.exists() and out.is_dir() == as_zip:
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
    try:
        with atomic_write(out, directory=not as_zip) as tmp:
            output = _Output(tmp, as_zip)
            try:
                yield output
            finally:
                output.close()
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # the failed write loses nothing
        for folder in created:  # deepest first; only the ones this run made, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _write(out: Path, items: Iterable, total: int, src: Path, resolution: int | None, transform: str | None):
    """Write the images at ``out`` (dataset_output); return (mode, size) of its images."""
    from tqdm import tqdm

    with dataset_output(out) as output:
        progress = tqdm(items, total=total, desc="diffscore dataset", unit="img")
        labels, shape = _write_images(output, progress, total, src, resolution, transform)
        output.close(json.dumps({"labels": labels if labels else None, MARKER: WRITER}))
    return shape


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
        dest: output path, outside the source; ending in .zip gives an uncompressed ZIP, otherwise a folder.
            Missing parent folders are created.
        resolution: output side (a power of two >= 4); images are resized with Lanczos if needed.
        transform: None (images must already be square) or "center-crop".
        max_images: stop after this many images.
        overwrite: replace an existing dest, if it is an output of `diffscore dataset` (nothing else is replaced).
    """
    src, out = Path(source), Path(dest)
    _check_options(resolution, transform, max_images)
    _check_paths(src, out, overwrite)
    count, items = _iter_cifar(src) if _is_cifar(src) else _iter_images(src)
    total = min(count, max_images or count)
    mode, (w, h) = _write(out, items, total, src, resolution, transform)
    print(f"diffscore: wrote {total} images ({w}x{h} {mode}) to {out}", flush=True)
    return out
