"""DisBack vs Diff-Instruct on the digits: FD-digits of the one-step generator against generator iterations.

    python bench/disback.py --teacher runs/teacher/last.ckpt --device cpu --out bench/disback

From one digits teacher (a `diffscore fit` checkpoint; its EMA weights), for each seed and each method, a
DisBackModule is built in Python (no CLI: this runs where jsonargparse/wandb are absent) and fitted; every
``--eval_every`` generator steps the generator's FD-digits is measured on ``--eval_samples`` fixed seeds
against the digits training split (the same statistics as `diffscore evaluate --metrics fd_digits`). The
teacher's own FD with Heun (``--teacher_steps`` 18 -> 35 NFE) on the same seeds is the reference line.
DisBack's stage 1 (``num_path * record_interval`` fake-score steps with G frozen) comes before its generator
step 0 and is reported as extra cost. Writes <out>.json and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer

from diffscore.lit.datamodules.base import train_images
from diffscore.lit.datamodules.from_file import model_datamodule
from diffscore.lit.datamodules.tensor import heldout_images
from diffscore.lit.modules.disback import DisBackModule
from diffscore.loading.open import open_model
from diffscore.metrics.digits_classifier import load_classifier
from diffscore.metrics.suite import compute_metrics, reference_statistics
from diffscore.sampling.options import SamplingOptions


class FDDigits:
    """FD-digits of images against the digits training split, as `diffscore evaluate` computes it."""

    def __init__(self, teacher_ckpt: str, device: torch.device) -> None:
        self.dm = model_datamodule(open_model(teacher_ckpt))
        self.device = device
        self.digits = load_classifier(device=device)
        train = train_images(self.dm).to(device)
        self.ref = reference_statistics({"fd_digits"}, None, train, heldout_images(self.dm), None, self.digits)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        feats = {
            "seeds": torch.arange(len(images)),
            "digits": self.digits.features(images.to(self.device).float().clamp(-1, 1)).double().cpu(),
        }
        return compute_metrics(feats, {"fd_digits"}, self.ref, [])["fd_digits"]


class FDCurve(Callback):
    """FD-digits of the one-step generator every ``every`` generator steps (and at step 0)."""

    def __init__(self, fd: FDDigits, seeds: list[int], every: int) -> None:
        self.fd, self.seeds, self.every = fd, seeds, every
        self.points: list[tuple[int, float]] = []
        self.stage1_seconds = 0.0
        self._t0 = 0.0

    def measure(self, module: DisBackModule) -> None:
        self.points.append((int(module.generator_step), self.fd(module.sampler().generate(self.seeds))))

    def on_train_start(self, trainer, module) -> None:
        self._t0 = time.perf_counter()
        if module.num_record_steps == 0:
            self.measure(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = int(module.generator_step)
        if step == 0 and int(module.stage1_step) == module.num_record_steps and not self.points:
            self.stage1_seconds = time.perf_counter() - self._t0
            self.measure(module)  # G is still the initial generator after stage 1
        elif step > 0 and step % self.every == 0 and self.points[-1][0] != step:
            self.measure(module)

    def on_train_end(self, trainer, module) -> None:
        if self.points and self.points[-1][0] != int(module.generator_step):
            self.measure(module)


def run_one(args, method: str, seed: int, fd: FDDigits, accelerator: str, path_root: Path) -> dict:
    torch.manual_seed(seed)

    def opt(params):
        return torch.optim.Adam(params, lr=args.lr, betas=(0.0, 0.999), eps=1e-8)

    module = DisBackModule(
        teacher_ckpt=args.teacher,
        method=method,
        path_dir=str(path_root / f"{method}_seed{seed}"),
        num_path=args.num_path,
        record_interval=args.record_interval,
        backtrack_interval=args.backtrack_interval,
        generator_steps=args.generator_steps,
        fake_updates=args.fake_updates,
        sigma_init=args.sigma_init,
        weighting=args.weighting,
        generator_optimizer=opt,
        fake_optimizer=opt,
        seed=seed,
    )
    curve = FDCurve(fd, list(range(args.eval_samples)), args.eval_every)
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[curve],
    )
    dm = model_datamodule(open_model(args.teacher))
    dm.batch_size = args.batch_size
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - t0
    steps = [p[0] for p in curve.points]
    print(
        f"{method} seed {seed}: FD {curve.points[0][1]:.2f} -> {curve.points[-1][1]:.2f} in {seconds:.0f}s", flush=True
    )
    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "fd": [p[1] for p in curve.points],
        "seconds": round(seconds, 1),
        "stage1_fake_steps": module.num_record_steps,
        "stage1_seconds": round(curve.stage1_seconds, 1),
        "target_log": [list(e[:2]) + [e[3]] for e in module.target_log],
    }


def plot(result: dict, path: Path) -> None:
    from diffscore.io import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, color in (("disback", "C0"), ("diffinstruct", "C1")):
        runs = [r for r in result["runs"] if r["method"] == method]
        if not runs:
            continue
        steps = runs[0]["steps"]
        fd = np.array([r["fd"] for r in runs])
        mean, std = fd.mean(0), fd.std(0)
        ax.plot(steps, mean, color=color, label=f"{method} ({len(runs)} seeds, mean +- std)")
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
    ax.axhline(result["teacher_fd"], color="k", ls="--", label=f"teacher Heun {result['teacher_nfe']} NFE")
    ax.axhline(result["fd_heldout"], color="gray", ls=":", label="held-out real digits")
    ax.set_yscale("log")
    ax.set_xlabel("generator iterations")
    ax.set_ylabel(f"FD-digits ({result['args']['eval_samples']} one-step samples)")
    ax.set_title("one-step distillation of the digits teacher")
    ax.legend(fontsize=8)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def summarise(result: dict) -> None:
    for method in ("disback", "diffinstruct"):
        final = [r["fd"][-1] for r in result["runs"] if r["method"] == method]
        if final:
            result[f"{method}_final_fd_mean"] = float(np.mean(final))
            result[f"{method}_final_fd_std"] = float(np.std(final))


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = out.with_name(f".{out.name}.json.tmp")
    tmp_json.write_text(json.dumps(result, indent=2))
    os.replace(tmp_json, out.with_suffix(".json"))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def merge(paths: list[str], out: Path) -> None:
    """One JSON + PNG from runs made in several invocations (e.g. one per method, to fit a time limit)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    skip = {"seeds", "methods", "out", "threads", "device", "merge"}
    options = [{k: v for k, v in p["args"].items() if k not in skip} for p in parts]
    if any(o != options[0] for o in options):
        raise SystemExit("--merge: the files were made with different options")
    result = dict(parts[0])
    result["runs"] = [r for p in parts for r in p["runs"]]
    result["seconds"] = sum(p["seconds"] for p in parts)
    result["merged_from"] = paths
    summarise(result)
    write(result, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="the digits teacher checkpoint (diffscore fit); required unless --merge")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--out", default="bench/disback")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["disback", "diffinstruct"])
    ap.add_argument("--generator_steps", type=int, default=2000)
    ap.add_argument("--num_path", type=int, default=10)
    ap.add_argument("--record_interval", type=int, default=100)
    ap.add_argument("--backtrack_interval", type=int, default=100)
    ap.add_argument("--fake_updates", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--sigma_init", type=float, default=1.0)
    ap.add_argument("--weighting", default="dmd")
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--eval_samples", type=int, default=1000)
    ap.add_argument("--teacher_steps", type=int, default=18, help="Heun steps of the teacher reference (18: 35 NFE)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--merge", nargs="+", help="only combine the runs of these JSON files (made with equal options)")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    if not args.teacher:
        ap.error("--teacher is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    t0 = time.perf_counter()
    fd = FDDigits(args.teacher, device)
    teacher = open_model(args.teacher)
    teacher.network.to(device)
    seeds = list(range(args.eval_samples))
    teacher_fd = fd(teacher.sampler(SamplingOptions(steps=args.teacher_steps, sampler="heun")).generate(seeds))
    teacher_one_step = fd(teacher.sampler(SamplingOptions(steps=1, sampler="euler")).generate(seeds))
    print(f"teacher: Heun {2 * args.teacher_steps - 1} NFE FD {teacher_fd:.3f}; Euler 1 NFE {teacher_one_step:.2f}")
    del teacher
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in args.methods:
                runs.append(run_one(args, method, seed, fd, accelerator, Path(tmp)))
    result = {
        "args": vars(args),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "teacher_fd": teacher_fd,
        "teacher_nfe": 2 * args.teacher_steps - 1,
        "teacher_euler_1nfe_fd": teacher_one_step,
        "fd_heldout": fd.ref["digits_heldout"],
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    summarise(result)
    write(result, Path(args.out))


if __name__ == "__main__":
    main()
