"""The one exception type the CLI turns into a one-line message (problem + fix) and a non-zero exit."""

from __future__ import annotations


class DiffscoreError(RuntimeError):
    """A user-facing error: bad input, a missing file, a run that cannot go on. Its message says what to do.

    The most recent one is remembered in ``DiffscoreError.last``, because a config parser that instantiates
    classes (jsonargparse) re-wraps constructor errors in its own long message; the CLI reports this one.
    """

    last: DiffscoreError | None = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        DiffscoreError.last = self
