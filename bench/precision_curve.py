"""Does bf16 training (+ channels-last, torch.compile, fused Adam: the GPU configs' defaults) follow fp32's loss
curve within the seed-to-seed spread? The DDPM++ CIFAR-10 network, 2,000 steps (issue 10).

    python bench/precision_curve.py --out runs/precision --seeds 1     # one seed, fp32 beside bf16: ~6 min on an H100
    python bench/precision_curve.py --out runs/a runs/b --stage plot --plot bench/precision_curve   # pool, plot

Data: scikit-learn's 1,797 digits (the real images at hand offline) upscaled to 32x32 and repeated over 3
channels, in [-1, 1]. A seed fixes the initial weights, the batches, the sigmas and the noise, so the fp32 and
bf16 runs of one seed differ in arithmetic only. Every ``--eval-every`` steps each run's weights are scored in
float32 without dropout on one fixed set (the same 512 images, sigmas and noise for every run): the held-out
EDM loss, far less noisy than the training loss (whose mean between evaluations is logged beside it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.throughput import MODES  # noqa: E402
from diffscore.core.losses import edm_loss  # noqa: E402
from diffscore.core.precond import EDMPrecond  # noqa: E402
from diffscore.core.schedules import LogNormalSigma  # noqa: E402
from diffscore.data.digits import load_digits_tensors  # noqa: E402
from diffscore.networks import UNet  # noqa: E402

ARMS = {"fp32": MODES["fp32"], "bf16": MODES["bf16+cl+compile"]}  # exactly the modes throughput.py times


def digits32(device: str) -> torch.Tensor:
    """The 1,797 digits as [N, 3, 32, 32] in [-1, 1] (bilinear 8 -> 32)."""
    x, _ = load_digits_tensors()  # [N, 1, 8, 8] in [-1, 1]
    return F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(-1, 1).repeat(1, 3, 1, 1).to(device)


def train(
    arm: str, seed: int, steps: int, batch: int, lr: float, eval_every: int, out: Path, device: str, eval_size: int
) -> None:
    """One run; appends a JSON line per evaluation to ``out`` (so a run cut short keeps its curve)."""
    mode = ARMS[arm]
    dtype, channels_last = mode["dtype"], mode["channels_last"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.benchmark = True
    data = digits32(device)
    g_eval = torch.Generator(device).manual_seed(12345)  # the same held-out set for every run
    idx = torch.randperm(len(data), generator=g_eval, device=device)[:eval_size]
    eval_x0 = data[idx]
    law = LogNormalSigma()
    eval_sigma = law(len(idx), device=device, generator=g_eval)
    eval_noise = torch.randn(eval_x0.shape, device=device, generator=g_eval)

    torch.manual_seed(seed)
    net = UNet(data_shape=[3, 32, 32], channel_mult=[2, 2, 2], dropout=0.13).to(device)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    denoiser = EDMPrecond(net.to(memory_format=mem))
    fwd = torch.compile(denoiser) if mode["compile"] and device == "cuda" else denoiser
    opt = torch.optim.Adam(net.parameters(), lr=lr, fused=mode["fused"])
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator(device).manual_seed(seed)  # batches, sigmas and noise: the same in both arms

    def held_out() -> float:
        net.eval()
        with torch.no_grad():
            loss = edm_loss(denoiser, eval_x0.contiguous(memory_format=mem), eval_sigma, eval_noise).mean()
        net.train()
        return loss.item()

    out.unlink(missing_ok=True)
    running, t0 = torch.zeros((), device=device), time.perf_counter()
    for step in range(steps + 1):
        if step % eval_every == 0:
            row = {"arm": arm, "seed": seed, "step": step, "held_out": held_out(), "sec": time.perf_counter() - t0}
            row["train"] = running.item() / eval_every if step else None
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            running.zero_()
        if step == steps:
            break
        x0 = data[torch.randint(len(data), (batch,), device=device, generator=gen)].contiguous(memory_format=mem)
        sigma = law(batch, device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = edm_loss(fwd, x0, sigma, noise).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.detach()


def load(folders: list[Path]) -> dict[str, dict[int, dict]]:
    """Every run's evaluations, step -> row, keyed "<arm>-<seed>" (prefixed by the folder when several)."""
    runs = {}
    for folder in folders:
        for path in sorted(folder.glob("*.jsonl")):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            if rows:
                name = path.stem if len(folders) == 1 else f"{folder.name}/{path.stem}"
                runs[name] = {r["step"]: r for r in rows}
    return runs


