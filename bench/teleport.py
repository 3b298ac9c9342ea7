"""FD-digits vs NFE with analytical teleportation (Wang & Vastola 2024) on a trained digits checkpoint.

    python bench/teleport.py --ckpt_path runs/diffscore-quickstart/<run>/checkpoints/last.ckpt --out bench/teleport

Heun with 18 steps and k = 0..8 leading steps replaced by the Gaussian model's closed-form flow, and
DPM-Solver++(2M) / UniPC at a few step counts with and without teleportation to sigma 8.4. Every point is
evaluated on three seed ranges of N samples each (mean +- std), so a difference can be read against the
seed-to-seed spread. Writes <out>.json and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffscore.commands.evaluate import EvaluationOptions, evaluate
from diffscore.lit.predict import Devices
from diffscore.sampling.options import SamplingOptions, TeleportOptions


def point(ckpt, sampler, steps, skip, sigma, n, gauss, accelerator="auto") -> dict:
    tele = TeleportOptions(skip=skip or None, sigma=sigma, gaussian=gauss) if (skip or sigma) else TeleportOptions()
    s = evaluate(
        ckpt,
        evaluation=EvaluationOptions(metrics="fd_digits", num_samples=n, protocol="edm"),
        options=SamplingOptions(sampler=sampler, steps=steps, batch_size=1000, teleport=tele),
        where=Devices(accelerator="cpu", devices=1),
    )
    return {
        "sampler": sampler,
        "steps": steps,
        "skip": s["teleport_skip"],
        "nfe": s["nfe"],
        "fd_mean": s["fd_digits_mean"],
        "fd_std": s["fd_digits_std"],
        "fd_min": s["fd_digits_min"],
        "heldout": s["runs"][0]["fd_digits_heldout"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_path", required=True)
    ap.add_argument("--out", default="bench/teleport")
    ap.add_argument("--num_samples", type=int, default=1000)
    ap.add_argument("--accelerator", default="auto")
    args = ap.parse_args()
    gauss = str(Path(args.out).with_suffix(".gaussian.pt"))
    rows = []
    t0 = time.perf_counter()
    for k in range(0, 9):
        rows.append(point(args.ckpt_path, "heun", 18, k, None, args.num_samples, gauss, args.accelerator))
    for sampler in ("dpmpp_2m", "unipc"):
        for steps in (8, 12, 18):
            for sigma in (None, 8.4):
                rows.append(
                    point(args.ckpt_path, sampler, steps, None, sigma, args.num_samples, gauss, args.accelerator)
                )
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    elapsed = time.perf_counter() - t0
    print(f"\n{'sampler':<10}{'steps':>6}{'skip':>6}{'nfe':>6}{'FD mean':>10}{'std':>8}   ({elapsed:.0f} s)")
    for r in rows:
        print(f"{r['sampler']:<10}{r['steps']:>6}{r['skip']:>6}{r['nfe']:>6}{r['fd_mean']:>10.2f}{r['fd_std']:>8.2f}")
    from diffscore.io import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, marker in (("heun", "o"), ("dpmpp_2m", "s"), ("unipc", "^")):
        for tele in (False, True):
            pts = [r for r in rows if r["sampler"] == sampler and (r["skip"] > 0) == tele]
            if sampler == "heun":
                pts = [r for r in rows if r["sampler"] == "heun"]
                if tele:
                    continue
            if not pts:
                continue
            ax.errorbar(
                [r["nfe"] for r in pts],
                [r["fd_mean"] for r in pts],
                yerr=[r["fd_std"] for r in pts],
                marker=marker,
                capsize=3,
                ls="-" if not tele else "--",
                label=f"{sampler}"
                + (" (k = 0..8 skipped)" if sampler == "heun" else " + teleport to 8.4" if tele else ""),
            )
    ax.axhline(rows[0]["heldout"], color="gray", ls=":", label="held-out real digits (360 vs train)")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(f"FD-digits ({args.num_samples} samples, 3 seed ranges)")
    ax.legend(fontsize=7)
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=120, bbox_inches="tight")
    print(f"wrote {Path(args.out).with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
