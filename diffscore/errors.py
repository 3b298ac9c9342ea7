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


class Stopped(SystemExit):
    """A command stopped, between two batches, because the user asked: Ctrl-C (exit 130) or SIGTERM (exit 143)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(130 if signal_name == "Ctrl-C" else 143)
        self.signal_name = signal_name
