"""Reading the constructor kwargs of an NVlabs/edm network class (SongUNet, DhariwalUNet) from an inert record:
EDM's defaults filled in, every value checked as it is read, one DiffscoreError line naming the class, the option
and the value otherwise; and the check that a mapped network's group norms are EDM's (min(32, C // 4) groups)."""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn

from diffscore.errors import DiffscoreError


class EDMOptions:
    """The kwargs EDM built ``class_name`` with: unknown and missing ones refused, defaults filled in."""

    def __init__(self, class_name: str, init_kwargs: dict, required: tuple[str, ...], defaults: dict) -> None:
        unknown = [k for k in init_kwargs if k not in required and k not in defaults]
        if unknown:
            key = unknown[0]
            raise DiffscoreError(f"{class_name} option {key}={init_kwargs[key]!r} is not one of EDM's {class_name}'s")
        missing = [k for k in required if k not in init_kwargs]
        if missing:
            raise DiffscoreError(f"{class_name} kwargs lack {missing[0]!r}, which EDM's constructor requires")
        self.class_name, self.kw = class_name, {**defaults, **init_kwargs}

    def fail(self, name: str, expected: str) -> DiffscoreError:
        return DiffscoreError(f"{self.class_name} {name}={self.kw[name]!r}: {expected}")

    def int(self, name: str, minimum: int) -> int:
        value = self.kw[name]
        if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
            raise self.fail(name, f"expected an integer >= {minimum}")
        return int(value)

    def int_list(self, name: str, minimum: int, min_length: int) -> list[int]:
        value = self.kw[name]
        ok = isinstance(value, list | tuple) and len(value) >= min_length
        if not ok or any(isinstance(v, bool) or not isinstance(v, Integral) or v < minimum for v in value):
            raise self.fail(name, f"expected a list of >= {min_length} integers >= {minimum}")
        return [int(v) for v in value]

    def probability(self, name: str) -> float:
        value = self.kw[name]
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
            raise self.fail(name, "expected a probability in [0, 1]")
        return float(value)

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        if self.kw[name] not in choices:
            raise self.fail(name, f"diffscore has no equivalent (it has {choices})")
        return self.kw[name]

    def unet_kwargs(self, model_channels: int, channel_mult: list[int]) -> dict[str, Any]:
        """The arguments SongUNet and DhariwalUNet share, in diffscore's names (UNet's and ADMUNet's)."""
        resolution, in_channels = self.int("img_resolution", 1), self.int("in_channels", 1)
        return dict(
            data_shape=[in_channels, resolution, resolution],
            label_dim=self.int("label_dim", 0),
            augment_dim=self.int("augment_dim", 0),
            model_channels=model_channels,
            channel_mult=channel_mult,
            channel_mult_emb=self.int("channel_mult_emb", 1),
            num_blocks=self.int("num_blocks", 0),
            attn_resolutions=self.int_list("attn_resolutions", 1, 0),
            dropout=self.probability("dropout"),
            label_dropout=self.probability("label_dropout"),
        )


def meta_network(class_name: str, build: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    """``build(**kwargs)`` without storage (meta device), checked to normalise as EDM does: its parameter names and
    shapes, cheaply. EDM's GroupNorm uses min(32, C // 4) groups and cannot run where that does not divide C;
    diffscore's group_norm would pick another count, so such a network is refused, not imported as another one."""
    try:
        with torch.device("meta"):
            net = build(**kwargs)
    except ValueError as err:
        raise DiffscoreError(f"{class_name} kwargs give no diffscore network: {err}") from err
    for name, module in net.named_modules():
        if isinstance(module, nn.GroupNorm) and module.num_groups != min(32, module.num_channels // 4):
            raise DiffscoreError(
                f"{class_name} {name} normalises {module.num_channels} channels, which EDM's GroupNorm "
                "(min(32, C // 4) groups) cannot split; such a net does not run in EDM"
            )
    return net
