"""`diffscore sample`: draw N samples from a checkpoint's EMA weights, split over devices by seed.

Sample i uses seed ``seed + i`` for its initial noise, so the output is the same on any number of devices
and at any batch size. Rank r takes seeds r, r + world, ...: no seed is drawn twice, none is padded in.
Output goes to a temporary name first and is renamed at the end, so an interrupted run leaves nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from diffscore.core.gaussian import skip_for_sigma
from diffscore.core.samplers import SAMPLERS, nfe
from diffscore.core.schedules import karras_sigmas
from diffscore.errors import DiffscoreError
from diffscore.lit.checkpoint import load_diffusion_checkpoint
from diffscore.lit.diffusion import DiffusionModule
from diffscore.lit.disback import check_one_step_options
from diffscore.lit.teleport import TeleportOptions, gaussian_for_checkpoint


class SeedDataModule(LightningDataModule):
    """Integer seeds as a predict set, strided over ranks without padding."""

    def __init__(self, seeds: list[int], batch_size: int) -> None:
        super().__init__()
        self.seeds = seeds
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = torch.tensor(self.seeds[rank::world], dtype=torch.long)
        return DataLoader(mine, batch_size=self.batch_size, shuffle=False)


class ShardWriter(BasePredictionWriter):
    """Keeps ``reduce(prediction)`` of every batch and saves the rank's part to ``parts_dir/rank<r>.pt``.

    The default keeps seeds and samples; evaluation overrides ``reduce`` to keep features instead.
    """

    def __init__(self, parts_dir: Path) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.parts_dir = parts_dir
        self.kept: list[dict[str, torch.Tensor]] = []

    def reduce(self, prediction: dict[str, torch.Tensor], pl_module) -> dict[str, torch.Tensor]:
        return prediction

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.kept.append({k: v.cpu() for k, v in self.reduce(prediction, pl_module).items()})

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        part = {k: torch.cat([b[k] for b in self.kept]) for k in self.kept[0]} if self.kept else {}
        torch.save(part, self.parts_dir / f"rank{trainer.global_rank}.pt")
        self.kept = []


def predict_over_seeds(
    model: DiffusionModule,
    seeds: list[int],
    writer: ShardWriter,
    batch_size: int,
    accelerator: str,
    devices: int | str,
    strategy: str,
) -> dict[str, torch.Tensor] | None:
    """Run ``model.predict_step`` over ``seeds`` on all devices; rank 0 gets the parts merged in seed order
    (checked: each seed exactly once), other ranks None."""
    trainer = Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        callbacks=[writer],
    )
    parts = writer.parts_dir
    if trainer.is_global_zero:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
    trainer.strategy.barrier()
    trainer.predict(model, datamodule=SeedDataModule(seeds, batch_size), return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    try:
        shards = [torch.load(p, weights_only=True) for p in sorted(parts.glob("rank*.pt"))]
        shards = [s for s in shards if s]
        merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
        order = merged["seeds"].argsort()
        merged = {k: v[order] for k, v in merged.items()}
        if merged["seeds"].tolist() != sorted(seeds):
            raise DiffscoreError(f"internal: gathered {len(merged['seeds'])} results for {len(seeds)} seeds")
        return merged
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def prepare_teleport(model: DiffusionModule, opts: TeleportOptions | None, ckpt_path: str) -> dict:
    """Attach the Gaussian to the model and return the generate() options; prints the NFE it saves."""
    if opts is None or (opts.skip is None and opts.sigma is None):
        return {}
    model.teleport_gaussian = gaussian_for_checkpoint(opts, ckpt_path)
    steps = model.predict_options.get("num_steps") or model.hparams.num_steps
    name = model.predict_options.get("sampler") or model.hparams.sampler
    sigmas = karras_sigmas(steps, model.hparams.sigma_min, model.hparams.sigma_max, model.hparams.rho)
    skip = opts.skip if opts.skip is not None else skip_for_sigma(sigmas, opts.sigma)
    if not 0 <= skip < steps:
        raise DiffscoreError(f"--teleport.skip must be in 0..{steps - 1} for {steps} steps, got {skip}")
    print(
        f"diffscore: teleporting to sigma {float(sigmas[skip]):.3g}: {name} with {steps - skip} of {steps} steps, "
        f"{nfe(name, steps - skip)} instead of {nfe(name, steps)} evaluations",
        flush=True,
    )
    return {"teleport_skip": skip}


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise DiffscoreError(
            f"output folder {out.parent} does not exist (or is not a folder); create it or choose another --out"
        )
    if not os.access(out.parent, os.W_OK):
        raise DiffscoreError(f"output folder {out.parent} is not writable; choose another --out")
    if out.exists():
        if not overwrite and (out.is_file() or any(out.iterdir())):
            raise DiffscoreError(f"{out} already exists; remove it, choose another --out, or pass --overwrite true")
        if out.is_file() != (out.suffix == ".npz"):
            raise DiffscoreError(f"{out} exists and is not a {'file' if out.suffix == '.npz' else 'folder'}")


def _write(out: Path, seeds: torch.Tensor, samples: torch.Tensor) -> None:
    """Write to a temporary sibling, then rename: an interrupted write never leaves a partial output."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if out.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, seeds=seeds.numpy(), samples=samples.numpy())
        os.replace(tmp, out)
        return
    if samples.ndim != 4:
        raise DiffscoreError(f"samples of shape {tuple(samples.shape[1:])} are not images; use --out FILE.npz")
    from torchvision.utils import save_image

    tmp.mkdir()
    try:
        for s, img in zip(seeds.tolist(), samples):
            save_image((img.clamp(-1, 1) + 1) / 2, tmp / f"{s:06d}.png", format="png")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sample(
    ckpt_path: str,
    out: str,
    num_samples: int = 64,
    steps: int | None = None,
    sampler: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    class_label: int | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    overwrite: bool = False,
    teleport: TeleportOptions | None = None,
    trust_checkpoint: bool = False,
    prompt: str | None = None,
    guidance: float = 1.0,
) -> Path | None:
    """Sample from a diffscore checkpoint (its EMA weights) into a folder of PNGs or a .npz file.

    Args:
        ckpt_path: checkpoint written by `diffscore fit` (e.g. .../checkpoints/last.ckpt).
        out: a folder (one PNG per seed, ``<seed>.png``) or a ``.npz`` file (arrays ``seeds``, ``samples`` in
            data space; vector data need .npz).
        num_samples: how many samples; seeds ``seed .. seed + num_samples - 1``.
        steps: sampler steps (default: the checkpoint's num_steps; Heun 18 -> 35 evaluations).
        sampler: sampler name (default: the checkpoint's sampler).
        seed: the first seed.
        batch_size: samples per forward pass on each device.
        class_label: class for every sample of a class-conditional model (default: a seeded random class).
        accelerator: "cpu", "gpu" or "auto".
        devices: number of devices (or "auto"); the seeds are split across them.
        strategy: Lightning strategy ("auto", "ddp", ...).
        overwrite: replace an existing output.
        teleport: skip the first steps with the Gaussian model of the training data (--teleport.skip K or
            --teleport.sigma S; --teleport.gaussian FILE caches the fit).
        trust_checkpoint: allow a checkpoint that needs full unpickling (only for files you trust).
        prompt: caption for every sample of a text-conditioned model (default: the empty caption).
        guidance: classifier-free guidance scale w (1 = the conditional model as trained; 4 = MusicScore's CFG).
    """
    if num_samples < 1:
        raise DiffscoreError(f"--num_samples must be >= 1, got {num_samples}")
    if steps is not None and steps < 1:
        raise DiffscoreError(f"--steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise DiffscoreError(f"--batch_size must be >= 1, got {batch_size}")
    if sampler is not None and sampler not in SAMPLERS:
        raise DiffscoreError(f"--sampler {sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
    out_path = Path(out)
    _check_out(out_path, overwrite)
    model = load_diffusion_checkpoint(ckpt_path, trust_checkpoint)
    check_one_step_options(model, steps, sampler, teleport)
    if class_label is not None:
        label_dim = getattr(model.backbone, "label_dim", 0)
        if not 0 <= class_label < label_dim:
            raise DiffscoreError(f"--class_label {class_label} is out of range for a model with {label_dim} classes")
    if prompt is not None and getattr(model.backbone, "text_encoder", None) is None:
        raise DiffscoreError("--prompt needs a text-conditioned checkpoint (a backbone with text_dim > 0)")
    if guidance != 1.0 and not model.conditional:
        raise DiffscoreError("--guidance needs a conditional model (class labels or text); this one is unconditional")
    model.predict_options = {"num_steps": steps, "sampler": sampler, "class_label": class_label}
    if prompt is not None:
        model.predict_options["prompt"] = prompt
    if guidance != 1.0:
        model.predict_options["guidance"] = guidance
    model.predict_options.update(prepare_teleport(model, teleport, ckpt_path))

    seeds = list(range(seed, seed + num_samples))
    writer = ShardWriter(out_path.with_name(f".{out_path.name}.parts"))
    merged = predict_over_seeds(model, seeds, writer, batch_size, accelerator, devices, strategy)
    if merged is None:
        return None
    _write(out_path, merged["seeds"], merged["samples"])
    print(f"diffscore: wrote {num_samples} samples to {out_path}", flush=True)
    return out_path


def sample_cli(argv: list[str]) -> None:
    from jsonargparse import CLI

    CLI(sample, args=argv, as_positional=False)
