"""Training with `diffscore suggest-noise`'s settings vs EDM's defaults (issue 23): digits, gmm, synthetic score pages;
and (``--study sigma_data``, issue 34) the three candidate rules for sigma_data against EDM's 0.5.

    PYTHONPATH=. python bench/suggest_noise.py --out runs/suggest_noise --seeds 0 1 2 --parallel 2
    PYTHONPATH=. python bench/suggest_noise.py --out runs/suggest_noise --stage summarize --plot bench/suggest_noise
    PYTHONPATH=. python bench/suggest_noise.py --study sigma_data --tasks digits pages --out runs/sigma_data \
      --plot bench/sigma_data

The sigma_data study trains each task's config as shipped (EDM's P_mean, P_std, sigma_min, sigma_max) with only
``model.sigma_data`` changed: "edm" 0.5, "per_pixel" sqrt(tr(Sigma)/D), "pooled" the std of all values about their
one mean, "rms" sqrt(E||x0||^2 / D) (diffscore.core.noise_levels.data_scales of the training split).

For each task the suggestion is computed once from the config's training split (the command itself, its YAML then
passed as a second ``--config``); the "edm" arm is the config as shipped (sigma_data 0.5, P_mean -1.2, P_std 1.2,
sigma 0.002..80), the "suggested" arm the same config plus noise.yaml. Both arms train the same steps from the same
seeds (shortened runs, see STEPS/OVERRIDES). Measured from each last checkpoint's EMA weights, each arm sampling
with its own sigma_min/sigma_max (Heun, 18 steps):
  digits  FD-digits of 500 samples (SampleQuality's N) against the 1,437 training digits (diffscore.metrics'
          digits classifier)
  gmm     the exact-score error: ||D_net - D*||^2 / ||D* - x||^2 (D* the mixture's exact denoiser) on 4,096
          fresh mixture points noised at each of 13 sigmas in 0.01..10, averaged over the sigmas; and the MMD
          (RBF, bandwidth 0.1) between 2,000 samples and 2,000 fresh mixture points
  pages   the prompted-layout accuracy of bench/musicscore_guidance.py (w = 1, 200 held-out prompts; a logistic
          layout classifier trained on 2,000 fresh pages)
  all     the held-out denoising MSE per pixel at the config's val_sigmas (the logged loss / EDM's weight, so that
          arms with different sigma_data compare)
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
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "digits": REPO / "experiments" / "quickstart.yaml",
    "gmm": REPO / "experiments" / "gmm.yaml",
    "pages": REPO / "experiments" / "musicscore_synthetic.yaml",
}
STEPS = {"digits": 600, "gmm": 1500, "pages": 500}
OVERRIDES = {  # shortened runs for a shared 2-core CPU
    "digits": [],  # the quickstart as shipped (600 steps)
    "gmm": [],
    "pages": ["--model.init_args.backbone.init_args.channel_mult=[1,2]"],
}
PAGES_RESOLUTION = 16
ARMS = ["edm", "suggested"]  # the study's arms (--study sigma_data: SIGMA_DATA_ARMS)
SIGMA_DATA_ARMS = ["edm", "per_pixel", "pooled", "rms"]
CALLBACKS = [
    {"class_path": "diffscore.lit.callbacks.EDMEMA", "init_args": {"halflife_images": 500000, "rampup_ratio": 0.05}},
    {"class_path": "diffscore.lit.callbacks.RunLog", "init_args": {"every_n_steps": 50}},
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
]


def task_config(task: str, out: Path) -> Path:
    """The config a task trains with: the shipped one (pages: at PAGES_RESOLUTION, written beside the runs)."""
    if task != "pages":
        return CONFIGS[task]
    cfg = yaml.safe_load(CONFIGS[task].read_text())
    cfg["data"]["init_args"]["resolution"] = PAGES_RESOLUTION
    cfg["data"]["init_args"]["root"] = str(REPO / "datasets" / "musicscore-synthetic")
    path = out / f"pages_{PAGES_RESOLUTION}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def suggest(out: Path, tasks: list[str]) -> dict[str, dict]:
    from diffscore.commands.suggest_noise import suggest_noise

    return {t: suggest_noise(data_config=str(task_config(t, out)), out=str(out / t / "suggest")) for t in tasks}


def sigma_data_candidates(out: Path, tasks: list[str]) -> dict[str, dict[str, float]]:
    """{task: {arm: sigma_data}} of the sigma_data study, from each task's training split (written to
    <out>/<task>/sigma_data.json)."""
    from diffscore.core.gaussian import GaussianDenoiser
    from diffscore.core.noise_levels import data_scales
    from diffscore.lit.datamodules.base import train_images
    from diffscore.lit.datamodules.from_file import datamodule_from_section

    result = {}
    for task in tasks:
        dm = datamodule_from_section(yaml.safe_load(task_config(task, out).read_text())["data"])
        gaussian = GaussianDenoiser.from_data(train_images(dm))
        result[task] = {"edm": 0.5, **data_scales(gaussian.mean, gaussian.eigvals, gaussian.dim)}
        (out / task).mkdir(parents=True, exist_ok=True)
        (out / task / "sigma_data.json").write_text(json.dumps(result[task], indent=1))
        print(task, result[task], flush=True)
    return result


def fit_args(task: str, arm: str, seed: int, out: Path) -> list[str]:
    steps = STEPS[task]
    args = ["fit", f"--config={task_config(task, out)}"]
    if arm == "suggested":
        args.append(f"--config={out / task / 'suggest' / 'noise.yaml'}")
    elif arm in SIGMA_DATA_ARMS and (out / task / "sigma_data.json").is_file():
        value = json.loads((out / task / "sigma_data.json").read_text())[arm]
        args.append(f"--model.init_args.sigma_data={value:.6g}")
    return args + [
        f"--seed_everything={seed}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out / task / f'{arm}_s{seed}'}",
        f"--trainer.callbacks={json.dumps(CALLBACKS)}",
        *OVERRIDES[task],
    ]


def launch(out: Path, tasks: list[str], seeds: list[int], parallel: int) -> None:
    jobs = [(t, a, s) for t in tasks for s in seeds for a in ARMS]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // parallel)), "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    running: list[tuple[subprocess.Popen, str, float]] = []
    while jobs or running:
        while jobs and len(running) < parallel:
            task, arm, seed = jobs.pop(0)
            run = out / task / f"{arm}_s{seed}"
            if run.exists():
                raise SystemExit(f"{run} exists; choose another --out or remove it")
            run.mkdir(parents=True)
            cmd = ["nice", "-n", "10", sys.executable, "-m", "diffscore.commands", *fit_args(task, arm, seed, out)]
            log = open(run / "stdout.txt", "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running.append((proc, str(run.relative_to(out)), time.time()))
        time.sleep(2)
        for item in list(running):
            if item[0].poll() is not None:
                running.remove(item)
                print(f"{item[1]}: exit {item[0].returncode} after {time.time() - item[2]:.0f} s", flush=True)


def heldout_mse(run: Path, sigma_data: float) -> dict[str, float]:
    """The last validation's held-out denoising MSE per pixel at each val sigma (loss / EDM's weight)."""
    from diffscore.core.losses import edm_loss_weight
    from diffscore.lit.callbacks.run_log import read_jsonl

    last = {}
    for record in read_jsonl(next(run.glob("**/metrics.jsonl"))):
        last.update({k: v for k, v in record.items() if k.startswith("heldout/loss_s")})
    out = {}
    for key, loss in last.items():
        s = float(key.removeprefix("heldout/loss_s"))
        out[f"{s:g}"] = loss / float(edm_loss_weight(torch.tensor(s, dtype=torch.float64), sigma_data))
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


@torch.no_grad()
def digits_metrics(model, ctx: dict) -> dict[str, float]:
    from diffscore.metrics.digits_classifier import fd_digits

    x = model.sampler().generate(list(range(500))).float().cpu()
    return {"fd_digits": fd_digits(x, ctx["train"], ctx["clf"])}


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> float:
    """The (biased) squared maximum mean discrepancy with k(x, y) = exp(-||x - y||^2 / (2 h^2))."""

    def k(x, y):
        return torch.exp(-(torch.cdist(x, y) ** 2) / (2 * bandwidth**2)).mean()

    return float(k(a, a) + k(b, b) - 2 * k(a, b))


@torch.no_grad()
def gmm_metrics(model, ctx: dict) -> dict[str, float]:
    mixture = ctx["mixture"]
    g = torch.Generator().manual_seed(123)
    x0 = mixture.sample(4096, generator=g)  # [N, D] float64
    per_sigma = {}
    for s in np.geomspace(0.01, 10, 13):
        x = x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        sig = torch.full((len(x),), float(s))
        d_net = model.network(x.float(), sig).double()
        d_ref = mixture(x, sig)
        per_sigma[f"{s:.3g}"] = float(((d_net - d_ref) ** 2).sum() / ((d_ref - x) ** 2).sum())
    samples = model.sampler().generate(list(range(2000))).double().cpu()
    fresh = mixture.sample(2000, generator=g)
    return {
        "score_error": float(np.mean(list(per_sigma.values()))),
        "score_error_per_sigma": per_sigma,
        "mmd": mmd_rbf(samples, fresh, 0.1),
        "mmd_floor": mmd_rbf(mixture.sample(2000, generator=g), fresh, 0.1),
    }


@torch.no_grad()
def pages_metrics(model, ctx: dict) -> dict[str, float]:
    from bench.musicscore_guidance import pixels
    from diffscore.sampling.options import SamplingOptions

    captions, target = ctx["captions"], ctx["target"]
    sampler = model.sampler(SamplingOptions(steps=18), prompts=captions)
    samples = sampler.generate(list(range(len(captions))))
    pred = ctx["clf"].predict(pixels(samples.float().cpu()))
    return {"layout_accuracy": float((pred == target).mean())}


def task_context(task: str, out: Path) -> dict:
    """What a task's metric needs, built once: reference digits, the exact mixture, the layout classifier."""
    from diffscore.lit.datamodules.base import train_images
    from diffscore.lit.datamodules.from_file import datamodule_from_section

    dm = datamodule_from_section(yaml.safe_load(task_config(task, out).read_text())["data"])
    if task == "digits":
        from diffscore.metrics.digits_classifier import load_classifier

        return {"train": train_images(dm), "clf": load_classifier()}
    if task == "gmm":
        return {"mixture": dm.mixture}
    from bench.musicscore_guidance import layout_of, train_classifier
    from diffscore.data.musicscore import find_scale_dir, index_split, read_metadata

    clf, clf_acc = train_classifier(PAGES_RESOLUTION, 2000, seed=12345)
    scale_dir = find_scale_dir(yaml.safe_load(task_config(task, out).read_text())["data"]["init_args"]["root"])
    meta = read_metadata(scale_dir / "metadata.json")
    captions = [pg.caption for split in ("test", "val") for pg in index_split(scale_dir, split, meta)][:200]
    target = np.array([layout_of(c) for c in captions])
    chance = float(np.bincount(target, minlength=3).max() / len(target))
    return {"clf": clf, "classifier_accuracy": clf_acc, "captions": captions, "target": target, "chance": chance}


