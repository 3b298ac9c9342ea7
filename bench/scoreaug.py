"""ScoreAug vs its baselines on data-limited digits (issue 5): four arms x several seeds, same steps.

    python bench/scoreaug.py --out runs/scoreaug --seeds 0 1 2 --parallel 12     # trains, then summarises
    python bench/scoreaug.py --out runs/scoreaug --stage summarize --plot bench/scoreaug

Each run is `diffscore fit --config experiments/digits_scoreaug.yaml` with the arm's ``--model.init_args.augment`` and
``--seed_everything S`` (the same 300 training digits for every run). From every saved checkpoint (EMA weights)
the summary draws N samples (Heun, 35 NFE) and measures: FD-digits against the 300 training digits and against
the 1,497 digits the model never saw (the fair one in a data-limited regime: a copy machine scores well on the
first), the memorized fraction, and the leakage check (orientation classifier; real held-out digits beside it);
from <run>/metrics.jsonl it reads the held-out minus train denoising loss per sigma over training.
Writes <plot>.json and <plot>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ARMS = ("none", "nonleaky", "scoreaug", "nonleaky+scoreaug")
CONFIG = REPO / "experiments" / "digits_scoreaug.yaml"


_NONLEAKY = '{"class_path": "diffscore.core.augment.NonLeakyAugment", "init_args": {"p": 0.12}}'
_SCOREAUG = (
    '{"class_path": "diffscore.core.augment.ScoreAugment", "init_args": {"mode": "one_of", "translate_frac": 0.125,'
    ' "translate_padding": "zero", "cutout_frac": [0.25, 0.375], "brightness": [0.8333333, 1.2]}}'
)
ARM_AUGMENTERS = {  # the four arms as model.augment lists (the settings of experiments/digits_scoreaug.yaml)
    "none": "[]",
    "nonleaky": f"[{_NONLEAKY}]",
    "scoreaug": f"[{_SCOREAUG}]",
    "nonleaky+scoreaug": f"[{_NONLEAKY}, {_SCOREAUG}]",
}


def launch(out: Path, arms, seeds, steps: int, parallel: int, accelerator: str, overrides: list[str]) -> None:
    jobs = [(arm, s) for s in seeds for arm in arms]
    running: list[tuple[subprocess.Popen, str]] = []
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "disabled",
    }
    while jobs or running:
        while jobs and len(running) < parallel:
            arm, seed = jobs.pop(0)
            name = f"{arm.replace('+', '_')}_s{seed}"
            if (out / name).exists():  # never mix two runs' checkpoints and metrics
                raise SystemExit(f"{out / name} exists; choose another --out or remove it")
            (out / name).mkdir(parents=True)
            args = [
                "fit",
                f"--config={CONFIG}",
                f"--model.init_args.augment={ARM_AUGMENTERS[arm]}",
                f"--seed_everything={seed}",
                f"--trainer.max_steps={steps}",
                f"--data.init_args.epoch_size={steps * 256}",
                f"--trainer.accelerator={accelerator}",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={out / name}",
                *overrides,
            ]
            log = open(out / name / "stdout.txt", "w")
            cmd = [sys.executable, "-c", "from diffscore.commands import main; main()", *args]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), name))
        time.sleep(2)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"{name}: exit {proc.returncode}", flush=True)


def digits_sets(num_train: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the training subset, the digits never trained on, the held-out val+test digits) of the config."""
    from diffscore.data.digits import load_digits_tensors
    from diffscore.data.splits import split_indices, subset

    images, _ = load_digits_tensors()
    idx = split_indices(len(images), 0.1, 0.1, seed)
    train = subset(idx["train"], num_train, seed)
    unseen = torch.ones(len(images), dtype=torch.bool)
    unseen[train] = False
    return images[train], images[unseen], images[torch.cat([idx["val"], idx["test"]])]


