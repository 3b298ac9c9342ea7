"""One way to draw samples from any model diffscore trains (a diffusion model's sampler or a one-step generator).

``Sampleable`` is what `diffscore sample` / `evaluate`, the sample-grid and sample-quality callbacks and DisBack ask
of a model; ``SamplingOptions`` is everything they can choose, passed in (never set as attributes on the model).
Randomness is per seed, as in NVlabs/edm's generate.py: seed s owns a generator that draws, in order, the initial
noise, the class label (if the model has classes and none is given) and then the sampler's churn noise, so sample s
is the same at any batch size and on any number of devices. `predict_over_seeds` runs a model over seeds on all
devices (rank r takes seeds r, r + world, ...; no padding, no duplicates) and gathers the results in seed order.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from diffscore.errors import DiffscoreError, Stopped
from diffscore.lit.data.seeds import SeedDataModule


@dataclass
class SamplingOptions:
    """What a caller may choose when drawing samples; None means "the model's own setting"."""

    num_steps: int | None = None  # sampler steps (Heun 18 -> 35 evaluations)
    sampler: str | None = None  # sampler name (diffscore.core.samplers.SAMPLERS)
    sampler_kwargs: dict[str, Any] | None = None  # extra sampler options (Heun: s_churn, s_min, s_max, s_noise)
    class_label: int | None = None  # one class for every sample (None: a label drawn from each seed)
    prompts: list[str] | None = None  # captions of a text model: seed s gets prompts[s % len(prompts)]
    guidance: float = 1.0  # classifier-free guidance scale (1: the conditional model as trained)
    teleport_skip: int = 0  # replace this many leading steps by the Gaussian's closed-form flow
    teleport_gaussian: Any = None  # the GaussianDenoiser of the training data that teleportation uses
    progress: bool = False  # a bar over the network evaluations of each batch (on rank 0)
    precision: str | None = None  # on CUDA: "bf16" (autocast) or "32" (None: as the model trained)
    compile: bool | None = None  # on CUDA: torch.compile the denoiser (None: as the model trained)
    channels_last: bool | None = None  # on CUDA: channels-last memory (None: as the model trained)


@runtime_checkable
class Sampleable(Protocol):
    """A model that draws samples x0 [len(seeds), *data_shape] from seeds."""

    one_step: bool  # a one-step generator (NFE 1; no sampler, steps or teleportation to choose)

    @property
    def data_shape(self) -> tuple[int, ...]: ...

    @property
    def label_dim(self) -> int: ...

    @property
    def text_conditioned(self) -> bool: ...

    def generate(self, seeds: Sequence[int], options: SamplingOptions | None = None) -> Tensor: ...

    def nfe(self, options: SamplingOptions | None = None) -> int: ...


class BackboneFacts:
    """The Sampleable properties a model reads off its backbone (``self.backbone``, a diffscore Backbone)."""

    backbone: Any

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The backbone's data_shape: [C, H, W] for a U-Net, [D] for an MLP."""
        return tuple(self.backbone.data_shape)

    @property
    def label_dim(self) -> int:
        return self.backbone.label_dim

    @property
    def text_conditioned(self) -> bool:
        return self.backbone.text_encoder is not None

    @property
    def conditional(self) -> bool:
        """Conditioned on class labels (label_dim > 0) or on captions (a backbone with a text encoder)."""
        return self.label_dim > 0 or self.text_conditioned


def seed_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per seed on ``device``, seeded as generate.py seeds them (seed mod 2^32)."""
    return [torch.Generator(device=device).manual_seed(int(s) % (1 << 32)) for s in seeds]


def seeded_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str) -> Tensor:
    """One N(0, I) draw of ``shape`` from each generator: [len(generators), *shape]."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])


def seeded_labels(generators: Sequence[torch.Generator], label_dim: int, device: torch.device | str) -> Tensor:
    """One class label in [0, label_dim) from each generator (after its noise, as generate.py draws it): [B]."""
    return torch.stack([torch.randint(label_dim, (), generator=g, device=device) for g in generators])


def check_condition(model: Sampleable, options: SamplingOptions) -> None:
    """Raise DiffscoreError, naming the option, for a class or captions the model cannot be conditioned on."""
    if options.prompts is not None and not model.text_conditioned:
        raise DiffscoreError("--prompt/--prompts need a text-conditioned checkpoint (a backbone with text_dim > 0)")
    if options.class_label is not None and not 0 <= options.class_label < model.label_dim:
        raise DiffscoreError(
            f"--class_label {options.class_label} is out of range for a model with {model.label_dim} classes"
        )


def condition(
    model: Sampleable, seeds: Sequence[int], options: SamplingOptions, generators: Sequence[torch.Generator]
) -> Tensor | list[str] | None:
    """The condition of each sample (options checked by ``check_condition``): the chosen class, one label per
    seed, the seeds' captions, or None."""
    device = generators[0].device if generators else "cpu"
    if options.prompts is not None:
        return [options.prompts[int(s) % len(options.prompts)] for s in seeds]
    if options.class_label is not None:
        return torch.full((len(seeds),), options.class_label, dtype=torch.long, device=device)
    if model.label_dim > 0:
        return seeded_labels(generators, model.label_dim, device)
    return None


