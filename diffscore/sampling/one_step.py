"""Sampling a one-step generator x = D_G(sigma_init z; sigma_init) (DisBack, Diff-Instruct): NFE = 1."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffscore.core.distill import one_step_generate
from diffscore.core.precond import Preconditioning
from diffscore.errors import DiffscoreError
from diffscore.sampling.base import Sampler
from diffscore.sampling.options import SamplingOptions


class OneStepSampler(Sampler):
    """Samples of a one-step generator ``generator`` (a preconditioned network) fed sigma_init z, z drawn per seed
    as a diffusion sampler draws its noise (so a teacher and its student see the same z for a seed)."""

    one_step = True
    name, steps = "one-step", 1

    def __init__(
        self,
        generator: Preconditioning,
        sigma_init: float,
        options: SamplingOptions | None = None,
        *,
        prompts: Sequence[str] | None = None,
        guide: Preconditioning | None = None,
    ) -> None:
        options = options or SamplingOptions()
        super().__init__(nn.ModuleDict({"generator": generator}), generator.backbone, options, prompts)
        chosen = options.steps not in (None, 1) or options.sampler is not None or options.sampler_kwargs
        guided = options.guidance != 1.0 or options.guide is not None or guide is not None
        if chosen or options.teleport.wanted or guided or options.guidance_interval is not None:
            raise DiffscoreError(
                "this model is a one-step generator (NFE = 1): leave out --steps, --sampler, --sampler_kwargs, "
                "--teleport, --guidance, --guide and --guidance_interval"
            )
        self.generator, self.sigma_init = generator, float(sigma_init)

    @property
    def nfe(self) -> int:
        return 1

    @torch.no_grad()
    def generate(self, seeds: Sequence[int]) -> Tensor:
        """x = G(z) [len(seeds), *data_shape]."""
        _, z, cond = self.start(seeds)
        with self.evaluating():
            return one_step_generate(self.generator, z, self.sigma_init, cond)