@torch.no_grad()
def checkpoint_metrics(ckpt: Path, n: int, sets, device: str) -> dict[str, float]:
    from diffscore.loading.open import open_model
    from diffscore.metrics.digits_classifier import digits_features, load_classifier
    from diffscore.metrics.frechet import feature_statistics, frechet_distance
    from diffscore.metrics.leakage import leaked
    from diffscore.metrics.memorization import copy_ratio, memorized_fraction

    train, unseen, _ = sets
    loaded = open_model(ckpt)
    loaded.network.to(device)
    sampler = loaded.sampler()
    x = torch.cat([sampler.generate(list(range(i, min(i + 1000, n)))).float() for i in range(0, n, 1000)]).cpu()
    clf = load_classifier()
    stats = feature_statistics(digits_features(x, clf))
    return {
        "fd_train": frechet_distance(*stats, *feature_statistics(digits_features(train, clf))),
        "fd_unseen": frechet_distance(*stats, *feature_statistics(digits_features(unseen, clf))),
        "memorized": memorized_fraction(copy_ratio(x, train)),
        "leakage": float(leaked(x).float().mean()),
    }


def summarize(out: Path, n: int, device: str) -> dict:
    from diffscore.lit.callbacks.run_log import read_jsonl
    from diffscore.metrics.digits_classifier import digits_features, load_classifier
    from diffscore.metrics.frechet import feature_statistics, frechet_distance
    from diffscore.metrics.leakage import leaked

    sets = digits_sets()
    train, unseen, held = sets
    clf = load_classifier()

    def fd(a, b):
        return frechet_distance(
            *feature_statistics(digits_features(a, clf)), *feature_statistics(digits_features(b, clf))
        )

    floors = {
        "fd_train_of_heldout": fd(held, train),  # 360 real held-out digits vs the training 300
        "fd_unseen_of_train": fd(train, unseen),  # what copying the training set scores on fd_unseen
        "leakage_real_heldout": float(leaked(held).float().mean()),
    }
    runs = {}
    for run in sorted(p for p in out.iterdir() if p.is_dir()):
        m = re.match(r"(.+)_s(\d+)$", run.name)
        if not m:
            continue
        arm, seed = m.group(1).replace("_", "+"), int(m.group(2))
        rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        gap = [r for r in rows if "gap/loss_mean" in r]
        ckpts = {int(re.search(r"step=(\d+)", p.stem).group(1)): p for p in run.glob("checkpoints/epoch=*-step=*.ckpt")}
        if not ckpts and (run / "checkpoints" / "last.ckpt").is_file():  # a run shorter than one interval
            last = run / "checkpoints" / "last.ckpt"
            ckpts[torch.load(last, map_location="cpu", weights_only=True)["global_step"]] = last
        evals = {}
        for step, ckpt in sorted(ckpts.items()):
            evals[step] = checkpoint_metrics(ckpt, n, sets, device)
            print(f"{run.name} step {step}: {evals[step]}", flush=True)
        runs[run.name] = {"arm": arm, "seed": seed, "validation": gap, "samples": evals}
    return {"num_samples": n, "floors": floors, "runs": runs}


