"""What every sampler of a model shares (a diffusion model's, diffscore.sampling.diffusion, and a one-step
generator's, diffscore.sampling.one_step): the facts of its backbone, the per-seed start (noise, then condition),
the checks of the condition options, and running its networks in eval mode."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from diffscore.errors import DiffscoreError
from diffscore.networks.backbone import BackboneFacts
from diffscore.sampling.options import SamplingOptions
from diffscore.sampling.seeds import seed_generators, seeded_condition, seeded_noise
from diffscore.sampling.speed import Speed


class Sampler(BackboneFacts):
    """Draws samples x0 [len(seeds), *data_shape] from seeds; sample s is a function of seed s only.

    ``networks`` holds every network the sampler runs (a caller moves it to a device); ``backbone`` is the main
    network's backbone, whose facts (data_shape, label_dim, text_encoder) the sampler reports. A latent model's
    sampler also holds a ``decoder`` (``with_decoder``: e.g. Stable Diffusion's VAE): ``generate`` gives the
    model's own samples (latents), ``images`` and ``draw`` decode them.
    """

    one_step: bool = False
    name: str  # the sampler's name, for summaries ("heun", "one-step", ...)
    steps: int  # its steps (1 for a one-step generator)

    def __init__(
        self, networks: nn.ModuleDict, backbone: nn.Module, options: SamplingOptions, prompts: Sequence[str] | None
    ) -> None:
        self.networks, self.backbone, self.options = networks, backbone, options
        if prompts is None and options.prompt is not None:
            prompts = [options.prompt]
        self.prompts = None if prompts is None else list(prompts)
        if self.prompts is not None and not self.text_conditioned:
            raise DiffscoreError("--prompt/--prompts need a text-conditioned model (a backbone with a text encoder)")
        if self.prompts is not None and not self.prompts:
            raise DiffscoreError("--prompts gave no captions")
        label = options.class_label
        if label is not None and not 0 <= label < self.label_dim:
            raise DiffscoreError(f"--class_label {label} is out of range for a model with {self.label_dim} classes")

    @property
    def device(self) -> torch.device:
        for tensor in (*self.networks.parameters(), *self.networks.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        raise NotImplementedError

    def speed(self) -> Speed:
        """The GPU speed switches this run uses (none by default)."""
        return Speed()

    def with_decoder(self, decoder: nn.Module | None) -> Sampler:
        """This sampler, its samples decoded by ``decoder`` (latents [B, *data_shape] -> images [B, C, H, W] in
        [-1, 1]), which joins ``networks`` (so it moves to the device with them); None: nothing to decode."""
        if decoder is not None:
            self.networks["decoder"] = decoder
        return self

    @property
    def decoder(self) -> nn.Module | None:
        return self.networks["decoder"] if "decoder" in self.networks else None

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """The unit initial draws [B, *data_shape] of ``start`` (each seed's first draw), on the sampler's device:
        what a sampler elsewhere needs to start from the same point (before any scaling by sigma_max)."""
        return seeded_noise(seed_generators(seeds, self.device), self.data_shape, self.device)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """The images of samples ``x`` (``x`` itself when the sampler has no decoder)."""
        if self.decoder is None:
            return x
        with self.evaluating():
            return self.decoder(x)

    def images(self, seeds: Sequence[int]) -> Tensor:
        """The samples of ``seeds`` in data space: decoded when the model is a latent one."""
        return self.decode(self.generate(seeds))

    def draw(self, seeds: Sequence[int]) -> dict[str, Tensor]:
        """What a command keeps of ``seeds``: "samples" (in data space, decoded), "noise" (the unit initial draws),
        and "latents" (the model's own samples) when the sampler decodes."""
        x = self.generate(seeds)
        out = {"samples": self.decode(x), "noise": self.initial_noise(seeds)}
        if self.decoder is not None:
            out["latents"] = x
        return out

    def start(self, seeds: Sequence[int]) -> tuple[list[torch.Generator], Tensor, Tensor | list[str] | None]:
        """(per-seed generators, unit noise [B, *data_shape], condition), drawn in generate.py's order."""
        generators = seed_generators(seeds, self.device)
        noise = seeded_noise(generators, self.data_shape, self.device)
        cond = seeded_condition(seeds, generators, self.label_dim, self.options.class_label, self.prompts)
        return generators, noise, cond

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """The networks in eval mode, their mode restored afterwards."""
        was_training = self.networks.training
        self.networks.eval()
        try:
            yield
        finally:
            self.networks.train(was_training)

    def generate(self, seeds: Sequence[int]) -> Tensor:
        raise NotImplementedError


def ticking(denoiser: Callable[..., Tensor], bar) -> Callable[..., Tensor]:
    """``denoiser`` that advances ``bar`` by one after each call (host-side only: no device sync)."""

    def counted(*args, **kwargs):
        out = denoiser(*args, **kwargs)
        bar.update()
        return out

    return counted