METRICS = {"digits": digits_metrics, "gmm": gmm_metrics, "pages": pages_metrics}


def measure(out: Path, tasks: list[str], seeds: list[int]) -> dict:
    from diffscore.loading.open import open_model

    torch.set_num_threads(2)
    result = {"steps": STEPS, "overrides": OVERRIDES, "pages_resolution": PAGES_RESOLUTION, "tasks": {}}
    for task in tasks:
        ctx = task_context(task, out)
        settings = out / task / ("suggest/noise.json" if "suggested" in ARMS else "sigma_data.json")
        entry = {"suggested": json.loads(settings.read_text()), "runs": {}}
        entry.update({k: ctx[k] for k in ("classifier_accuracy", "chance") if k in ctx})
        for arm in ARMS:
            for seed in seeds:
                run = out / task / f"{arm}_s{seed}"
                cached = run / "bench_metrics.json"  # measured once: a later summary reuses it
                if cached.is_file():
                    entry["runs"][f"{arm}_s{seed}"] = json.loads(cached.read_text())
                    continue
                t0 = time.time()
                model = open_model(next(run.glob("**/checkpoints/last.ckpt")))
                row = METRICS[task](model, ctx)
                row["heldout_mse"] = heldout_mse(run, float(model.network.sigma_data))
                row["seconds"] = round(time.time() - t0, 1)
                cached.write_text(json.dumps(row, indent=1))
                entry["runs"][f"{arm}_s{seed}"] = row
                print(task, arm, seed, {k: v for k, v in row.items() if not isinstance(v, dict)}, flush=True)
        result["tasks"][task] = entry
    return result