def plot(summary: dict, path: Path) -> None:
    from diffscore.io import pyplot

    plt = pyplot()

    runs = summary["runs"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    colors = dict(zip(ARMS, ["tab:gray", "tab:blue", "tab:red", "tab:purple"], strict=True))

    def by_arm():
        for arm in ARMS:
            rs = [r for r in runs.values() if r["arm"] == arm]
            if rs:
                yield arm, rs

    def band(ax, arm, xs, ys):
        ys = np.array(ys, dtype=float)
        mean, std = ys.mean(0), ys.std(0)
        ax.plot(xs, mean, color=colors[arm], marker="o", ms=3, label=f"{arm} (n={len(ys)})")
        ax.fill_between(xs, mean - std, mean + std, color=colors[arm], alpha=0.2)

    for arm, rs in by_arm():
        rs = [r for r in rs if r["validation"] and r["samples"]]
        if not rs:
            continue
        steps = [r["step"] for r in rs[0]["validation"]]
        k = min(len(r["validation"]) for r in rs)
        band(axes[0, 0], arm, steps[:k], [[v["gap/loss_mean"] for v in r["validation"][:k]] for r in rs])
        last = [r["validation"][k - 1] for r in rs]
        sig = sorted({float(key.split("_s")[1]) for key in last[0] if key.startswith("gap/loss_s")})
        band(axes[0, 1], arm, sig, [[v[f"gap/loss_s{s:g}"] for s in sig] for v in last])
        ck = sorted(set.intersection(*(set(r["samples"]) for r in rs)), key=int)
        for ax, key in zip(axes[1], ("fd_unseen", "memorized", "leakage"), strict=True):
            band(ax, arm, [int(c) for c in ck], [[r["samples"][c][key] for c in ck] for r in rs])
        band(axes[0, 2], arm, [int(c) for c in ck], [[r["samples"][c]["fd_train"] for c in ck] for r in rs])
    axes[0, 0].set(title="held-out minus train loss (mean over sigma buckets)", xlabel="step")
    axes[0, 1].set(title="held-out minus train loss at the last validation", xlabel="sigma", xscale="log")
    axes[0, 2].set(title="FD-digits vs the 300 training digits", xlabel="step")
    axes[1, 0].set(title="FD-digits vs the 1,497 unseen digits", xlabel="step")
    axes[1, 1].set(title="memorized fraction (NN ratio < 1/3)", xlabel="step")
    axes[1, 2].set(title="leakage: samples that look rotated/mirrored", xlabel="step")
    axes[1, 2].axhline(summary["floors"]["leakage_real_heldout"], color="k", ls="--", lw=1, label="real digits")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"ScoreAug on 300 digits: mean +- std over seeds; {summary['num_samples']} samples per point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(summary: dict) -> str:
    lines = ["| arm | seeds | gap (mean) | gap at 0.05 / 0.2 / 1 | FD unseen | FD train | memorized | leakage |"]
    lines.append("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for arm in ARMS:
        rs = [r for r in summary["runs"].values() if r["arm"] == arm and r["validation"] and r["samples"]]
        if not rs:
            continue
        last_v = [r["validation"][-1] for r in rs]
        last_s = [r["samples"][max(r["samples"], key=int)] for r in rs]

        def ms(values, fmt="{:.3f}"):
            return f"{fmt.format(np.mean(values))} +- {fmt.format(np.std(values))}"

        gaps = " / ".join(f"{np.mean([v[f'gap/loss_s{s:g}'] for v in last_v]):.3f}" for s in (0.05, 0.2, 1.0))
        lines.append(
            f"| {arm} | {len(rs)} | {ms([v['gap/loss_mean'] for v in last_v])} | {gaps} | "
            f"{ms([s['fd_unseen'] for s in last_s], '{:.2f}')} | {ms([s['fd_train'] for s in last_s], '{:.2f}')} | "
            f"{ms([s['memorized'] for s in last_s])} | {ms([s['leakage'] for s in last_s])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/scoreaug"), help="folder of the runs")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--parallel", type=int, default=1, help="runs at once")
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--num_samples", type=int, default=2000, help="samples per checkpoint evaluation")
    ap.add_argument(
        "--stage",
        choices=["all", "train", "summarize", "plot"],
        default="all",
        help="train: only the runs; summarize: only evaluate existing runs; plot: redraw from <plot>.json",
    )
    ap.add_argument("--override", nargs="*", default=[], help="more `diffscore fit` options, e.g. =--trainer.x=1")
    ap.add_argument("--plot", type=Path, default=Path("bench/scoreaug"), help="writes <plot>.json and .png")
    args = ap.parse_args()
    if args.stage == "plot":
        summary = json.loads(args.plot.with_suffix(".json").read_text())
        plot(summary, args.plot.with_suffix(".png"))
        print(table(summary))
        return
    if args.stage in ("all", "train"):
        t0 = time.perf_counter()
        launch(args.out, args.arms, args.seeds, args.steps, args.parallel, args.accelerator, args.override)
        print(f"training: {time.perf_counter() - t0:.0f} s", flush=True)
        if args.stage == "train":
            return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = summarize(args.out, args.num_samples, device)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    args.plot.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    try:
        plot(summary, args.plot.with_suffix(".png"))
    except ImportError as e:  # a GPU image without matplotlib: redraw later with --from-json
        print(f"no plot ({e})")
    print(table(summary))
    print(f"floors: {summary['floors']}")


if __name__ == "__main__":
    main()
