"""DisBack (Zhang et al. 2024, arXiv 2408.15991): one-step distillation along a recorded degradation path,
and its baseline Diff-Instruct (the same loop with the target fixed at the teacher).

Networks (all EDMPrecond around a copy of the teacher's backbone):
- teacher: the frozen EMA weights of a `diffscore fit` checkpoint;
- generator G: x = D_G(sigma_init z; sigma_init), initialised from the teacher;
- fake score: learns the score of G's samples with the EDM loss, initialised from the teacher;
- target: the score G is pulled towards: a node of the path (DisBack) or the teacher (Diff-Instruct).

Stage 1 (degradation recording, DisBack only): G frozen at its initial weights; the fake score (a copy of the
teacher) is fine-tuned on G's samples for ``num_path * record_interval`` steps, and saved every
``record_interval`` steps as path node k = 1..N in ``path_dir`` (node 0 is the teacher itself).
Stage 2 (distribution backtracking): the fake score restarts from node N, the target is node N-1; after every
``backtrack_interval`` generator steps the target moves one node towards the teacher (N targets in all,
N-1 moves after the first, the last being the teacher); each generator step first updates the fake score
``fake_updates`` times on fresh G samples, then G with the VSD gradient (Diff-Instruct's order).

The target node is a pure function of the generator step, so a run resumed from any checkpoint loads the
same node; every load is strict and checked against the node's saved parameter fingerprint (the published
code's silent ``strict=False`` no-op cannot happen here), and logged in ``target_log``.

Distillation is data-free: the data module (diffscore.lit.datamodules.DistillBatches) only sets the batch size;
checkpoints name the teacher's data (``datamodule_hyper_parameters``), which `diffscore evaluate` compares with.

A latent, text-conditioned teacher (a Stable Diffusion folder, or a checkpoint fine-tuned from one): teacher, fake
score and generator are copies of its U-Net in its discrete-DDPM preconditioning; every step's captions are drawn
(from the module's generator) from ``captions``, by default the teacher's training captions when its data names
them, else the empty caption (unconditional distillation); noise levels are clipped to the teacher's trained range
[sigma_0, sigma_{T-1}]; the fake score's EDM loss uses sigma_data = 1 (SD's latents have about unit variance;
ours); the generator's samples are latents, which its checkpoint's sampler decodes with the teacher's VAE.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from diffscore.core.discrete_ddpm import DiscreteDDPMPrecond
from diffscore.core.distill import WEIGHTINGS, one_step_generate, vsd_gradient, vsd_surrogate_loss
from diffscore.core.losses import edm_loss
from diffscore.core.precond import EDMPrecond
from diffscore.core.schedules import LogNormalSigma
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write
from diffscore.lit.datamodules.base import Captioned
from diffscore.lit.datamodules.from_file import model_datamodule
from diffscore.lit.run_dir import run_dir
from diffscore.loading.denoiser import spec_record
from diffscore.loading.model import LoadedModel
from diffscore.loading.open import open_model
from diffscore.networks.backbone import BackboneFacts
from diffscore.networks.backbone import config as backbone_config
from diffscore.sampling.one_step import OneStepSampler
from diffscore.sampling.options import SamplingOptions

OptimizerCallable = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
METHODS = ("disback", "diffinstruct")
STAGES = ("both", "record", "backtrack")
LATENT_SIGMA_DATA = 1.0  # a teacher without EDM's sigma_data (Stable Diffusion): its latents' std


def distill_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Diff-Instruct's optimizer: Adam with beta1 = 0 (lr 1e-4 here; unverified for DisBack)."""
    return torch.optim.Adam(params, lr=1e-4, betas=(0.0, 0.999), eps=1e-8)


