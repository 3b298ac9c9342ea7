"""Per-seed randomness, as NVlabs/edm's generate.py draws it: seed s owns a generator that draws, in order, the
initial noise, the class label (if the model has classes and none is given) and then the sampler's churn noise, so
sample s is the same at any batch size and on any number of devices."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def seed_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per seed on ``device``, seeded as generate.py seeds them (seed mod 2^32)."""
    return [torch.Generator(device=device).manual_seed(int(s) % (1 << 32)) for s in seeds]


def seeded_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str) -> Tensor:
    """One N(0, I) draw of ``shape`` from each generator: [len(generators), *shape]."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])


def seeded_labels(generators: Sequence[torch.Generator], label_dim: int, device: torch.device | str) -> Tensor:
    """One class label in [0, label_dim) from each generator (after its noise, as generate.py draws it): [B]."""
    return torch.stack([torch.randint(label_dim, (), generator=g, device=device) for g in generators])


def seeded_condition(
    seeds: Sequence[int],
    generators: Sequence[torch.Generator],
    label_dim: int,
    class_label: int | None = None,
    prompts: Sequence[str] | None = None,
) -> Tensor | list[str] | None:
    """The condition of each sample: seed s's caption prompts[s % len(prompts)], the chosen class for all, one label
    drawn from each seed's generator (a class-conditional model), or None."""
    device = generators[0].device if generators else "cpu"
    if prompts is not None:
        return [prompts[int(s) % len(prompts)] for s in seeds]
    if class_label is not None:
        return torch.full((len(seeds),), class_label, dtype=torch.long, device=device)
    if label_dim > 0:
        return seeded_labels(generators, label_dim, device)
    return None
