"""How Gaussian is the learned score? EV of the network's score against analytic references, per sigma.

References, all fitted to the training data: the Gaussian (mean + covariance), a GMM with k components
(k-means), and the delta mixture (the training set's exact score). Probe points are training images noised
at each sigma (Wang & Vastola 2024, Fig. 2). `diffscore probe gaussian --ckpt_path CKPT` prints the table and
writes the plot; the GaussianScoreProbe callback logs ``probe/ev_<ref>_s<sigma>`` during fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from diffscore.core.gaussian import DeltaMixtureDenoiser, GaussianDenoiser, GMMDenoiser, score_explained_variance
from diffscore.errors import DiffscoreError

SIGMA_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


def build_references(train: Tensor, gmm_components: list[int]) -> dict:
    refs = {"gaussian": GaussianDenoiser.from_data(train)}
    for k in gmm_components:
        refs[f"gmm{k}"] = GMMDenoiser.from_data(train, k)
    refs["delta"] = DeltaMixtureDenoiser(train)
    return refs


@torch.no_grad()
def explained_variance_table(
    denoiser, train: Tensor, refs: dict, sigmas=SIGMA_GRID, num_points: int = 256, seed: int = 0
) -> dict[str, dict[float, float]]:
    """{reference: {sigma: mean EV}} over ``num_points`` training points noised at each sigma."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[:num_points]
    x0 = train[idx]
    device = getattr(denoiser, "device", None) or torch.device("cpu")
    table: dict[str, dict[float, float]] = {name: {} for name in refs}
    for s in sigmas:
        x = x0 + s * torch.randn(x0.shape, generator=g)
        sig = torch.full((len(x),), float(s))
        d_net = denoiser(x.to(device), sig.to(device)).cpu()
        for name, ref in refs.items():
            ev = score_explained_variance(d_net, ref(x, sig), x)
            table[name][float(s)] = float(ev.mean())
    return table


def plot_table(table: dict[str, dict[float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, row in table.items():
        ax.plot(list(row), list(row.values()), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(min(-0.1, min(min(r.values()) for r in table.values())), 1.05)
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xlabel("sigma")
    ax.set_ylabel("explained variance of the network's score")
    ax.set_title(title)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def format_table(table: dict[str, dict[float, float]]) -> str:
    sigmas = list(next(iter(table.values())))
    lines = [f"{'sigma':>8}" + "".join(f"{name:>12}" for name in table)]
    for s in sigmas:
        lines.append(f"{s:>8g}" + "".join(f"{table[name][s]:>12.3f}" for name in table))
    return "\n".join(lines)


class GaussianScoreProbe(Callback):
    """Every ``every_n_steps`` steps: EV of the EMA network's score against the references, per sigma."""

    def __init__(self, every_n_steps: int = 1000, gmm_components: list[int] = [10], num_points: int = 256) -> None:  # noqa: B006
        self.every_n_steps = every_n_steps
        self.gmm_components = gmm_components
        self.num_points = num_points
        self.refs = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not (self.every_n_steps and step % self.every_n_steps == 0) or not trainer.is_global_zero:
            return
        from diffscore.lit.evaluate import train_images
        from diffscore.lit.run_dir import run_dir
        from diffscore.lit.run_log import append_jsonl
        from diffscore.lit.sample_grid import SampleGrid

        if self.refs is None:
            self.train = train_images(trainer.datamodule)
            self.refs = build_references(self.train.flatten(1).double(), self.gmm_components)
        module = SampleGrid.ema_module(trainer, pl_module)
        was_training = module.training
        module.eval()
        table = explained_variance_table(_Denoiser(module), self.train, self.refs, num_points=self.num_points)
        module.train(was_training)
        scalars = {f"probe/ev_{ref}_s{s:g}": v for ref, row in table.items() for s, v in row.items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        append_jsonl(trainer, {"step": step, **scalars})
        plot_table(table, run_dir(trainer) / "probes" / f"gaussian_step{step:07d}.png", f"step {step}")


class _Denoiser:
    """A DiffusionModule's denoiser as a plain function on its device."""

    def __init__(self, module: LightningModule) -> None:
        self.module, self.device = module, module.device

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.module.denoiser(x.float(), sigma.float()).double()


def probe_gaussian(
    ckpt_path: str,
    out: str | None = None,
    gmm_components: list[int] | None = None,
    num_points: int = 256,
) -> dict[str, dict[float, float]]:
    """EV of a checkpoint's (EMA) score against Gaussian, GMM and delta-mixture references, per sigma.

    Args:
        ckpt_path: checkpoint written by `diffscore fit` (its data are rebuilt from the checkpoint).
        out: folder for ev.json and ev.png (default: print only).
        gmm_components: the k of each GMM reference (k-means on the training data; default [10]).
        num_points: training points noised at each sigma.
    """
    from diffscore.lit.checkpoint import load_checkpoint_datamodule, load_diffusion_checkpoint
    from diffscore.lit.evaluate import train_images

    model = load_diffusion_checkpoint(ckpt_path).eval()
    dm = load_checkpoint_datamodule(ckpt_path)
    if dm is None:
        raise DiffscoreError(f"{ckpt_path} does not name its data")
    train = train_images(dm)
    refs = build_references(train.flatten(1).double(), gmm_components or [10])
    table = explained_variance_table(_Denoiser(model), train, refs, num_points=num_points)
    print(format_table(table))
    if out is not None:
        folder = Path(out)
        if not folder.parent.is_dir():
            raise DiffscoreError(f"output folder {folder.parent} does not exist")
        folder.mkdir(exist_ok=True)
        (folder / "ev.json").write_text(json.dumps({k: {str(s): v for s, v in r.items()} for k, r in table.items()}))
        plot_table(table, folder / "ev.png", Path(ckpt_path).name)
        print(f"diffscore: wrote {folder / 'ev.json'} and {folder / 'ev.png'}")
    return table
