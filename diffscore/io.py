"""Writing files that a crash never leaves half-written, and the plotting backend (no screen on these machines)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType


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