def summarize(folders: list[Path]) -> dict:
    """Per evaluation step: each arm's mean held-out loss over the runs that reached it, its range and count;
    with two arms, the gap of the means and Welch's t for it (when each arm has two runs or more)."""
    runs = load(folders)
    arm_of = {name: next(iter(rows.values()))["arm"] for name, rows in runs.items()}
    arms = sorted(set(arm_of.values()))
    steps = sorted({step for rows in runs.values() for step in rows})
    table = []
    print(f"{'step':>6}" + "".join(f"{a + ' mean':>11}{'range':>8}{'n':>3}" for a in arms) + f"{'|diff|':>9}{'t':>7}")
    for step in steps:
        row, vals = {"step": step}, {}
        for arm in arms:
            vals[arm] = [rows[step]["held_out"] for name, rows in runs.items() if arm_of[name] == arm and step in rows]
            v = vals[arm]
            row[arm] = {"mean": statistics.mean(v), "range": max(v) - min(v), "n": len(v)} if v else None
        cells = "".join(
            f"{row[a]['mean']:>11.4f}{row[a]['range']:>8.4f}{row[a]['n']:>3}" if row[a] else f"{'-':>22}" for a in arms
        )
        if len(arms) == 2 and all(row[a] for a in arms):
            row["diff"] = abs(row[arms[0]]["mean"] - row[arms[1]]["mean"])
            a, b = (vals[arm] for arm in arms)
            if min(len(a), len(b)) > 1:  # Welch: the gap over its standard error, each arm's own variance
                se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
                if se > 0:
                    row["welch_t"] = (statistics.mean(a) - statistics.mean(b)) / se
        table.append(row)
        print(f"{step:>6}{cells}{row.get('diff', float('nan')):>9.4f}{row.get('welch_t', float('nan')):>7.2f}")
    return {"table": table, "runs": {name: list(rows.values()) for name, rows in runs.items()}}


def plot(summary: dict, stem: Path) -> None:
    from diffscore.io import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"fp32": "tab:blue", "bf16": "tab:orange"}
    for rows in summary["runs"].values():
        arm = rows[0]["arm"]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["held_out"] for r in rows], color=colors.get(arm), alpha=0.8, lw=1)
        train = [(r["step"], r["train"]) for r in rows if r["train"] is not None]
        axes[1].plot(*zip(*train, strict=True), color=colors.get(arm), alpha=0.8, lw=1)
    for arm, c in colors.items():
        axes[0].plot([], [], color=c, label=arm)
    axes[0].set(xlabel="step", ylabel="held-out EDM loss (fixed set, fp32 eval)", yscale="log")
    axes[1].set(xlabel="step", ylabel="training loss (mean since last point)", yscale="log")
    axes[0].legend(title="one line per seed")
    fig.suptitle("DDPM++ CIFAR-10 network on upscaled digits: fp32 vs bf16 + channels-last + compile")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, nargs="+", required=True, help="folder of the runs' JSON lines (several: pooled)"
    )
    ap.add_argument("--stage", choices=["all", "train", "summarize", "plot"], default="all")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate after a linear warm-up (5%%)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-size", type=int, default=512, help="images in the fixed held-out set")
    ap.add_argument(
        "--parallel", type=int, default=2, help="runs at once (0: all); a compiling run leaves the GPU idle"
    )
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test, without compile)")
    ap.add_argument("--plot", type=Path, default=REPO / "bench" / "precision_curve", help="png/json stem")
    ap.add_argument("--run", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)  # one child run
    args = ap.parse_args()
    if args.run:
        arm, seed = args.run[0], int(args.run[1])
        path = args.out[0] / f"{arm}-{seed}.jsonl"
        train(arm, seed, args.steps, args.batch, args.lr, args.eval_every, path, args.device, args.eval_size)
        return
    if args.stage in ("all", "train"):
        if len(args.out) > 1:
            sys.exit("--out: one folder to train into (several only to summarize or plot)")
        args.out[0].mkdir(parents=True, exist_ok=True)
        common = ["--out", str(args.out[0]), "--steps", str(args.steps), "--batch", str(args.batch)]
        common += ["--lr", str(args.lr), "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size)]
        common += ["--device", args.device]
        runs = [(arm, seed) for seed in args.seeds for arm in args.arms]  # arms interleaved: fp32 beside bf16
        width = args.parallel or len(runs)
        for i in range(0, len(runs), width):  # processes time-slice one GPU: more at once is not faster
            procs = [
                subprocess.Popen([sys.executable, __file__, *common, "--run", a, str(s)])
                for a, s in runs[i : i + width]
            ]
            if any(p.wait() for p in procs):
                sys.exit("a run failed (its output is above)")
    summary = summarize(args.out)
    if args.stage in ("all", "plot"):
        plot(summary, args.plot)


if __name__ == "__main__":
    main()
