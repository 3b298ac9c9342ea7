"""Objects that remember how they were built: the idea of NVlabs/edm's persistence (a class name and its
constructor arguments) without its pickled source.

A subclass of ``Recorded`` keeps ``init_kwargs``, the arguments its most derived constructor was called with,
defaults filled in; ``config(obj)`` is then ``{"class_path": ..., "init_args": ...}``, which a checkpoint stores and
diffscore.loading.classes rebuilds through an explicit table of allowed classes.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from typing import Any


class Recorded:
    """Base class that records the constructor's arguments as ``init_kwargs``."""

    init_kwargs: dict[str, Any]  # the constructor's arguments, defaults filled in (plain data copied)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            if type(self).__init__ is recording_init:  # the most derived constructor records its own call
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                # plain data is copied; objects handed in (modules, tokenizers) are kept by reference, not cloned
                args = {k: v for k, v in bound.arguments.items() if k != "self"}
                self.init_kwargs = {k: copy.deepcopy(v) if plain_data(v) else v for k, v in args.items()}

        cls.__init__ = recording_init


def plain_data(value: Any) -> bool:
    """None, bool, int, finite float, str, or lists/tuples/dicts (str keys) of those: what a checkpoint's config
    may hold (it loads with weights_only=True and rebuilds nothing but numbers and names)."""
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_data(v) for k, v in value.items())
    return False


def config(obj: Recorded) -> dict[str, Any] | None:
    """``{"class_path": ..., "init_args": ...}`` that rebuilds ``obj`` (same settings, fresh state), or None when
    its arguments are not plain data (an object built in Python from other objects)."""
    cls = type(obj)
    if not plain_data(obj.init_kwargs):
        return None
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": copy.deepcopy(obj.init_kwargs)}