def fingerprint(module: nn.Module) -> str:
    """SHA-1 of every parameter and buffer's bytes, in state_dict order: equal iff the weights are bit-identical."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_options(hp: Any) -> None:
    """Raise DiffscoreError, naming the option, for inconsistent DisBackModule settings (``hp``: its hparams)."""
    if hp.teacher_ckpt is None:
        raise DiffscoreError("model.teacher_ckpt is required: the teacher's checkpoint from `diffscore fit`")
    for name, allowed in (("method", METHODS), ("stage", STAGES), ("weighting", WEIGHTINGS)):
        if hp[name] not in allowed:
            raise DiffscoreError(f"model.{name} must be one of {allowed}, got {hp[name]!r}")
    for name in ("num_path", "record_interval", "backtrack_interval", "generator_steps", "fake_updates"):
        if hp[name] < 1:
            raise DiffscoreError(f"model.{name} must be >= 1, got {hp[name]}")
    if hp.sigma_init <= 0:
        raise DiffscoreError(f"model.sigma_init must be positive, got {hp.sigma_init}")
    path_steps = (hp.num_path - 1) * hp.backtrack_interval
    if hp.method == "disback" and hp.stage != "record" and hp.generator_steps <= path_steps:
        raise DiffscoreError(
            f"model.generator_steps ({hp.generator_steps}) must exceed (num_path - 1) * backtrack_interval "
            f"({path_steps}), or the target never reaches the teacher"
        )
    if hp.method == "diffinstruct" and hp.stage != "both":
        raise DiffscoreError("model.stage applies to disback only; diffinstruct has no stage 1 (leave stage: both)")


class DisBackModule(BackboneFacts, LightningModule):
    """DisBack / Diff-Instruct one-step distillation of a diffscore teacher (manual optimisation).

    Optimizers: [fake score, generator]. Counters ``stage1_step``, ``generator_step`` and ``target_index``
    are buffers (saved in checkpoints); the distillation noise comes from the module's own seeded generator,
    whose state is saved too, so an interrupted run resumes exactly. ``target_log`` lists every target load:
    (generator step, path node, fingerprint, kind) with kind "start", "move" or "resume".
    """

    def __init__(
        self,
        teacher_ckpt: str | None = None,  # a `diffscore fit` checkpoint or EDM network .pkl: the teacher (required)
        method: str = "disback",  # "disback" or "diffinstruct" (target = teacher, fake from teacher, no stage 1)
        stage: str = "both",  # "both": record then backtrack; "record": stage 1 only; "backtrack": stage 2 only
        path_dir: str | None = None,  # folder of the path nodes (default: <run folder>/disback_path)
        num_path: int = 10,  # N: path nodes saved in stage 1 (node 0 is the teacher)
        record_interval: int = 100,  # stage-1 fake-score steps between path nodes
        backtrack_interval: int = 100,  # generator steps per target in stage 2
        generator_steps: int = 2000,  # generator steps in stage 2 (DisBack: > (N - 1) * backtrack_interval)
        fake_updates: int = 1,  # fake-score updates per generator step
        sigma_init: float = 1.0,  # G(z) = D_G(sigma_init z; sigma_init) (Diff-Instruct's CIFAR value)
        weighting: str = "dmd",  # VSD weighting: "kl" (1/sigma^2: the exact KL gradient) or "dmd" (normalised)
        P_mean: float = -1.2,  # ln(sigma) ~ N(P_mean, P_std^2) for both the fake-score loss and the VSD gradient
        P_std: float = 1.2,
        generator_optimizer: OptimizerCallable = distill_optimizer,  # Adam(lr 1e-4, betas (0, 0.999))
        fake_optimizer: OptimizerCallable = distill_optimizer,  # used in stage 1 as well; state reset at stage 2
        seed: int = 0,  # seed of the distillation noise (z, sigma, n)
        trust_checkpoint: bool = False,  # allow a teacher checkpoint that needs full unpickling
        captions: list[str] | None = None,  # text teachers: captions to draw from (default: the teacher's data's)
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator_optimizer", "fake_optimizer"])
        self.automatic_optimization = False
        check_options(self.hparams)
        teacher = self._load_teacher(teacher_ckpt, trust_checkpoint, captions)
        self.generator = copy.deepcopy(teacher).requires_grad_(True).train()
        self.fake = copy.deepcopy(teacher).requires_grad_(True).train()
        # frozen networks live outside the module tree: not in state_dict (the teacher is re-read from its file,
        # the target from the path), moved with the module by _apply
        self._frozen: dict[str, EDMPrecond] = {
            "teacher": teacher,
            "target": copy.deepcopy(teacher).eval().requires_grad_(False),
        }
        self.sigma_data = float(getattr(teacher, "sigma_data", LATENT_SIGMA_DATA))
        self.sigma_init = float(sigma_init)
        self.sigma_law = LogNormalSigma(P_mean, P_std)
        self.generator_optimizer_factory = generator_optimizer
        self.fake_optimizer_factory = fake_optimizer
        self.register_buffer("stage1_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("generator_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("target_index", torch.full((), -1, dtype=torch.long))
        self.target_log: list[tuple[int, int, str, str]] = []
        self._loaded_index: int | None = None
        self._rng: torch.Generator | None = None
        self._rng_state: Tensor | None = None
        self._path_dir: Path | None = Path(path_dir) if path_dir else None

    def _load_teacher(self, teacher_ckpt: str, trust_checkpoint: bool, captions: list[str] | None) -> EDMPrecond:
        """The frozen EMA denoiser of the teacher's file; records its backbone, data, captions and fingerprint."""
        loaded = open_model(teacher_ckpt, trust_checkpoint)  # EMA weights, opened once
        teacher = loaded.denoiser(f"model.teacher_ckpt ({teacher_ckpt})").eval().requires_grad_(False)
        self.teacher_backbone_config = backbone_config(teacher.backbone)
        self.teacher_data_config = loaded.data_config  # NVlabs/edm pickles have none
        self.teacher_fingerprint = fingerprint(teacher)
        self.captions = teacher_captions(loaded, captions) if loaded.text_conditioned else None
        self._decoder = loaded.decoder  # a latent teacher's VAE: the generator's samples are decoded by it
        return teacher

    # ----------------------------------------------------------------------------------------------------
    @property
    def teacher(self) -> EDMPrecond:
        return self._frozen["teacher"]

    @property
    def target(self) -> EDMPrecond:
        return self._frozen["target"]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for net in (*self._frozen.values(), *([self._decoder] if self._decoder is not None else [])):
            net._apply(fn, recurse)
        return self

    @property
    def num_record_steps(self) -> int:
        """Stage-1 steps of this run (0 for Diff-Instruct or a backtrack-only run)."""
        if self.hparams.method == "diffinstruct" or self.hparams.stage == "backtrack":
            return 0
        return self.hparams.num_path * self.hparams.record_interval

    def scheduled_index(self, generator_step: int) -> int:
        """The path node that is the target at a generator step: N-1, ..., 0 every backtrack_interval steps."""
        if self.hparams.method == "diffinstruct":
            return 0
        return max(self.hparams.num_path - 1 - generator_step // self.hparams.backtrack_interval, 0)

    @property
    def path_dir(self) -> Path:
        if self._path_dir is None:
            raise DiffscoreError("model.path_dir is not set (it defaults to the run folder once fit starts)")
        return self._path_dir

    def path_file(self, k: int) -> Path:
        return self.path_dir / f"node_{k:03d}.pt"

    @property
    def backbone(self) -> nn.Module:
        return self.generator.backbone

    def sampler(self, options: SamplingOptions | None = None, **resources: Any) -> OneStepSampler:
        """A sampler of the generator's current weights: x = D_G(sigma_init z; sigma_init), NFE = 1."""
        resources.pop("progress", None)
        return OneStepSampler(self.generator, self.sigma_init, options, **resources).with_decoder(self._decoder)

    # ----------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            self.fake_optimizer_factory(self.fake.parameters()),
            self.generator_optimizer_factory(self.generator.parameters()),
        ]

    def on_fit_start(self) -> None:
        if self._path_dir is None:
            if self.hparams.stage == "backtrack":
                raise DiffscoreError("model.stage backtrack needs model.path_dir: the folder stage 1 wrote")
            self._path_dir = run_dir(self.trainer) / "disback_path"

    def _noise(self, batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """z, sigma, n and labels for one step, from the module's own generator."""
        if self._rng is None or self._rng.device != self.device:
            self._rng = torch.Generator(device=self.device).manual_seed(self.hparams.seed)
            if self._rng_state is not None:
                self._rng.set_state(self._rng_state)
                self._rng_state = None
        shape = (batch, *self.data_shape)
        z = torch.randn(shape, generator=self._rng, device=self.device)
        noise = torch.randn(shape, generator=self._rng, device=self.device)
        sigma = self.sigma_law(batch, device=self.device, generator=self._rng)
        if isinstance(self.teacher, DiscreteDDPMPrecond):  # defined on its trained levels only
            sigma = sigma.clamp(self.teacher.sigma_min, self.teacher.sigma_max)
        cond = None
        if self.captions is not None:
            pick = torch.randint(len(self.captions), (batch,), generator=self._rng, device=self.device)
            cond = [self.captions[i] for i in pick.tolist()]
        elif self.conditional:
            cond = torch.randint(self.backbone.label_dim, (batch,), generator=self._rng, device=self.device)
        return z, sigma, noise, cond

    def _fake_step(self, opt, batch: int) -> Tensor:
        z, sigma, noise, cond = self._noise(batch)
        with torch.no_grad():
            x = one_step_generate(self.generator, z, self.sigma_init, cond)
        loss = edm_loss(self.fake, x, sigma, noise, cond, self.sigma_data).mean()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        return loss.detach()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x0 = batch[0] if isinstance(batch, list | tuple) else batch
        size = x0.shape[0]  # the images themselves are never used
        opt_fake, opt_gen = self.optimizers()
        if int(self.stage1_step) < self.num_record_steps:
            loss = self._fake_step(opt_fake, size)
            self.stage1_step += 1
            self.log("disback/record_loss", loss, prog_bar=True)
            if int(self.stage1_step) % self.hparams.record_interval == 0:
                self._save_node(int(self.stage1_step) // self.hparams.record_interval)
            if self.hparams.stage == "record" and int(self.stage1_step) >= self.num_record_steps:
                self.trainer.should_stop = True
            return
        if int(self.generator_step) == 0 and self._loaded_index is None:
            self._begin_backtracking(opt_fake)
        self._sync_target()
        for _ in range(self.hparams.fake_updates):
            fake_loss = self._fake_step(opt_fake, size)
        z, sigma, noise, cond = self._noise(size)
        x = one_step_generate(self.generator, z, self.sigma_init, cond)  # [B, ...], differentiable in G
        grad = vsd_gradient(self.fake, self.target, x, sigma, noise, cond, self.hparams.weighting)
        opt_gen.zero_grad(set_to_none=True)
        self.manual_backward(vsd_surrogate_loss(x, grad).mean())
        opt_gen.step()
        self.generator_step += 1
        self.log("disback/fake_loss", fake_loss, prog_bar=True)
        self.log("disback/vsd_grad_norm", grad.flatten(1).norm(dim=1).mean())
        self.log("disback/target_index", float(self.target_index))
        if int(self.generator_step) >= self.hparams.generator_steps:
            self.trainer.should_stop = True

    # ----------------------------------------------------------------------------------------------------
    def _save_node(self, k: int) -> None:
        """Path node k (the fake score after k * record_interval steps), written atomically on rank zero."""
        if self.trainer.is_global_zero:
            self.path_dir.mkdir(parents=True, exist_ok=True)
            state = {name: t.detach().cpu().clone() for name, t in self.fake.state_dict().items()}
            payload = {
                "state_dict": state,
                "index": k,
                "stage1_step": int(self.stage1_step),
                "fingerprint": fingerprint(self.fake),
                "teacher_fingerprint": self.teacher_fingerprint,
            }
            with atomic_write(self.path_file(k)) as tmp:
                torch.save(payload, tmp)

    def _load_node(self, net: EDMPrecond, k: int) -> str:
        """Load path node k into ``net`` (strictly; node 0 is the teacher); returns the new fingerprint."""
        if k == 0:
            net.load_state_dict(self.teacher.state_dict(), strict=True)
            expected = self.teacher_fingerprint
        else:
            path = self.path_file(k)
            if not path.is_file():
                raise DiffscoreError(
                    f"path node {path} is missing: stage 2 needs the {self.hparams.num_path} nodes that stage 1 "
                    "wrote; run stage 1 (model.stage both or record) or point model.path_dir at them"
                )
            payload = torch.load(path, map_location=self.device, weights_only=True)
            if payload.get("teacher_fingerprint") != self.teacher_fingerprint:
                raise DiffscoreError(f"path node {path} was recorded from another teacher than model.teacher_ckpt")
            try:
                net.load_state_dict(payload["state_dict"], strict=True)
            except RuntimeError as e:
                raise DiffscoreError(f"path node {path} does not fit the teacher's network ({e!s:.200})") from None
            expected = payload["fingerprint"]
        got = fingerprint(net)
        if got != expected:
            raise DiffscoreError(f"internal: path node {k} loaded with fingerprint {got}, saved as {expected}")
        return got

    def _begin_backtracking(self, opt_fake) -> None:
        """Stage 2 starts: the fake score from node N (DisBack) with fresh optimizer state."""
        self.trainer.strategy.barrier()  # rank zero has written the path
        if self.hparams.method == "disback":
            self._load_node(self.fake, self.hparams.num_path)
            opt_fake.optimizer.state.clear()

    def _sync_target(self) -> None:
        """Load the scheduled target node if it is not the one loaded; log the load."""
        k = self.scheduled_index(int(self.generator_step))
        if self._loaded_index == k:
            return
        if self._loaded_index is None:
            kind = "start" if int(self.generator_step) == 0 else "resume"
        else:
            kind = "move"
        fp = self._load_node(self.target, k)
        self._loaded_index = k
        self.target_index.fill_(k)
        self.target_log.append((int(self.generator_step), k, fp, kind))

    # ----------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["one_step_generator"] = {
            "backbone": self.teacher_backbone_config,
            "precond": spec_record(self.generator),  # EDM2's (logvar head included) or a Stable Diffusion folder's
            "sigma_data": self.sigma_data,
            "sigma_init": self.sigma_init,
        }
        if self.teacher_data_config:  # the generator models the teacher's data: evaluate compares with them
            checkpoint["datamodule_hyper_parameters"] = dict(self.teacher_data_config)
        checkpoint["disback"] = {
            "rng": self._rng.get_state() if self._rng is not None else self._rng_state,
            "target_log": list(self.target_log),
            "path_dir": str(self._path_dir) if self._path_dir else None,
        }
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}  # dropout, as DiffusionModule does

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("disback") or {}
        self._rng, self._rng_state = None, state.get("rng")
        self.target_log = [tuple(e) for e in state.get("target_log", [])]
        if self._path_dir is None and state.get("path_dir"):
            self._path_dir = Path(state["path_dir"])
        self._loaded_index = None
        rng = checkpoint.get("rng_states")
        if rng and self._trainer is not None and self._trainer.state.fn == "fit":
            torch.set_rng_state(rng["torch"])

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["generator_optimizer_factory"] = state["fake_optimizer_factory"] = None
        return state


def teacher_captions(loaded: LoadedModel, given: list[str] | None) -> list[str]:
    """The captions a text teacher's distillation draws: ``given``, else the teacher's training captions (its data
    names a captioned data set), else the empty caption (the teacher's unconditional mode)."""
    if given is not None:
        if not given or not all(isinstance(c, str) for c in given):
            raise DiffscoreError("model.captions must be a non-empty list of strings")
        return list(given)
    dm = model_datamodule(loaded)
    captions = dm.captions("train") if isinstance(dm, Captioned) else []
    return list(captions) or [""]
