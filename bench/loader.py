"""Loader throughput of ImageDataModule on a 64x64 ZIP, against the training step rate it must keep up with.

    python bench/loader.py                      # CPU: loader only
    python bench/loader.py --train              # on a GPU: also the FFHQ-64 DDPM++ training step rate

The ZIP is written like `diffscore dataset` writes one (uncompressed ZIP of PNGs saved with compress_level 0)
from smooth random images. Loader numbers include the host-to-device copy and the uint8 -> [-1, 1] mapping.
Prints one JSON line per row, then a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffscore.lit.datamodules.images import ImageDataModule


def write_zip(path: Path, n: int, size: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(n):
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="png", compress_level=0)
            zf.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())


def loader_rate(path: Path, batch: int, workers: int, batches: int, device: torch.device) -> float:
    dm = ImageDataModule(
        str(path),
        batch_size=batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        epoch_size=batch * (batches + 10),
        verify=False,
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(5):  # warm-up: worker start
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        x, y = next(it)
        x, _ = dm.on_after_batch_transfer((x.to(device, non_blocking=True), y.to(device)), 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - t0)


def train_rate(batch: int, steps: int, bf16: bool) -> float:
    from diffscore.core.losses import edm_loss
    from diffscore.core.precond import EDMPrecond
    from diffscore.core.schedules import LogNormalSigma
    from diffscore.networks import UNet

    torch.backends.cuda.matmul.allow_tf32 = False  # EDM's setting
    torch.backends.cudnn.allow_tf32 = False
    net = EDMPrecond(UNet(data_shape=[3, 64, 64], channel_mult=[1, 2, 2, 2], dropout=0.05)).cuda()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    x0 = torch.rand(batch, 3, 64, 64, device="cuda") * 2 - 1
    law = LogNormalSigma()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = edm_loss(net, x0, law(batch, device="cuda"), torch.randn_like(x0)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128, help="per-device batch (FFHQ config: 256 total, 128 per GPU)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--train", action="store_true", help="also time FFHQ-64 DDPM++ training steps (GPU)")
    ap.add_argument("--out", type=str, default=None, help="also write the rows as JSON lines here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-64x64.zip"
        t0 = time.perf_counter()
        write_zip(path, args.images)
        print(
            f"# wrote {args.images} 64x64 PNGs ({path.stat().st_size / 2**20:.0f} MiB) "
            f"in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs; device {device}",
            flush=True,
        )
        for w in args.workers:
            rate = loader_rate(path, args.batch, w, args.batches, device)
            rows.append({"what": "loader", "workers": w, "batch": args.batch, "img_per_s": round(rate, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.train and device.type == "cuda":
        for bf16 in (False, True):
            rate = train_rate(args.batch, 20, bf16)
            rows.append(
                {
                    "what": "train ffhq64 ddpm++",
                    "precision": "bf16-autocast" if bf16 else "fp32",
                    "batch": args.batch,
                    "img_per_s": round(rate, 1),
                    "gpu": torch.cuda.get_device_name(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\nwhat                  setting          img/s")
    for r in rows:
        setting = f"workers={r['workers']}" if "workers" in r else r["precision"]
        print(f"{r['what']:<21} {setting:<16} {r['img_per_s']:>8.1f}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
