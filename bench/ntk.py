"""NTK probes of score regression (issue 7; Han, Razaviyayn & Xu 2024): two measurements on the CPU.

(a) Lazy regime: theory nets of growing width trained by full-batch gradient descent on the same fixed set of
    noisy DSM labels (a 2-D GMM, 64 points); at the end, the kernel twin's relative error against the network
    (||F_twin - F_net|| / ||F_net - F_0||, held-out probe points and training points) and the NTK drift
    ||K_T - K_0||_F / ||K_0||_F. Theory: both shrink like 1/sqrt(width).
(b) Early stopping: a small training set, full-batch GD through the real Lightning path (RegressionDiffusionModule
    + NTKProbe every ``--every`` steps); the "true" error to the exact GMM score is measured at every step on a
    large fresh sample of the mixture (not the probe's points). Does the error fall, then rise? How far is the
    probe's stopping point (its held-out exact-score error, and its held-out loss, which needs no oracle) from
    the true minimum, in steps and in excess error?

    python bench/ntk.py            # writes bench/ntk.json and bench/ntk.png
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from diffscore.core.losses import edm_loss
from diffscore.core.ntk import draw_regression_set, ntk_drift, relative_error
from diffscore.core.precond import EDMPrecond, edm_coefficients
from diffscore.core.schedules import LogNormalSigma
from diffscore.lit.callbacks import NTKProbe
from diffscore.lit.datamodules import GMMDataModule
from diffscore.lit.datamodules.base import split_images
from diffscore.lit.modules import RegressionDiffusionModule
from diffscore.networks import TheoryNet
from diffscore.probes.ntk import SIGMAS, BackboneOutput, NTKMeasurer, NTKSettings, regression_target

HERE = Path(__file__).resolve().parent


def lazy_regime(width: int, seed: int, num_train: int, steps: list[int], lr: float) -> list[dict]:
    """Train one theory net by full-batch GD (plain loop, the RegressionDiffusionModule's loss) and compare it
    with its kernel twin after each number of ``steps``."""
    dm = GMMDataModule(dim=2, num_train=num_train, num_val=256, seed=0, batch_size=num_train)
    torch.manual_seed(seed)
    denoiser = EDMPrecond(TheoryNet(data_shape=[2], width=width))
    view = BackboneOutput(denoiser)
    train, heldout = split_images(dm, "train"), split_images(dm, "val")
    regression_set = draw_regression_set(train, seed, LogNormalSigma())
    m = NTKMeasurer(train, heldout, denoiser.coefficients, NTKSettings(num_points=64), dm.mixture, regression_set)
    n, out_dim = m.kernel_set[2].shape
    twin = m.twin(view, 2 * lr / (n * out_dim))
    f0_probe, f0_kernel = m.outputs(view)
    K0 = m.gram(view, *m.kernel_set[:2])
    opt = torch.optim.SGD(denoiser.parameters(), lr=lr)
    rows = []
    for step in range(1, max(steps) + 1):
        opt.zero_grad()
        edm_loss(denoiser, *regression_set).mean().backward()
        opt.step()
        if step not in steps:
            continue
        f_probe, f_kernel = m.outputs(view)
        t_kernel, t_probe = twin.after_steps(step)
        rows.append(
            {
                "width": width,
                "seed": seed,
                "steps": step,
                "twin_rel_error": relative_error(t_probe, f_probe, f0_probe),
                "twin_rel_error_train": relative_error(t_kernel, f_kernel, f0_kernel),
                "drift": ntk_drift(m.gram(view, *m.kernel_set[:2]), K0),
                "score_error_heldout_net": m.score_errors(f_probe)["ntk/score_error_heldout"],
                "score_error_heldout_twin": m.score_errors(t_probe)["ntk/score_error_heldout"],
            }
        )
    return rows


class TrueError(Callback):
    """The error to the exact score at every step on a large fresh sample of the mixture, noised at the probe's
    sigmas: mean_d (F - F*)^2 (= the EDM-weighted denoiser error), the population version of the probe's number."""

    def __init__(self, mixture, sigmas, num_x0: int, seed: int) -> None:
        g = torch.Generator().manual_seed(10_000 + seed)
        x0 = mixture.sample(num_x0, generator=g).float()
        xs, ss = [], []
        for s in sigmas:
            xs.append(x0 + s * torch.randn(x0.shape, generator=g))
            ss.append(torch.full((num_x0,), float(s)))
        self.x, self.sigma = torch.cat(xs), torch.cat(ss)
        self.target = regression_target(
            self.x, self.sigma, mixture(self.x.double(), self.sigma.double()), edm_coefficients
        )
        self.steps, self.errors = [], []

    @torch.no_grad()
    def _measure(self, trainer, pl_module) -> None:
        f = BackboneOutput(pl_module.denoiser)(self.x, self.sigma).double()
        self.steps.append(trainer.global_step)
        self.errors.append(float((f - self.target).square().mean()))

    def on_train_start(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._measure(trainer, pl_module)


def early_stopping(seed: int, num_train: int, width: int, steps: int, lr: float, every: int, true_points: int) -> dict:
    dm = GMMDataModule(dim=2, num_train=num_train, num_val=256, seed=seed, batch_size=num_train)
    torch.manual_seed(seed)
    module = RegressionDiffusionModule(
        TheoryNet(data_shape=[2], width=width), noise_seed=seed, optimizer=partial(torch.optim.SGD, lr=lr)
    )
    probe = NTKProbe(every_n_steps=every, num_points=64)
    truth = TrueError(dm.mixture, SIGMAS, true_points, seed)
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[probe, truth],
            default_root_dir=root,
        )
        trainer.fit(module, dm)
    true_err = dict(zip(truth.steps, truth.errors))  # the last of each step (one per step)
    t_star = min(true_err, key=true_err.get)
    hist = probe.history

    def stop_by(key: str) -> dict:
        step = min(hist, key=lambda r: r[key])["step"]
        return {"step": step, "true_error": true_err[step], "excess": true_err[step] / true_err[t_star] - 1}

    return {
        "seed": seed,
        "true_min_step": t_star,
        "true_min_error": true_err[t_star],
        "true_error_at_start": true_err[0],
        "true_error_at_end": true_err[steps],
        "probe_stop_exact": stop_by("ntk/score_error_heldout"),
        "probe_stop_heldout_loss": stop_by("ntk/heldout_loss"),
        "twin_min_step": min(hist, key=lambda r: r["ntk/twin_score_error_heldout"])["step"],
        # stored thinned (every step up to 300, then every 10th); the minimum above used every step
        "curve": {
            "step": [t for t in truth.steps if t < 300 or t % 10 == 0],
            "true_error": [e for t, e in zip(truth.steps, truth.errors) if t < 300 or t % 10 == 0],
        },
        "probe": [
            {
                k: r[k]
                for k in (
                    "step",
                    "ntk/score_error_heldout",
                    "ntk/heldout_loss",
                    "ntk/twin_score_error_heldout",
                    "ntk/twin_rel_error",
                    "ntk/drift",
                )
            }
            for r in hist
        ],
    }


def plot(result: dict, path: Path) -> None:
    from diffscore.io import pyplot

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = result["lazy"]
    widths = sorted({r["width"] for r in rows})
    for j, steps in enumerate(sorted({r["steps"] for r in rows})):
        for i, (key, label) in enumerate(
            (
                ("twin_rel_error", "twin rel. error, held-out probe"),
                ("twin_rel_error_train", "twin rel. error, training set"),
                ("drift", "NTK drift"),
            )
        ):
            sel = [[r[key] for r in rows if r["width"] == w and r["steps"] == steps] for w in widths]
            ax1.plot(
                widths,
                [sum(v) / len(v) for v in sel],
                marker="o",
                color=f"C{i}",
                ls=("--", "-")[j % 2],
                label=f"{label} ({steps} steps)",
            )
    ref = [0.5 * math.sqrt(widths[0] / w) for w in widths]
    ax1.plot(widths, ref, ls=":", color="gray", label="1/sqrt(width) reference")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("width m")
    a = result["args"]
    ax1.set_title(f"(a) kernel twin vs network, lr {a['lr']}, mean of {len(a['seeds'])} seeds")
    ax1.legend(fontsize=6)
    run = result["early"][0]
    ax2.plot(run["curve"]["step"], run["curve"]["true_error"], lw=1, label="true error (every step)")
    ps = [r["step"] for r in run["probe"]]
    ax2.plot(ps, [r["ntk/score_error_heldout"] for r in run["probe"]], ".", ms=3, label="probe: held-out error")
    ax2.plot(ps, [r["ntk/twin_score_error_heldout"] for r in run["probe"]], lw=1, ls=":", label="kernel twin")
    ax2.axvline(run["true_min_step"], color="k", lw=0.8, label="true minimum")
    ax2.axvline(run["probe_stop_exact"]["step"], color="C3", ls="--", lw=0.8, label="probe's stopping point")
    ax2.axvline(run["probe_stop_heldout_loss"]["step"], color="C4", ls="-.", lw=0.8, label="held-out-loss stop")
    ax2.set_xscale("symlog", linthresh=10)
    ax2.set_xlim(0, max(run["curve"]["step"]))
    ax2.set_yscale("log")
    ax2.set_xlabel("gradient-descent step")
    ax2.set_ylabel("error to the exact score, mean (F - F*)^2")
    ax2.set_title(f"(b) {a['num_train']} noisy labels, width {a['width']}, lr {a['early_lr']}, seed 0")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lazy_steps", type=int, nargs="+", default=[100, 1000], help="GD steps of (a)")
    p.add_argument("--num_train", type=int, default=64)
    p.add_argument("--width", type=int, default=1024, help="width of (b)")
    p.add_argument("--steps", type=int, default=3000, help="GD steps of (b)")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate of (a)")
    p.add_argument("--early_lr", type=float, default=0.1, help="learning rate of (b)")
    p.add_argument("--every", type=int, default=10, help="probe cadence of (b)")
    p.add_argument("--true_points", type=int, default=1000, help="fresh mixture samples per sigma of the truth")
    p.add_argument("--out", default=str(HERE / "ntk"))
    p.add_argument("--replot", action="store_true", help="only redraw OUT.png from OUT.json")
    args = p.parse_args()
    if args.replot:
        out = Path(args.out)
        plot(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".png"))
        return
    torch.set_num_threads(1)  # tiny matrices: more threads only spin on a shared 2-core machine
    t0 = time.perf_counter()
    lazy = []
    for w in args.widths:
        for s in args.seeds:
            for row in lazy_regime(w, s, args.num_train, args.lazy_steps, args.lr):
                lazy.append(row)
                print(json.dumps(row), flush=True)
    early = []
    for s in args.seeds:
        early.append(
            early_stopping(s, args.num_train, args.width, args.steps, args.early_lr, args.every, args.true_points)
        )
        print(json.dumps({k: v for k, v in early[-1].items() if k not in ("curve", "probe")}), flush=True)
    result = {"args": vars(args), "seconds": time.perf_counter() - t0, "lazy": lazy, "early": early}
    out = Path(args.out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out.with_suffix(".json"))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
