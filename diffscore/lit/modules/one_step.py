"""Sampling from a one-step generator x = G(z) (DisBack, Diff-Instruct): the Sampleable side of a distilled model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from diffscore.core.distill import one_step_generate
from diffscore.core.precond import EDMPrecond
from diffscore.errors import DiffscoreError
from diffscore.lit.sampling import (
    BackboneFacts,
    SamplingOptions,
    check_condition,
    condition,
    seed_generators,
    seeded_noise,
)


class OneStepSampling(BackboneFacts):
    """diffscore.lit.sampling.Sampleable for a module holding ``self.generator`` (an EDMPrecond) and
    ``self.sigma_init``: x = D_G(sigma_init z; sigma_init), z drawn per seed, NFE = 1."""

    one_step = True
    generator: EDMPrecond
    sigma_init: float

    @property
    def backbone(self) -> nn.Module:
        return self.generator.backbone

    def check(self, options: SamplingOptions) -> None:
        """A one-step generator has no sampler, steps, teleportation or guidance to choose."""
        chosen = options.num_steps not in (None, 1) or options.sampler not in (None, "one-step")
        if chosen or options.sampler_kwargs or options.teleport_skip or options.guidance != 1.0:
            raise DiffscoreError(
                "this checkpoint is a one-step generator (NFE = 1): leave out --steps, --sampler, --sampler_kwargs, "
                "--teleport and --guidance"
            )
        check_condition(self, options)

    def nfe(self, options: SamplingOptions | None = None) -> int:
        return 1

    @torch.no_grad()
    def generate(self, seeds: Sequence[int], options: SamplingOptions | None = None) -> Tensor:
        """x = G(z) [len(seeds), *data_shape]; z and the label drawn per seed as DiffusionModule.generate draws
        its noise and label, so a teacher and its student see the same z for a seed."""
        options = options or SamplingOptions()
        self.check(options)
        generators = seed_generators(seeds, self.device)
        z = seeded_noise(generators, self.data_shape, self.device)
        cond = condition(self, seeds, options, generators)
        was_training = self.generator.training
        self.generator.eval()
        try:
            return one_step_generate(self.generator, z, self.sigma_init, cond)
        finally:
            self.generator.train(was_training)


class OneStepGenerator(OneStepSampling, LightningModule):
    """A trained one-step generator, as read back from a DisBackModule checkpoint for sampling/evaluation."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, sigma_init: float = 1.0) -> None:
        super().__init__()
        self.generator = EDMPrecond(backbone, sigma_data)
        self.sigma_init = sigma_init
        self.hparams.update(num_steps=1, sampler="one-step", sigma_init=sigma_init)
