"""Writing files that a crash never leaves half-written, reading user files within bounds (regular files only, a
size cap before and while reading), the finite-weights check, and the plotting backend (no screen here)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from diffscore.errors import DiffscoreError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_write(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (``.<name>.tmp<pid>``, a fresh folder if ``directory``) to write;
    on leaving the block without an error it is renamed onto ``path``, on an error (or Ctrl-C) it is removed and
    ``path`` is untouched. A folder already at ``path`` is replaced only after the new one is complete; callers
    decide beforehand whether replacing it is allowed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    if directory:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if directory and path.is_dir():  # os.replace cannot replace a non-empty folder: swap, then delete
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: plotting is optional work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: str | Path, data: object) -> None:
    """``data`` as indented JSON at ``path`` (parents created), atomically."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=float))


def check_memory(nbytes: float, what: str, hint: str) -> None:
    """Refuse, in one line, to build something of ``nbytes`` that cannot fit in the memory available now."""
    from diffscore.errors import DiffscoreError

    if not hasattr(os, "sysconf"):
        return
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > free:
        raise DiffscoreError(f"{what} needs about {nbytes / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free; {hint}")


# ---------------------------------------------------------------------------------------------------------------
# Reading files handed to diffscore: regular files only, and never more bytes than a cap.

MAX_USER_FILE_BYTES = 512 << 20  # an image, dataset.json or statistics file: 2x an uncompressed PNG at PIL's pixel cap
_CHUNK = 1 << 20  # bytes asked of a stream at a time


def _describe_mode(mode: int) -> str:
    import stat

    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    )
    return next((text for test, text in kinds if test(mode)), "not a regular file")


class BoundedReader:
    """A read-only binary stream over a user file or a ZIP member that raises DiffscoreError (naming ``where``)
    once more than ``max_bytes`` would be read, and turns the stream's own read errors into one line as well.
    Seekable when the stream is (PIL and numpy seek), usable as a context manager."""

    def __init__(self, stream, where: str, max_bytes: int | None) -> None:
        self._stream, self.where, self.max_bytes = stream, where, max_bytes

    def _room(self, size: int | None) -> int | None:
        """``size`` (None: all) limited to one byte past the cap."""
        want = None if size is None or size < 0 else size
        if self.max_bytes is None:
            return want
        room = self.max_bytes + 1 - self.tell()
        return room if want is None else min(want, room)

    def _check_cap(self) -> None:
        if self.max_bytes is not None and self.tell() > self.max_bytes:
            raise DiffscoreError(
                f"{self.where} holds more than {self.max_bytes:,} bytes, the most diffscore reads from such a file; "
                "remove it or shrink it"
            )

    def _guarded(self, read, *args) -> bytes:
        try:
            return read(*args)
        except DiffscoreError:
            raise
        except Exception as e:  # noqa: BLE001 - zipfile/zlib/OS errors of a damaged file
            raise DiffscoreError(f"{self.where} cannot be read ({type(e).__name__}: {e})") from None

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all when negative), asked of the stream a MiB at a time: a ZIP member inflates
        only what is asked for, so a member that inflates past its declared size costs at most a MiB."""
        want, chunks, got = self._room(size), [], 0
        while want is None or got < want:
            data = self._guarded(self._stream.read, _CHUNK if want is None else min(_CHUNK, want - got))
            if not data:
                break
            chunks.append(data)
            got += len(data)
        self._check_cap()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def readline(self, size: int = -1) -> bytes:
        """One line (pickle's protocol 0 reads lines), within the cap like read."""
        want = self._room(size)
        data = self._guarded(self._stream.readline, -1 if want is None else want)
        self._check_cap()
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._stream.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def fileno(self) -> int:
        return self._stream.fileno()

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> BoundedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_user_file(path: str | Path, where: str | None = None, max_bytes: int | None = MAX_USER_FILE_BYTES):
    """``path`` opened for reading as a :class:`BoundedReader`, if it is a regular file (a link to one is fine) of
    at most ``max_bytes`` bytes (None: any size). A FIFO, device, socket or folder is refused before anything
    is read: the file is opened non-blocking (a FIFO cannot hang the open) and judged by fstat of what was
    opened, so it cannot be swapped between the check and the read."""
    where = where or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DiffscoreError(f"{where} cannot be opened ({e.strerror or e})") from None
    try:
        import fcntl
        import stat

        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DiffscoreError(f"{where} is {_describe_mode(st.st_mode)}, not a regular file; remove it")
        if max_bytes is not None and st.st_size > max_bytes:
            raise DiffscoreError(
                f"{where} is {st.st_size:,} bytes, more than the {max_bytes:,} diffscore reads from such a file; "
                "remove it or shrink it"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        stream = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return BoundedReader(stream, where, max_bytes)


def open_zip_member(zf, name: str, where: str | None = None, max_bytes: int | None = MAX_USER_FILE_BYTES):
    """Member ``name`` of the open ZipFile ``zf`` as a :class:`BoundedReader`: its declared inflated size is
    checked before anything is inflated, and the cap again while reading (zipfile itself stops at the declared
    size and then checks the CRC, so a member that inflates past it is refused as damaged)."""
    where = where or name
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise FileNotFoundError(where) from None
    if not info.is_dir() and max_bytes is not None and info.file_size > max_bytes:
        raise DiffscoreError(
            f"{where} declares {info.file_size:,} bytes, more than the {max_bytes:,} diffscore reads from such a "
            "file; remove it from the ZIP or shrink it"
        )
    try:
        stream = zf.open(info, "r")
    except Exception as e:  # noqa: BLE001 - a damaged local header, an unsupported compression
        raise DiffscoreError(f"{where} cannot be read ({type(e).__name__}: {e})") from None
    return BoundedReader(stream, where, max_bytes)


def read_user_file(path: str | Path, where: str | None = None, max_bytes: int | None = MAX_USER_FILE_BYTES) -> bytes:
    """All bytes of the regular file ``path`` (see open_user_file), at most ``max_bytes``."""
    with open_user_file(path, where, max_bytes) as f:
        return f.read()


def read_zip_member(zf, name: str, where: str | None = None, max_bytes: int | None = MAX_USER_FILE_BYTES) -> bytes:
    """All bytes of ZIP member ``name`` (see open_zip_member), at most ``max_bytes``."""
    with open_zip_member(zf, name, where, max_bytes) as f:
        return f.read()


def check_finite_weights(state: Mapping[str, object], path: str | Path) -> None:
    """Raise one DiffscoreError line naming ``path`` and the first tensor of ``state`` (a state dict: name ->
    tensor; other values are skipped) that holds a NaN or an infinity. Pure: reads nothing, changes nothing.

    Weights that are not finite give NaN samples, images and metrics with exit 0, so every reader of weights
    (checkpoints, EDM pickles, post-hoc EMA snapshots, Inception weights) calls this before using them."""
    import torch

    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        finite = torch.isfinite(value.detach())
        if not bool(finite.all()):
            bad, total = int((~finite).sum()), value.numel()
            raise DiffscoreError(
                f"{path}: weight {name} holds {bad:,} non-finite value{'s' if bad != 1 else ''} (NaN/Inf) of "
                f"{total:,}; the file is damaged or comes from a diverged run: use an earlier checkpoint"
            )
