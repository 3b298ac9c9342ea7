"""The `diffscore sample` / `diffscore evaluate` commands timed end to end, as a user runs them (issue 19).

Each case writes a checkpoint of EDM's network (random weights, the GPU configs' speed switches: bf16, channels-last,
compile), then runs the real command in a fresh process and reports its wall time (start-up and compilation
included) and the rate the command prints after its first batch (start-up excluded). Modes: ``fast`` (the
checkpoint's defaults) and ``eager32`` (``--precision 32 --compile false --channels_last false``: the path before
issue 19). ``evaluate`` times `diffscore evaluate --protocol edm` with FID on a random-weights Inception file (the
real weights cannot be downloaded here: timing only) against a random reference. ``precision`` compares bf16 and
fp32 sampling of a trained checkpoint on the same seeds (``--ckpt``: max/mean absolute pixel difference, and
FD-digits over EDM's three seed ranges for a digits model).

    python bench/sample_throughput.py --out $OUT/st --cases cifar-heun18:50000 ffhq-heun18:8192 ffhq-heun40:2048
    python bench/sample_throughput.py --out /tmp/st --cases cifar-heun18:8 --tiny --accelerator cpu   # a smoke run

Start-up (issue 34): ``--modes cold fast`` runs a case first with empty compile caches (a fresh HOME, so
~/.cache/diffscore/inductor and triton's cache are empty: a fresh machine), then again with the caches the first
run left (a second run); ``eager`` is ``fast`` with ``--compile false``. Without ``--compile`` the command decides
whether to compile (sampling.speed.worth_compiling): a short run samples eager.

    python bench/sample_throughput.py --out $OUT/st --cases cifar-heun18:16384 --modes cold fast eager32
    python bench/sample_throughput.py --out $OUT/st --cases cifar-heun18:2048 --modes cold
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffscore.lit.modules import DiffusionModule  # noqa: E402
from diffscore.networks import UNet  # noqa: E402

NETWORKS = {  # EDM's DDPM++ configs (Karras et al. 2022, App. F.2)
    "cifar": dict(data_shape=[3, 32, 32], channel_mult=[2, 2, 2], dropout=0.13),
    "ffhq": dict(data_shape=[3, 64, 64], channel_mult=[1, 2, 2, 2], dropout=0.05),
}
TINY = dict(model_channels=16, num_blocks=1)
EAGER32 = ["--precision", "32", "--compile", "false", "--channels_last", "false"]


def write_checkpoint(path: Path, network: str, steps: int, tiny: bool) -> Path:
    """A DiffusionModule checkpoint with the GPU configs' switches, as `diffscore fit` would leave one."""
    torch.manual_seed(0)
    backbone = UNet(**NETWORKS[network], **(TINY if tiny else {}))
    speed = {"compile": True, "channels_last": True}
    model = DiffusionModule(backbone, sampling={"steps": steps, "precision": "bf16"}, speed=speed)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def run(args: list[str], log: Path, home: Path | None = None) -> tuple[float, str]:
    """`diffscore ARGS` in a fresh process (with ``home`` as its HOME: its compile caches): (wall seconds, its
    output); raises with the output's end on failure."""
    env = {**os.environ, **({"HOME": str(home)} if home else {})}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "diffscore.commands", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"diffscore {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return wall, proc.stdout


def sample_case(out: Path, case: str, n: int, mode: str, opts: argparse.Namespace) -> dict:
    network, steps = re.fullmatch(r"(\w+)-heun(\d+)", case).groups()
    ckpt = out / f"{network}-{steps}.ckpt"
    if not ckpt.exists():
        write_checkpoint(ckpt, network, int(steps), opts.tiny)
    npz = out / f"{case}-{mode}.npz"
    npz.unlink(missing_ok=True)
    cmd = ["sample", "--ckpt_path", str(ckpt), "--out", str(npz), "--num_samples", str(n)]
    cmd += ["--batch_size", str(opts.batch[network]), "--accelerator", opts.accelerator, "--devices", "1"]
    home = out / "home"  # the compile caches of the "fast" runs: what a second run on the machine finds
    if mode == "cold":
        home = out / f"home-cold-{case}"
        shutil.rmtree(home, ignore_errors=True)
    extra = {"eager32": EAGER32, "eager": ["--compile", "false"]}.get(mode, [])
    wall, text = run(cmd + extra, out / f"{case}-{mode}.log", home)
    rate = re.search(r"([\d.]+) img/s per device after the first batch", text)
    return {
        "case": case,
        "mode": mode,
        "num_samples": n,
        "nfe": 2 * int(steps) - 1,
        "wall_s": round(wall, 1),
        "end_to_end_img_s": round(n / wall, 1),
        "steady_img_s": float(rate.group(1)) if rate else None,
        "compiled": "sampling eager" not in text and mode not in ("eager", "eager32"),
    }


