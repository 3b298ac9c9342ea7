"""What every diffscore backbone F(x_in, c_noise, cond, aug_label) declares, and the record of how it was built.

A backbone states its data shape, class count, augmentation-label size and text encoder as attributes (callers
read them directly, never probe with getattr), and keeps ``init_kwargs``: the arguments its constructor was called
with, defaults filled in. A checkpoint stores ``config(backbone)`` (a class name and plain data, the idea of
NVlabs/edm's persistence without its pickled source), and diffscore.lit.checkpoint rebuilds the network from it
through an explicit list of allowed classes.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from typing import Any

from torch import nn


class Backbone(nn.Module):
    """Base class of the backbones; subclasses set ``data_shape`` (and the others if they have them)."""

    data_shape: tuple[int, ...]  # [C, H, W] or [D]
    label_dim: int = 0  # number of classes (0: unconditional)
    augment_dim: int = 0  # size of the augmentation label (0: none)
    text_encoder: nn.Module | None  # the caption encoder of a text-conditioned backbone (None: no text)
    init_kwargs: dict[str, Any]  # the constructor's arguments, defaults filled in (plain data copied)

    def __init__(self) -> None:
        super().__init__()
        # an instance attribute, not a class default: a class attribute would hide a registered submodule
        self.text_encoder = None

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
                # plain data is copied; objects (modules, tokenizers handed in) are kept by reference, not cloned
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


def config(backbone: Backbone) -> dict[str, Any] | None:
    """``{"class_path": ..., "init_args": ...}`` that rebuilds ``backbone`` (same architecture, fresh weights), or
    None when its arguments are not plain data (a backbone built in Python from other objects)."""
    cls = type(backbone)
    if not plain_data(backbone.init_kwargs):
        return None
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": copy.deepcopy(backbone.init_kwargs)}