class SeedSampler(LightningModule):
    """Trainer.predict over integer seeds: each batch of seeds [B] -> {"seeds": [B], "samples": [B, ...]}.

    On a GPU a batch smaller than the first (the last one) is padded with throwaway seeds to the first's size, so a
    compiled denoiser sees one shape and compiles once; the padding's samples are dropped."""

    def __init__(self, model: Sampleable, options: SamplingOptions | None = None) -> None:
        super().__init__()
        self.model = model
        self.options = options or SamplingOptions()
        self._full = 0  # the largest batch seen

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        seeds = batch.tolist()
        self._full = max(self._full, len(seeds))
        pad = self._full - len(seeds) if self.device.type == "cuda" else 0
        padded = seeds + [max(seeds) + 1 + i for i in range(pad)]
        options = self.options
        if options.progress and not self.trainer.is_global_zero:
            options = replace(options, progress=False)
        samples = self.model.generate(padded, options)[: len(seeds)]
        return {"seeds": batch.cpu(), "samples": samples.float().cpu()}


class ShardWriter(BasePredictionWriter):
    """Keeps ``reduce(prediction)`` of every batch and saves the rank's part to ``parts_dir/rank<r>.pt``.

    The default keeps seeds and samples; evaluation overrides ``reduce`` to keep features instead.
    """

    def __init__(self, parts_dir: Path) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.parts_dir = parts_dir
        self.kept: list[dict[str, Tensor]] = []
        self.batch_ends: list[tuple[float, int]] = []  # (time, samples so far) after each batch, this rank
        self.interrupted = False  # set by Ctrl-C (predict_over_seeds); checked after every batch

    def rate(self) -> float | None:
        """Samples per second on this rank after its first batch (start-up and compilation excluded)."""
        if len(self.batch_ends) < 2:
            return None
        (t0, n0), (t1, n1) = self.batch_ends[0], self.batch_ends[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    def reduce(self, prediction: dict[str, Tensor], pl_module: LightningModule) -> dict[str, Tensor]:
        return prediction

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.kept.append({k: v.cpu() for k, v in self.reduce(prediction, pl_module).items()})
        done = (self.batch_ends[-1][1] if self.batch_ends else 0) + len(prediction["seeds"])
        self.batch_ends.append((time.perf_counter(), done))
        if self.interrupted or trainer.received_sigterm:  # (Lightning's prediction loop never checks SIGTERM)
            raise Stopped("Ctrl-C" if self.interrupted else "SIGTERM")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        part = {k: torch.cat([b[k] for b in self.kept]) for k in self.kept[0]} if self.kept else {}
        torch.save(part, self.parts_dir / f"rank{trainer.global_rank}.pt")
        self.kept = []


def predict_over_seeds(
    sampler: SeedSampler,
    seeds: list[int],
    writer: ShardWriter,
    batch_size: int,
    accelerator: str,
    devices: int | str,
    strategy: str,
) -> dict[str, Tensor] | None:
    """Run ``sampler`` over ``seeds`` on all devices; rank 0 gets the parts merged in seed order (checked: each
    seed exactly once), other ranks None. The parts folder is removed whatever happens."""
    trainer = Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        benchmark=True,  # cuDNN picks the fastest convolutions for the one batch shape (as the GPU configs train)
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        callbacks=[writer],
    )
    parts = writer.parts_dir
    if trainer.is_global_zero:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
    previous = _stop_on_ctrl_c(writer)  # installed right before the try whose finally gives it back
    try:
        trainer.strategy.barrier()
        trainer.predict(sampler, datamodule=SeedDataModule(seeds, batch_size), return_predictions=False)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return None
        shards = [torch.load(p, weights_only=True) for p in sorted(parts.glob("rank*.pt"))]
        shards = [s for s in shards if s]
        merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
        order = merged["seeds"].argsort()
        merged = {k: v[order] for k, v in merged.items()}
        if merged["seeds"].tolist() != sorted(seeds):
            raise DiffscoreError(f"internal: gathered {len(merged['seeds'])} results for {len(seeds)} seeds")
        return merged
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if trainer.is_global_zero:
            shutil.rmtree(parts, ignore_errors=True)


def _stop_on_ctrl_c(writer: ShardWriter):
    """Ctrl-C stops the prediction after the batch in flight (a second one at once); returns the handler it
    replaced (None off the main thread, where signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigint(signum, frame) -> None:
        writer.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return signal.signal(signal.SIGINT, on_sigint)


def parts_folder(out: Path) -> Path:
    """A temporary folder beside ``out`` for the ranks' parts, unique to this command (two identical commands in
    one folder do not collide) and the same on every rank (DDP ranks inherit the launcher's environment)."""
    token = os.environ.setdefault("DIFFSCORE_RUN_TOKEN", secrets.token_hex(4))
    return out.with_name(f".{out.name}.parts-{token}")