def random_inception(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved in its weights-file format (timing only)."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with (
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
    ):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(net.state_dict(), path)
    return path


def evaluate_case(out: Path, n: int, opts: argparse.Namespace) -> dict:
    """`diffscore evaluate --protocol edm --metrics fid` on the CIFAR checkpoint: 3 x n samples and their features."""
    weights = random_inception(out / "random-inception.pth")
    ref = out / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, mu=rng.normal(size=2048), sigma=np.eye(2048))
    ckpt = out / "cifar-18.ckpt"
    if not ckpt.exists():
        write_checkpoint(ckpt, "cifar", 18, opts.tiny)
    result = out / "evaluate.json"
    cmd = ["evaluate", "--ckpt_path", str(ckpt), "--metrics", "fid", "--ref", str(ref), "--protocol", "edm"]
    cmd += ["--num_samples", str(n), "--inception_weights", str(weights), "--out", str(result)]
    cmd += ["--batch_size", str(opts.batch["cifar"]), "--accelerator", opts.accelerator, "--devices", "1"]
    wall, _ = run(cmd, out / "evaluate.log")
    runs = json.loads(result.read_text())["runs"]
    ranges = [r["seconds"] for r in runs]
    return {"case": "evaluate-edm", "num_samples": 3 * n, "wall_s": round(wall, 1), "range_s": ranges}


def precision_case(out: Path, ckpt: str, n: int, opts: argparse.Namespace) -> dict:
    """bf16 vs fp32 sampling of one checkpoint on the same seeds (eager, channels-last: only the arithmetic differs)."""
    arms = {}
    for precision in ("32", "bf16"):
        npz = out / f"precision-{precision}.npz"
        npz.unlink(missing_ok=True)
        cmd = ["sample", "--ckpt_path", ckpt, "--out", str(npz), "--num_samples", str(n), "--precision", precision]
        cmd += ["--compile", "false", "--channels_last", "true", "--accelerator", opts.accelerator, "--devices", "1"]
        run(cmd, out / f"precision-{precision}.log")
        arms[precision] = np.load(npz)["samples"]
    diff = np.abs(arms["bf16"] - arms["32"])
    result = {"case": "precision", "num_samples": n, "max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    for precision in ("32", "bf16"):
        report = out / f"fd-{precision}.json"
        cmd = ["evaluate", "--ckpt_path", ckpt, "--protocol", "edm", "--num_samples", str(n), "--out", str(report)]
        cmd += ["--precision", precision, "--compile", "false", "--channels_last", "true", "--metrics", "fd_digits"]
        run(cmd + ["--accelerator", opts.accelerator, "--devices", "1"], out / f"fd-{precision}.log")
        result[f"fd_digits_{precision}"] = [r["fd_digits"] for r in json.loads(report.read_text())["runs"]]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for checkpoints, outputs, logs and results.json")
    ap.add_argument("--cases", nargs="*", default=[], help="NETWORK-heunSTEPS:N, e.g. cifar-heun18:50000")
    ap.add_argument("--modes", nargs="*", default=["fast"], choices=["cold", "fast", "eager", "eager32"])
    ap.add_argument("--evaluate", type=int, default=0, help="evaluate --protocol edm with this --num_samples")
    ap.add_argument("--precision_ckpt", default=None, help="a trained checkpoint for the bf16 vs fp32 comparison")
    ap.add_argument("--precision_samples", type=int, default=2000)
    ap.add_argument("--batch_cifar", type=int, default=1024)
    ap.add_argument("--batch_ffhq", type=int, default=512)
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--tiny", action="store_true", help="tiny networks (a CPU smoke run of this script)")
    opts = ap.parse_args()
    opts.batch = {"cifar": opts.batch_cifar, "ffhq": opts.batch_ffhq}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in opts.cases:
        name, n = case.split(":")
        for mode in opts.modes:
            results.append(sample_case(out, name, int(n), mode, opts))
            print(json.dumps(results[-1]), flush=True)
    if opts.evaluate:
        results.append(evaluate_case(out, opts.evaluate, opts))
        print(json.dumps(results[-1]), flush=True)
    if opts.precision_ckpt:
        results.append(precision_case(out, opts.precision_ckpt, opts.precision_samples, opts))
        print(json.dumps(results[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (out / "results.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