def summarize(result: dict) -> None:
    """Per task and arm: mean and std over seeds of the scalar metrics, and the held-out MSE ratio."""
    for entry in result["tasks"].values():
        entry["summary"] = {}
        for arm in ARMS:
            rows = [r for name, r in entry["runs"].items() if name.startswith(arm + "_")]
            stats = {}
            for key in rows[0]:
                if isinstance(rows[0][key], float) and key != "seconds":
                    values = [r[key] for r in rows]
                    stats[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
            entry["summary"][arm] = stats
        mse = {arm: _mean_mse(entry, arm) for arm in ARMS}
        entry["heldout_mse_mean_over_seeds"] = mse
        for arm in ARMS[1:]:  # geometric mean over the val sigmas of arm / edm
            ratios = [mse[arm][s] / mse["edm"][s] for s in mse["edm"]]
            key = "heldout_mse_ratio_geomean" + ("" if arm == "suggested" else f"_{arm}")
            entry[key] = float(np.exp(np.mean(np.log(ratios))))


def _mean_mse(entry: dict, arm: str) -> dict[str, float]:
    rows = [r["heldout_mse"] for name, r in entry["runs"].items() if name.startswith(arm + "_")]
    return {s: float(np.mean([r[s] for r in rows])) for s in rows[0]}


def plot(result: dict, path: Path) -> None:
    from diffscore.io import pyplot

    plt = pyplot()
    main = {"digits": "fd_digits", "gmm": "score_error", "pages": "layout_accuracy"}
    tasks = list(result["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.4), squeeze=False)
    for j, task in enumerate(tasks):
        entry, key = result["tasks"][task], main[task]
        ax = axes[0][j]
        for i, arm in enumerate(ARMS):
            stats = entry["summary"][arm][key]
            ax.bar(i, stats["mean"], yerr=stats["std"], color=f"C{i}", alpha=0.6, capsize=4)
            ax.plot([i] * len(stats["values"]), stats["values"], "k.", ms=5)
        ax.set_xticks(range(len(ARMS)), ARMS)
        ax.set_title(f"{task}: {key} ({STEPS[task]} steps, {len(stats['values'])} seeds)", fontsize=9)
        if "chance" in entry:
            ax.axhline(entry["chance"], color="gray", ls="--", lw=1, label="majority layout")
            ax.legend(fontsize=7)
        ax = axes[1][j]
        for i, arm in enumerate(ARMS):
            mse = entry["heldout_mse_mean_over_seeds"][arm]
            ax.loglog([float(s) for s in mse], list(mse.values()), marker="o", ms=3, color=f"C{i}", label=arm)
        ax.set_xlabel("sigma")
        ax.set_ylabel("held-out MSE per coordinate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/suggest_noise")
    p.add_argument("--tasks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--stage", default="all", choices=["all", "train", "summarize"])
    p.add_argument("--plot", default="bench/suggest_noise", help="writes <plot>.json and <plot>.png")
    p.add_argument("--max_steps", type=int, help="the same step count for every task (a smoke test)")
    p.add_argument("--steps", nargs="*", default=[], help="per-task step counts, e.g. gmm=1000 pages=300")
    p.add_argument("--study", default="suggest", choices=["suggest", "sigma_data"])
    p.add_argument(
        "--override", nargs="*", default=[], help="per-task fit options, e.g. digits=--data.init_args.batch_size=128"
    )
    args = p.parse_args()
    for task, _, option in (item.partition("=") for item in args.override):
        OVERRIDES[task].append(option)
    if args.study == "sigma_data":
        ARMS[:] = SIGMA_DATA_ARMS
    if args.max_steps:
        STEPS.update({t: args.max_steps for t in STEPS})
    STEPS.update({k: int(v) for k, _, v in (item.partition("=") for item in args.steps)})
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.stage in ("all", "train"):
        sigma_data_candidates(out, args.tasks) if args.study == "sigma_data" else suggest(out, args.tasks)
        launch(out, args.tasks, args.seeds, args.parallel)
        print(f"trained in {time.time() - t0:.0f} s", flush=True)
    if args.stage in ("all", "summarize"):
        result = measure(out, args.tasks, args.seeds)
        summarize(result)
        result["wall_seconds"] = round(time.time() - t0, 1)
        Path(f"{args.plot}.json").write_text(json.dumps(result, indent=1))
        plot(result, Path(f"{args.plot}.png"))
        print(f"wrote {args.plot}.json and {args.plot}.png", flush=True)


if __name__ == "__main__":
    main()
