"""Importing an NVlabs/edm network pickle of EDM's CIFAR-10 DDPM++ (55.7M parameters, random weights): how long
`open_model` takes to read and map it, and how fast `diffscore sample` runs it on this machine's CPU.

The pickle is written in EDM's format by the tests' writer (tests/edm_files.py: no EDM code involved), from an
EDM-layout state dict drawn by the tests' float64 reference of SongUNet (tests/loading/test_edm_song.py).

    python bench/edm_import.py --out runs/edm_import        # writes runs/edm_import/edm-ddpmpp.pkl and result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffscore.commands import main as diffscore  # noqa: E402
from diffscore.loading.open import open_model  # noqa: E402
from tests.edm_files import write_edm_network  # noqa: E402
from tests.loading import test_edm_song as song  # noqa: E402

CIFAR_DDPMPP = dict(  # EDM's config F for CIFAR-10 (vp): train.py --arch=ddpmpp
    img_resolution=32,
    in_channels=3,
    out_channels=3,
    model_channels=128,
    channel_mult=[2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
)


def write_pickle(path: Path) -> int:
    song.SIDE = 32  # the reference draws its tensors at the image size it runs on
    P = song.EDMTensors(0)
    with torch.no_grad():
        song.song_unet(P, CIFAR_DDPMPP, torch.zeros(1, 3, 32, 32, dtype=torch.float64), torch.zeros(1).double())
    state = {k: v.float() for k, v in P.state.items()}
    precond = dict(img_resolution=32, img_channels=3, label_dim=0, sigma_data=0.5)
    write_edm_network(path, "EDMPrecond", precond, "SongUNet", CIFAR_DDPMPP, state)
    return sum(v.numel() for k, v in state.items() if not k.endswith("resample_filter"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/edm_import", help="folder for the pickle, samples and result.json")
    ap.add_argument("--num_samples", type=int, default=8, help="samples of the timed `diffscore sample` run")
    ap.add_argument("--steps", type=int, default=18, help="Heun steps (18: 35 evaluations, EDM's CIFAR-10)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pkl = out / "edm-ddpmpp.pkl"
    t0 = time.perf_counter()
    params = write_pickle(pkl)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = open_model(pkl)
    t_import = time.perf_counter() - t0
    assert sum(p.numel() for p in model.network.parameters()) == params
    samples = out / "samples.npz"
    samples.unlink(missing_ok=True)
    cmd = ["sample", "--ckpt_path", str(pkl), "--out", str(samples), "--num_samples", str(args.num_samples)]
    cmd += ["--steps", str(args.steps), "--batch_size", str(args.num_samples), "--accelerator", "cpu"]
    t0 = time.perf_counter()
    diffscore(cmd)
    t_sample = time.perf_counter() - t0
    result = {
        "parameters": params,
        "pickle_mb": round(pkl.stat().st_size / 2**20, 1),
        "write_s": round(t_write, 2),
        "import_s": round(t_import, 2),
        "sample_command_s": round(t_sample, 1),
        "num_samples": args.num_samples,
        "nfe": 2 * args.steps - 1,
        "s_per_sample": round(t_sample / args.num_samples, 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
