"""Outputs that lose nothing: a command replaces only what diffscore itself wrote, never a non-regular file, and
swaps its new output in only once it is complete.

Every output says who wrote it: a JSON file by a top-level ``"written_by"``, a ``.npz``/``.ckpt``/``.pt`` by a
``written_by`` entry, a PNG by its ``Software`` text chunk, a folder by a manifest (``.diffscore-output.json``)
listing the files the command put there. An existing output is replaced only when that mark names the same
command; a folder is updated file by file: the files its manifest lists are replaced or removed, anything else a
user put there stays. ``--overwrite`` (where a command has it) is asked for on top of that.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write

MANIFEST = ".diffscore-output.json"  # in every folder a command writes: {"written_by": ..., "files": [...]}
MAX_MARK_BYTES = 1 << 20  # a JSON output is read for its mark only up to this size


def check_parent(path: Path, option: str) -> None:
    """The folder ``path`` goes into exists, is a folder and is writable."""
    parent = path.parent
    if not parent.is_dir():
        raise DiffscoreError(f"{option} {path}: its folder {parent} does not exist; create it or choose another")
    if not os.access(parent, os.W_OK):
        raise DiffscoreError(f"{option} {path}: its folder {parent} is not writable; choose another")


def check_kind(path: Path, option: str, folder: bool) -> None:
    """An existing ``path`` is a regular file (or a folder, for a folder output), not a link, device or FIFO."""
    if not (path.exists() or path.is_symlink()):
        return
    mode = os.lstat(path).st_mode
    wanted = stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)
    if not wanted:
        what = "folder" if stat.S_ISDIR(mode) else "link" if stat.S_ISLNK(mode) else "regular file"
        if not (stat.S_ISDIR(mode) or stat.S_ISLNK(mode) or stat.S_ISREG(mode)):
            what = "device, FIFO or socket"
        want = "a folder" if folder else "a file"
        raise DiffscoreError(f"{option} {path} exists and is a {what}, not {want} diffscore wrote; choose another")


def mark_of(path: Path) -> str | None:
    """Who wrote the file at ``path`` ("diffscore <command>"), or None when it carries no diffscore mark."""
    try:
        if path.suffix == ".json" and path.stat().st_size <= MAX_MARK_BYTES:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data.get("written_by") if isinstance(data, dict) else None
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as img:
                return img.info.get("Software")
        if path.suffix == ".npz" and zipfile.is_zipfile(path):
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                return str(data["written_by"]) if "written_by" in data.files else None
        if path.suffix in (".ckpt", ".pt") and zipfile.is_zipfile(path):
            import torch

            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return data.get("written_by") if isinstance(data, dict) else None
    except Exception:  # a damaged or foreign file carries no mark (torch and numpy raise many types)
        return None
    return None


def check_replaceable(path: Path, option: str, command: str, overwrite: bool | None = None) -> None:
    """Raise unless writing the file ``path`` loses nothing: its folder exists; an existing file there is a regular
    file that ``diffscore <command>`` wrote, and ``overwrite`` (None: the command has no such flag) is given."""
    check_parent(path, option)
    check_kind(path, option, folder=False)
    if not path.exists():
        return
    if overwrite is False:
        raise DiffscoreError(f"{path} already exists; choose another {option}, or pass --overwrite true to replace it")
    if mark_of(path) != f"diffscore {command}":
        raise DiffscoreError(
            f"{option} {path} exists and was not written by `diffscore {command}`; diffscore replaces only its own "
            "outputs: move it away or choose another name"
        )


def manifest_of(folder: Path) -> dict | None:
    """A folder's manifest, or None."""
    path = folder / MANIFEST
    if not path.is_file() or path.stat().st_size > MAX_MARK_BYTES:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("files"), list)
    return data if ok and all(isinstance(f, str) and "/" not in f for f in data["files"]) else None


def check_folder(path: Path, option: str, command: str, overwrite: bool | None = None) -> None:
    """Raise unless writing into the folder ``path`` loses nothing: new, empty, or written by the same command (its
    manifest), with ``overwrite`` given where the command has the flag."""
    check_parent(path, option)
    check_kind(path, option, folder=True)
    if not path.is_dir() or not any(path.iterdir()):
        return
    manifest = manifest_of(path)
    if manifest is None or manifest.get("written_by") != f"diffscore {command}":
        raise DiffscoreError(
            f"{option} {path} exists and was not written by `diffscore {command}` (no {MANIFEST}); choose a new "
            "folder, or empty it yourself"
        )
    if overwrite is False:
        raise DiffscoreError(f"{path} already exists; choose another {option}, or pass --overwrite true to update it")


@contextmanager
def folder_output(path: Path, command: str) -> Iterator[Path]:
    """Yield an empty temporary folder to write the complete output into; afterwards its files replace the ones
    the old manifest lists (the others the old output had are removed), files diffscore did not write stay, and the
    new manifest lists what is there now. Checked beforehand with ``check_folder``; an error, Ctrl-C or SIGTERM
    inside the block leaves the folder as it was."""
    tmp = path.with_name(f".{path.name}.new{os.getpid()}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        new = sorted(p.name for p in tmp.iterdir())
        old = (manifest_of(path) or {"files": []})["files"] if path.is_dir() else []
        clash = [n for n in new if (path / n).exists() and n not in old]
        if clash:
            raise DiffscoreError(f"{path / clash[0]} is not diffscore's and would be replaced; move it away")
        path.mkdir(exist_ok=True)
        for name in old:
            if name not in new:
                _remove(path / name)
        for name in new:
            os.replace(tmp / name, path / name)
        with atomic_write(path / MANIFEST) as manifest:
            manifest.write_text(json.dumps({"written_by": f"diffscore {command}", "files": new}, indent=1))
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
