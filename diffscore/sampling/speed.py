"""The GPU speed switches of sampling: bf16 autocast, channels-last inputs and one torch.compile per denoiser and
setting. The network itself is never changed here (its memory format is its owner's choice: a training module
converts its backbone in setup, a loaded model when it is loaded)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# A compile pays for itself after about this many network evaluations on one device: on an H100/H200 the CIFAR-10
# DDPM++ compile costs ~30-45 s (~75 s on a fresh machine, ~30 s with inductor's cache; bench/RESULTS.md, issue 19)
# and saves ~4 ms per image per 35 evaluations over bf16 eager (283 img/s compiled; eager estimated ~150 img/s).
COMPILE_PAYS_AFTER = 400_000
CACHE_DIR = Path.home() / ".cache" / "diffscore" / "inductor"  # compiled kernels kept for the next run

# denoiser -> {(bf16, channels_last, compiled): the function}; dies with the denoiser
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[bool, bool, bool], Callable[..., Tensor]]]
_CACHE = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Speed:
    """How a denoiser runs while sampling (on CUDA; the CPU samples eager in fp32)."""

    bf16: bool = False  # bf16 autocast around the denoiser
    channels_last: bool = False  # channels-last inputs (the weights' layout is the owner's)
    compiled: bool = False  # torch.compile(dynamic=False); the last batch is padded so one shape compiles once

    @property
    def any(self) -> bool:
        return self.bf16 or self.channels_last or self.compiled


def fast_denoiser(denoiser: nn.Module, speed: Speed) -> Callable[..., Tensor]:
    """``denoiser`` under ``speed``, built once per (denoiser, setting): sigma is a tensor input, so a compiled
    function does not recompile per step."""
    if not speed.any:
        return denoiser
    key = (speed.bf16, speed.channels_last, speed.compiled)
    cache = _CACHE.setdefault(denoiser, {})
    if key not in cache:

        def forward(x: Tensor, sigma: Tensor, cond=None, aug_label=None) -> Tensor:
            if speed.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=speed.bf16):
                return denoiser(x, sigma, cond, aug_label)

        if speed.compiled:
            keep_compiled_kernels()
        cache[key] = torch.compile(forward, dynamic=False) if speed.compiled else forward
    return cache[key]


def worth_compiling(samples_per_device: int, nfe: int) -> bool:
    """Whether compiling the denoiser pays for itself on a run of this many samples per device (COMPILE_PAYS_AFTER
    evaluations); a shorter run samples eager."""
    return samples_per_device * nfe >= COMPILE_PAYS_AFTER


def keep_compiled_kernels() -> None:
    """inductor's caches in a folder a later run finds (~/.cache/diffscore/inductor, unless the user chose one):
    a second `diffscore sample` of the same model reuses the compiled graph instead of compiling again."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
