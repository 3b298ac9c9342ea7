"""Reading a torch file (a diffscore checkpoint, a snapshot) safely and once.

The file is opened once; its first bytes say whether it is a file torch.save writes, and the same handle is read
with ``weights_only=True`` (tensors and plain containers). A file that needs full unpickling, which can run code,
is refused unless the user trusts it, and the refusal names the global the file asked for.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from diffscore.errors import DiffscoreError


def _kind(f: BinaryIO) -> str:
    """ "zip" (torch >= 1.6), "legacy" (a pickle of protocol 2-5) or "other", from an open file's bytes."""
    head = f.read(2)
    kind = "other"
    if head == b"PK":
        kind = "zip" if zipfile.is_zipfile(f) else "broken-zip"
    elif len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        kind = "legacy"
    f.seek(0)
    return kind


def _unsafe_global(error: Exception) -> str | None:
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(error))  # torch <2.7, >=2.7
    return found.group(1) if found else None


def read_torch_file(path: str | Path, trust: bool = False, what: str = "checkpoint") -> Any:
    """The object a torch.save file holds, read from one open of the file: weights_only, or fully unpickled when
    ``trust`` and the file holds objects beyond tensors and plain data. Every failure is one DiffscoreError line."""
    path = Path(path)
    if not path.is_file():
        raise DiffscoreError(f"{what} {path} does not exist (or is not a file); check the path")
    unreadable = f"{path} is not a readable {what}"
    with open(path, "rb") as f:
        kind = _kind(f)
        if kind == "broken-zip":
            raise DiffscoreError(f"{path} is a damaged or truncated {what} (an incomplete copy or write?)")
        if kind == "other":
            raise DiffscoreError(f"{path} is not a {what} (not a file torch.save writes)")
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            name = _unsafe_global(e)
            if name is None:  # damaged, not merely holding objects
                raise DiffscoreError(f"{unreadable} (damaged: {str(e).splitlines()[-1][:120]})") from None
            if not trust:
                raise DiffscoreError(
                    f"{path} asks to import {name}, beyond tensors and plain data; loading it could run code. "
                    "If you trust the file, pass --trust_checkpoint true"
                ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise DiffscoreError(f"{unreadable} ({type(e).__name__}: {str(e)[:120]})") from None
        f.seek(0)
        try:
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # a trusted file may still be damaged
            raise DiffscoreError(f"{unreadable} ({type(e).__name__}: {str(e)[:120]})") from None
