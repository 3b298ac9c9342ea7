"""The one error boundary of the `diffscore` command: every failure becomes one line on stderr and a non-zero exit
(``DIFFSCORE_DEBUG=1`` shows the traceback instead), and a stop signal leaves nothing half-written.

Expected failures name what to do: bad input (DiffscoreError), a missing file, a full disk or an unwritable output
(also when torch.save reports it as a RuntimeError), input nested too deeply (RecursionError), memory. Anything
else is a bug, reported in one line that says how to get the traceback. SIGTERM in a command that writes files
raises an exception, so its temporary files are removed on the way out (sample and evaluate stop after the batch in
flight instead, and fit saves a checkpoint: Lightning handles SIGTERM there).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffscore.errors import DiffscoreError, Stopped

WRITE_FAILED = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")  # torch.save's disk errors


def one_line(e: BaseException) -> str:
    """The message of an error, in one line that says what to do."""
    if isinstance(e, DiffscoreError):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return f"file not found: {e.filename or e}; check the path"
    if isinstance(e, MisconfigurationException):  # Lightning's word for a bad trainer/callback setting
        return f"{str(e).strip().splitlines()[0]}  (check the trainer options of the config)"
    if isinstance(e, ModuleNotFoundError):  # an option that needs a package this install lacks (accelerator=tpu)
        first = str(e).strip().splitlines()[0] if str(e).strip() else f"no module named {e.name}"
        return f"{first}; install it, or choose an option that does not need it"
    if isinstance(e, OSError):
        where = e.filename or "the output"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on the device writing {where}; free space and run again"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write {where} ({e.strerror}); choose a writable place"
        return f"{e.strerror or type(e).__name__}: {where}"
    if isinstance(e, RuntimeError) and any(s in str(e) for s in WRITE_FAILED):
        return "a file could not be written (the disk is full or the place is not writable); free space and run again"
    if isinstance(e, RecursionError):
        return (
            "the input is nested too deeply to read (a self-referencing record or deeply nested data); check the file"
        )
    if isinstance(e, MemoryError):
        return "out of memory: lower --batch_size or --num_samples, or read fewer images"
    text = " ".join(str(e).split())[:300]
    return f"internal error: {type(e).__name__}: {text} (DIFFSCORE_DEBUG=1 shows the traceback; please report it)"


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While a file-writing command runs, SIGTERM raises Stopped (exit 143) instead of killing the process, so
    ``finally`` blocks remove the temporary files (the handler before is restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        raise Stopped("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(message: str) -> None:
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original one-line message
        message = message.strip().splitlines()[-1].split("DiffscoreError: ", 1)[-1]
    print(f"diffscore: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def guarded(run: Callable[[], Any]) -> None:
    """Run a command inside the boundary."""
    try:
        run()
    except Stopped as e:
        print(f"diffscore: stopped by {e.signal_name}; nothing was written (its temporary files are removed)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(e.code) from None
    except KeyboardInterrupt:
        print("diffscore: interrupted; nothing half-written is left", file=sys.stderr)
        raise SystemExit(130) from None
    except SIGTERMException:
        print("diffscore: stopped by SIGTERM (a checkpoint was saved if the config has PreemptionCheckpoint)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(143) from None
    except SystemExit:
        raise
    except Exception as e:
        if os.environ.get("DIFFSCORE_DEBUG"):
            raise
        fail(one_line(e))
