"""The grouped settings of a DiffusionModule that are not maths: what a non-finite loss does, and the GPU speed
switches of training. (Its sampler settings are diffscore.sampling.SamplerDefaults, its preconditioning
diffscore.core.precond.PrecondSpec.) Each is one object in a config: ``nonfinite: {policy: skip}``."""

from __future__ import annotations

from dataclasses import dataclass

from diffscore.errors import DiffscoreError


@dataclass(frozen=True)
class NonFinitePolicy:
    """What a non-finite training loss does.

    Args:
        policy: "stop" the run before any bad weights are saved, or "skip" the step (one host sync per step).
        check_every: "stop": check the loss every N steps (N > 1: no per-step device sync).
        max_bad_steps: "skip": stop after this many consecutive skipped steps.
    """

    policy: str = "stop"
    check_every: int = 1
    max_bad_steps: int = 10

    def __post_init__(self) -> None:
        if self.policy not in ("stop", "skip"):
            raise DiffscoreError(f"model.nonfinite.policy must be 'stop' or 'skip', got {self.policy!r}")
        if self.check_every < 0 or self.max_bad_steps < 1:
            raise DiffscoreError("model.nonfinite: need check_every >= 0 and max_bad_steps >= 1")


@dataclass(frozen=True)
class TrainingSpeed:
    """GPU speed switches of training; a checkpoint samples the same way on a GPU unless told otherwise.

    Args:
        compile: torch.compile the denoiser for training and validation on CUDA (GPU configs: on).
        channels_last: channels-last memory for the backbone and the images (GPU configs: on).
        fused_norm: on CUDA, channels-last: group norm (+ shift, SiLU) as diffscore's Triton kernels (experimental).
    """

    compile: bool = False
    channels_last: bool = False
    fused_norm: bool = False
