"""Post-hoc EMA (issue 22): sample quality, memorization and held-out loss against sigma_rel, chosen after training.

    python bench/phema_sweep.py --stage train --out runs/phema --seeds 0 1 2 --parallel 2
    OMP_NUM_THREADS=1 python bench/phema_sweep.py --stage evaluate --out runs/phema --plot bench/phema_sweep
    OMP_NUM_THREADS=1 python bench/phema_sweep.py --stage cost --plot bench/phema_sweep   # CPU s per step

Two setups, each trained once per seed with ``PostHocEMA`` (tracking sigma_rel 0.05 and 0.10 for the
reconstruction, plus 0.02 and 0.20 as directly tracked checks) beside ``EDMEMA``: ``quickstart``
(experiments/quickstart.yaml, all 1,437 training digits) and ``digits300`` (experiments/digits_scoreaug.yaml with
``augment: []``: 300 training digits, the overfitting baseline arm; 500 steps by default instead of the YAML's
4,000, for a shared 2-core CPU). After training, `diffscore phema` reconstructs each sigma_rel of the grid from
the 0.05/0.10 snapshots only. Every reconstruction (and the run's own EDMEMA checkpoint) draws N samples (Heun,
the config's 18 steps) for FD-digits (against the training digits, as `diffscore evaluate`, and, for digits300,
against the 1,497 digits it never saw) and the memorized fraction, and is validated for the held-out loss (mean
over the 10 sigma buckets of the validation split, fixed noise). Writes <plot>.json/.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SETUPS = {
    "quickstart": ("experiments/quickstart.yaml", []),
    "digits300": ("experiments/digits_scoreaug.yaml", ["--model.init_args.augment=[]"]),
}
GRID = (0.01, 0.02, 0.03, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
TRACKED = (0.05, 0.10, 0.02, 0.20)  # the first two are the reconstruction's; the others check it


def callbacks(every_images: int, steps: int) -> str:
    """The run's callbacks: EDMEMA (the config's), PostHocEMA, the run log and the last checkpoint."""
    cbs = [
        {
            "class_path": "diffscore.lit.callbacks.EDMEMA",
            "init_args": {"halflife_images": 500000, "rampup_ratio": 0.05},
        },
        {
            "class_path": "diffscore.lit.callbacks.PostHocEMA",
            "init_args": {"sigma_rels": list(TRACKED), "snapshot_every_images": every_images},
        },
        {"class_path": "diffscore.lit.callbacks.RunLog", "init_args": {"every_n_steps": 50}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
    ]
    return json.dumps(cbs)


def train(out: Path, setups, seeds, steps: dict[str, int], every_images: int, parallel: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    jobs = [(name, s) for s in seeds for name in setups]
    running: list[tuple[subprocess.Popen, str, float]] = []
    while jobs or running:
        while jobs and len(running) < parallel:
            name, seed = jobs.pop(0)
            run = out / f"{name}_s{seed}"
            if run.exists():
                raise SystemExit(f"{run} exists; choose another --out or remove it")
            run.mkdir(parents=True)
            config, extra = SETUPS[name]
            n = steps[name]
            args = [
                "fit",
                f"--config={REPO / config}",
                *extra,
                f"--seed_everything={seed}",
                f"--trainer.max_steps={n}",
                f"--data.init_args.epoch_size={n * 256}",
                f"--trainer.val_check_interval={n}",  # one validation, at the end
                "--trainer.accelerator=cpu",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={run}",
                f"--trainer.callbacks={callbacks(every_images, n)}",
            ]
            log = open(run / "stdout.txt", "w")
            cmd = ["nice", "-n", "10", sys.executable, "-c", "from diffscore.commands import main; main()", *args]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, run.name, time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            proc, name, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"{name}: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
                (out / name / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")


@torch.no_grad()
def model_metrics(ckpt: Path, n: int, ctx: dict) -> dict[str, float]:
    """FD-digits and memorization of N samples (the suite's functions, as `diffscore evaluate`) and the held-out
    loss (the module's own validation: 10 sigma buckets, fixed noise) of one checkpoint."""
    from lightning.pytorch import Trainer

    from diffscore.lit.modules import DiffusionModule
    from diffscore.loading.open import open_model
    from diffscore.metrics.digits_classifier import digits_features
    from diffscore.metrics.frechet import feature_statistics, frechet_distance
    from diffscore.metrics.suite import compute_metrics, sample_features

    loaded = open_model(ckpt)
    sampler = loaded.sampler()
    x = torch.cat([sampler.generate(list(range(i, min(i + 500, n)))).float() for i in range(0, n, 500)])
    # the module's own validation around the same (EMA) weights
    model = DiffusionModule(loaded.backbone, sigma_data=loaded.settings.get("sigma_data", 0.5)).eval()
    feats = sample_features(x, None, ctx["clf"], ctx["train"])
    feats["seeds"] = torch.arange(n)
    res = compute_metrics(feats, {"fd_digits", "memorization"}, ctx["ref"], [])
    out = {"fd_digits": res["fd_digits"], "memorized": res["memorized_fraction"], "nn_ratio": res["nn_ratio_median"]}
    if ctx.get("unseen_stats") is not None:
        stats = feature_statistics(digits_features(x.clamp(-1, 1), ctx["clf"]))
        out["fd_unseen"] = frechet_distance(*stats, *ctx["unseen_stats"])
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=ctx["dm"], verbose=False)
    out["heldout_loss"] = float(trainer.callback_metrics["val/loss"])
    out["gap"] = float(trainer.callback_metrics["gap/loss_mean"])
    return out


def context(ckpt: Path, digits300: bool) -> dict:
    """The reference data of a run: training digits, their statistics, the held-out and (digits300) unseen sets."""
    from diffscore.lit.datamodules.base import train_images
    from diffscore.lit.datamodules.from_file import model_datamodule
    from diffscore.lit.datamodules.tensor import heldout_images
    from diffscore.loading.open import open_model
    from diffscore.metrics.digits_classifier import digits_features, load_classifier
    from diffscore.metrics.frechet import feature_statistics
    from diffscore.metrics.suite import reference_statistics

    dm = model_datamodule(open_model(ckpt))
    clf = load_classifier()
    train, held = train_images(dm), heldout_images(dm)
    ref = reference_statistics({"fd_digits", "memorization"}, None, train, held, None, clf)
    unseen_stats = None
    if digits300:
        from bench.scoreaug import digits_sets

        sub, unseen, _ = digits_sets()
        assert torch.equal(sub, train), "the 300 digits of the config are not bench/scoreaug's"
        unseen_stats = feature_statistics(digits_features(unseen, clf))
    return {"dm": dm, "clf": clf, "train": train, "ref": ref, "unseen_stats": unseen_stats}


def tracked_check(tracked: dict, recon_dir: Path) -> dict[str, float]:
    """Distance of the reconstructions of the directly tracked 0.02 and 0.20 from them, relative to the distance
    between the tracked 0.05 and 0.10 averages (parameter space)."""
    names = list(tracked["names"])
    flat = {s: torch.cat([t.double().flatten() for t in e]) for s, e in zip(tracked["sigma_rels"], tracked["ema"])}
    scale = (flat[0.05] - flat[0.1]).norm()
    out = {}
    for s in (0.02, 0.20):
        rec = torch.load(recon_dir / f"phema-{s:.3f}.ckpt", weights_only=True)["state_dict"]
        r = torch.cat([rec[n].double().flatten() for n in names])
        out[f"{s:g}"] = float((r - flat[s]).norm() / scale)
        out[f"{s:g}_nearest_tracked"] = float(min((flat[s] - flat[t]).norm() for t in (0.05, 0.1)) / scale)
    return out


def tracked_averages(run: Path, at_images: int | None) -> dict:
    """The directly tracked averages: float32 from the run's checkpoint, or float16 from the snapshot at_images."""
    if at_images is None:
        return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PostHocEMA"]
    snap = torch.load(run / "phema" / f"phema-{at_images:012d}.pt", weights_only=True)
    return {
        "sigma_rels": snap["sigma_rels"],
        "names": list(snap["ema"][0]),
        "ema": [list(e.values()) for e in snap["ema"]],
    }


def evaluate_run(run: Path, n: int, at_images: int | None = None, base: Path | None = None) -> dict:
    """All measurements of one run (cached in <run>/phema_eval.json: a rerun only collects). An unfinished run
    (no checkpoint) is measured at ``at_images`` from its snapshots, with ``base`` (a checkpoint of the same
    config) giving configuration and buffers; it has no EDMEMA row."""
    from diffscore.commands.phema import phema
    from diffscore.io import write_json

    cache = run / "phema_eval.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    recon = run / "phema_out"
    own = run / "checkpoints" / "last.ckpt"
    base = own if base is None else base
    if not (recon / "phema.json").is_file():
        phema(str(run), list(GRID), str(recon), ckpt=str(base), from_sigma_rels=[0.05, 0.1], at_images=at_images)
    record = json.loads((recon / "phema.json").read_text())
    ctx = context(base, run.name.startswith("digits300"))
    rows = {"edmema": model_metrics(own, n, ctx)} if own.is_file() else {}
    for s in GRID:
        rows[f"{s:g}"] = model_metrics(recon / f"phema-{s:.3f}.ckpt", n, ctx)
        print(f"{run.name} sigma_rel {s:g}: {rows[f'{s:g}']}", flush=True)
    files = sorted((run / "phema").glob("phema-*.pt"))
    if at_images is not None:
        files = [f for f in files if int(f.stem.split("-")[1]) <= at_images]
    result = {
        "metrics": rows,
        "profile_error": {f"{t['sigma_rel']:g}": t["reconstruction_error"] for t in record["targets"]},
        "tracked_check": tracked_check(tracked_averages(run, at_images), recon),
        "snapshots": len(files),
        "snapshot_mb": sum(f.stat().st_size for f in files) / 2**20,
        "steps": record["targets"][0]["step"],
        "train_wall_s": float((run / "wall_s.txt").read_text()) if (run / "wall_s.txt").is_file() else None,
        "eval_s": time.perf_counter() - t0,
        "num_samples": n,
    }
    write_json(cache, result)
    return result


def evaluate(out: Path, n: int, only: list[str] | None, at_images: int | None, base: Path | None) -> dict:
    results = {"grid": list(GRID), "num_samples": n, "runs": {}}
    for run in sorted(p for p in out.iterdir() if (p / "phema").is_dir()):
        if only is None or run.name in only:
            results["runs"][run.name] = evaluate_run(run, n, at_images, base)
    return results


def plot(results: dict, path: Path) -> None:
    from diffscore.io import pyplot

    plt = pyplot()
    keys = [("fd_digits", "FD-digits vs the training digits"), ("fd_unseen", "FD-digits vs unseen digits (digits300)")]
    keys += [("memorized", "memorized fraction (NN ratio < 1/3)"), ("heldout_loss", "held-out EDM loss (10 sigmas)")]
    keys += [("gap", "held-out minus train loss")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    grid = results["grid"]
    for setup, color in (("quickstart", "tab:blue"), ("digits300", "tab:red")):
        runs = [r for name, r in results["runs"].items() if name.startswith(setup)]
        if not runs:
            continue
        for ax, (key, title) in zip(axes.flat, keys, strict=False):
            if key not in runs[0]["metrics"]["0.05"]:
                continue
            ys = np.array([[r["metrics"][f"{s:g}"][key] for s in grid] for r in runs])  # [seeds, grid]
            ax.errorbar(
                grid,
                ys.mean(0),
                ys.std(0),
                color=color,
                marker="o",
                ms=3,
                capsize=2,
                label=f"{setup} post hoc (n={len(runs)})",
            )
            if all("edmema" in r["metrics"] for r in runs):
                ref = np.array([r["metrics"]["edmema"][key] for r in runs])
                ax.axhline(ref.mean(), color=color, ls="--", lw=1, label=f"{setup} EDMEMA (run's own)")
            ax.set(title=title, xscale="log", xlabel="sigma_rel")
        err = np.array([[r["profile_error"][f"{s:g}"] for s in grid] for r in runs])
        axes[1, 2].plot(grid, err.mean(0), color=color, marker="o", ms=3, label=f"{setup}")
    axes[1, 2].set(
        title="relative L2 error of the reconstructed profile", xscale="log", yscale="log", xlabel="sigma_rel"
    )
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Post-hoc EMA from sigma_rel 0.05/0.10 snapshots: mean +- std over seeds, "
        f"{results['num_samples']} samples per point"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


class _Trainer:
    """What PostHocEMA reads of a Trainer (single process, no logger): enough to time its hooks alone."""

    def __init__(self, root: Path) -> None:
        self.global_step, self.world_size, self.accumulate_grad_batches = 0, 1, 1
        self.is_global_zero, self.logger, self.default_root_dir = True, None, str(root)


def cost(ckpt: Path, batch: int = 256, steps: int = 20) -> dict[str, float]:
    """Median CPU seconds (process time: less sensitive to a shared machine than wall time) of a quickstart
    training step (forward, backward, Adam; batch 256), of PostHocEMA's per-step update with 2 and 4 profiles,
    and of one float16 snapshot write, on this CPU."""
    import tempfile

    from diffscore.core.losses import edm_loss
    from diffscore.core.schedules import LogNormalSigma
    from diffscore.lit.callbacks import PostHocEMA
    from diffscore.lit.modules import DiffusionModule
    from diffscore.loading.open import open_model

    model = DiffusionModule(open_model(ckpt).backbone).train()  # the checkpoint's network, trainable
    model.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 1, 8, 8) * 2 - 1
    times: dict[str, list[float]] = {"train_step": []}
    for _ in range(steps):
        t0 = time.process_time()
        sigma = LogNormalSigma()(batch, device="cpu")
        loss = edm_loss(model.denoiser, x0, sigma, torch.randn_like(x0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times["train_step"].append(time.process_time() - t0)
    with tempfile.TemporaryDirectory() as root:
        for profiles in ((0.05, 0.10), TRACKED):
            cb, trainer = PostHocEMA(list(profiles), snapshot_every_images=10**12), _Trainer(Path(root))
            cb.on_train_start(trainer, model)
            key = f"update_{len(profiles)}_profiles"
            times[key] = []
            for _ in range(steps * 5):
                trainer.global_step += 1
                t0 = time.process_time()
                cb.on_train_batch_end(trainer, model, None, (x0,), 0)
                times[key].append(time.process_time() - t0)
            times[f"snapshot_write_{len(profiles)}_profiles"] = []
            for _ in range(5):
                t0 = time.process_time()
                cb.write_snapshot(trainer)
                times[f"snapshot_write_{len(profiles)}_profiles"].append(time.process_time() - t0)
    out = {k: float(np.median(v)) for k, v in times.items()}
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("train", "evaluate", "cost"), required=True)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "phema")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps_quickstart", type=int, default=600)
    p.add_argument("--steps_digits300", type=int, default=500)  # the YAML: 4,000; cut for the CPU budget
    p.add_argument("--snapshot_every_images", type=int, default=5120)  # 20 steps of 256
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--num_samples", type=int, default=300)
    p.add_argument("--plot", type=Path, default=REPO / "bench" / "phema_sweep")
    p.add_argument("--runs", nargs="+", default=None, help="evaluate only these run folders (names)")
    p.add_argument("--at_images", type=int, default=None, help="unfinished runs: the snapshot time to measure at")
    p.add_argument("--base", type=Path, default=None, help="unfinished runs: a checkpoint of the same config")
    a = p.parse_args()
    if a.stage == "train":
        steps = {"quickstart": a.steps_quickstart, "digits300": a.steps_digits300}
        train(a.out, a.setups, a.seeds, steps, a.snapshot_every_images, a.parallel)
    elif a.stage == "evaluate":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        from diffscore.io import write_json

        results = evaluate(a.out, a.num_samples, a.runs, a.at_images, a.base)
        write_json(a.plot.with_suffix(".json"), results)
        plot(results, a.plot.with_suffix(".png"))
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        result = cost(a.out / "quickstart_s0" / "checkpoints" / "last.ckpt")
        print(json.dumps(result, indent=1))
        from diffscore.io import write_json

        write_json(a.plot.parent / (a.plot.name + "_cost.json"), result)


if __name__ == "__main__":
    main()
