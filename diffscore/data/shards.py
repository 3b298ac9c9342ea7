"""Tar shards extracted safely, once per version of the shard (MusicScore ships its splits as ``.tar.gz``).

A member with an absolute path, a ``..`` component, a path resolving outside the destination, of any type other than
file and folder (links, devices) or larger than ``MAX_USER_FILE_BYTES`` is refused, and ``tarfile``'s ``data`` filter
is applied where Python has it. The shard itself is read through diffscore.io's bounded reader (a regular file).
An extraction is written to a temporary sibling and renamed when complete, and records its shard's size, mtime and a
hash of its ends (``STAMP``): a shard that changed since (or an extraction without the record) is extracted again
and swapped in whole; processes extracting one shard at once (DDP ranks) each finish, and the first one wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from diffscore.errors import DiffscoreError
from diffscore.io import MAX_USER_FILE_BYTES, open_user_file

STAMP = ".diffscore-shard.json"  # in an extracted folder: size, mtime and hash of the shard it came from


def check_member(member: tarfile.TarInfo, dest: Path, shard: Path) -> None:
    """Raise DiffscoreError unless ``member`` is a plain file or folder whose path stays inside ``dest``."""
    name = member.name
    where = f"shard {shard}: member {name!r}"
    if member.isfile() and member.size > MAX_USER_FILE_BYTES:
        raise DiffscoreError(f"{where} declares {member.size:,} bytes, more than a page may hold; refusing the shard")
    if not (member.isfile() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise DiffscoreError(f"{where} is a {kind}; only files and folders are extracted. Refusing the shard")
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise DiffscoreError(f"{where} has an absolute path; refusing the shard")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise DiffscoreError(f"{where} escapes the destination ('..'); refusing the shard")
    target = (dest / name).resolve()
    if target != dest.resolve() and dest.resolve() not in target.parents:
        raise DiffscoreError(f"{where} resolves outside {dest}; refusing the shard")


def shard_stamp(shard: Path) -> dict[str, Any]:
    """What tells that a shard changed: its size, mtime and the SHA-256 of its first and last MiB."""
    digest = hashlib.sha256()
    with open_user_file(shard, f"shard {shard}", max_bytes=None) as f:  # a regular file: a FIFO cannot hang it
        st = os.fstat(f.fileno())
        digest.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(st.st_size - (1 << 20))
        digest.update(f.read(1 << 20))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": digest.hexdigest()}


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _install(tmp: Path, dest: Path, stamp: dict[str, Any]) -> None:
    """Rename the complete extraction ``tmp`` onto ``dest``, swapping out (and deleting) a stale one; another
    process (a DDP rank) that installed the same shard's extraction first wins."""
    for _ in range(10):
        try:
            os.replace(tmp, dest)
            return
        except OSError:
            if not dest.is_dir():
                if dest.exists() or dest.is_symlink():
                    raise
                continue  # moved away by another process meanwhile: try again
        if _read_stamp(dest) == stamp:
            return
        old = dest.with_name(f".{dest.name}.old{os.getpid()}")
        try:
            os.replace(dest, old)
        except FileNotFoundError:
            continue
        shutil.rmtree(old, ignore_errors=True)
    raise OSError(f"{dest} kept changing while it was being replaced")


def extract_shard(shard: str | Path, dest: str | Path, extract: bool = True) -> Path:
    """Extract a tar shard into ``dest`` after checking every member (``check_member``); done once per version
    of the shard (``STAMP``).

    Written to a temporary sibling and renamed when complete, so an interrupted extraction is redone, never
    half-used; a stale ``dest`` (its shard changed) is replaced whole. Returns ``dest``. With ``extract`` False
    (data rebuilt from a checkpoint) a shard not yet extracted is an error instead of a write.
    """
    shard, dest = Path(shard), Path(dest)
    try:
        stamp = shard_stamp(shard)
    except OSError as e:
        raise DiffscoreError(f"shard {shard} cannot be read ({e})") from None
    if dest.is_dir() and _read_stamp(dest) == stamp:
        return dest
    if not extract:
        raise DiffscoreError(
            f"{shard} would be extracted into {dest}: data named by a checkpoint write nothing; pass "
            "--trust_checkpoint true to allow it (or train/validate once with your own config)"
        )
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with open_user_file(shard, f"shard {shard}", max_bytes=None) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            members = tar.getmembers()
            for m in members:
                check_member(m, tmp, shard)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.12 (and backports): a second, independent guard
                tar.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; every member was checked above
                tar.extractall(tmp, members=members)
        (tmp / STAMP).write_text(json.dumps(stamp))
        _install(tmp, dest, stamp)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DiffscoreError(f"shard {shard} is not a readable tar archive ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
