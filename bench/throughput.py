"""GPU throughput of the DDPM++ denoiser: training and Heun-35 sampling, fp32 / bf16 / bf16 + channels-last +
torch.compile, for the CIFAR-10 (32x32, batch 256) and FFHQ-64 (batch 128) configurations, and on request
(``--configs imagenet-64``) EDM's class-conditional ImageNet-64 ADM (296M parameters, batch 128) and
(``--configs edm2-s-64``) EDM2-S at ImageNet-64 (EDM2's training step, batch 64 per GPU as EDM2's 2048 on 32 GPUs).

    python bench/throughput.py                      # one GPU, a few minutes; JSON lines, then a table
    python bench/throughput.py --configs cifar10-32 --modes bf16+cl+compile --profile 5   # where the step's time goes
    python bench/throughput.py --configs cifar10-32 --modes bf16+cl+compile --max-batch 1664  # largest batch that fits
    python bench/throughput.py --configs edm2-s-64 imagenet-64 --modes fp16 bf16+cl+compile  # EDM2-S beside ADM

Training: EDM loss (lognormal sigma), backward, Adam (fused where the mode says); warm-up excluded, median of
repeats, no host sync inside the timed steps. GFLOP/img from torch.utils.flop_counter (forward); achieved
TFLOP/s counts forward + backward as 3x forward. TF32 stays off and cuDNN's autotuner on, as EDM sets them
(``--no-cudnn-benchmark`` to compare).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffscore.core.losses import edm2_loss, edm_loss
from diffscore.core.precond import EDMPrecond
from diffscore.core.precond_edm2 import EDM2Precond
from diffscore.core.samplers import heun, nfe
from diffscore.core.schedules import LogNormalSigma, karras_sigmas
from diffscore.networks import ADMUNet, EDM2UNet, UNet
from diffscore.networks.group_norm import set_fused_norm
from diffscore.networks.logvar import LogVarHead
from diffscore.networks.mp_layers import normalize_mp_weights_, set_forced_normalization

CONFIGS = {  # net: the backbone class and its kwargs; the rest: batches
    "cifar10-32": dict(
        net=UNet, data_shape=[3, 32, 32], channel_mult=[2, 2, 2], dropout=0.13, train_batch=256, sample_batch=1024
    ),
    "ffhq-64": dict(
        net=UNet, data_shape=[3, 64, 64], channel_mult=[1, 2, 2, 2], dropout=0.05, train_batch=128, sample_batch=256
    ),
    # EDM's ImageNet-64 (ADM's defaults, 1,000 classes, dropout 0.10): batch 4,096 on 32 GPUs, 128 per GPU
    "imagenet-64": dict(net=ADMUNet, data_shape=[3, 64, 64], label_dim=1000, train_batch=128, sample_batch=256),
    # EDM2-S at ImageNet-64 (experiments/edm2_img64_s.yaml; 1,000 classes): batch 2,048 on 32 GPUs, 64 per GPU.
    # Its step is EDM2's: EDM2Precond with the logvar head, the uncertainty-weighted loss at P_mean -0.8 / P_std
    # 1.6, Adam (0.9, 0.99), forced weight normalisation after the optimizer step. Its own fp16 step: mode fp16.
    "edm2-s-64": dict(
        net=EDM2UNet, data_shape=[3, 64, 64], label_dim=1000, preset="s", train_batch=64, sample_batch=256, edm2=True
    ),
}
DEFAULT_CONFIGS = ["cifar10-32", "ffhq-64"]
MODES = {
    "fp32": dict(dtype=None, channels_last=False, compile=False, fused=False),
    "bf16": dict(dtype=torch.bfloat16, channels_last=False, compile=False, fused=True),
    "bf16+cl+compile": dict(dtype=torch.bfloat16, channels_last=True, compile=True, fused=True),
    # the way NVlabs/edm's --fp16 runs a network (fp16 convolutions, eager, contiguous), on diffscore's network:
    # a stand-in for EDM's own code where that is not on the machine, not a measurement of it
    "fp16": dict(dtype=torch.float16, channels_last=False, compile=False, fused=True),
    # the group norms (+ shift, SiLU) as diffscore's Triton kernels instead of inductor's (model.fused_norm)
    "bf16+cl+compile-fusednorm": dict(
        dtype=torch.bfloat16, channels_last=True, compile=True, fused=True, fused_norm=True
    ),
    # CUDA graphs of the compiled forward and backward (cudagraph trees): no launch gaps, static buffers
    "bf16+cl+compile-ro": dict(
        dtype=torch.bfloat16, channels_last=True, compile=True, fused=True, compile_mode="reduce-overhead"
    ),
    # inductor benchmarks Triton templates against cuBLAS/cuDNN for every matmul/conv shape (long compile)
    "bf16+cl+compile-ma": dict(
        dtype=torch.bfloat16, channels_last=True, compile=True, fused=True, compile_mode="max-autotune-no-cudagraphs"
    ),
}

DEFAULT_MODES = ["fp32", "bf16", "bf16+cl+compile"]  # the others on request (max-autotune alone compiles for minutes)


def build_net(cfg: dict) -> torch.nn.Module:
    """The config's backbone (on the CPU), from its ``net`` class and kwargs."""
    return cfg["net"](**{k: v for k, v in cfg.items() if k not in ("net", "train_batch", "sample_batch", "edm2")})


def training_parts(cfg: dict, net: torch.nn.Module) -> tuple[torch.nn.Module, object, LogNormalSigma, tuple]:
    """(denoiser, loss, sigma law, Adam betas) of the config's training step: EDM's, or EDM2's for ``edm2``."""
    if cfg.get("edm2"):
        set_forced_normalization(net, False)  # renormalised after each optimizer step instead (as EDM2Module)
        return EDM2Precond(net, LogVarHead()), edm2_loss, LogNormalSigma(-0.8, 1.6), (0.9, 0.99)
    return EDMPrecond(net), edm_loss, LogNormalSigma(), (0.9, 0.999)


def labels(net: torch.nn.Module, n: int) -> torch.Tensor | None:
    """n random class labels [n] on the GPU for a class-conditional backbone, else None."""
    return torch.randint(net.label_dim, (n,), device="cuda") if net.label_dim else None


def timed(fn, repeats: int, inner: int) -> float:
    """Median seconds of ``inner`` calls of fn, over ``repeats`` (CUDA-synchronised at the edges only)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


KERNEL_KINDS = (  # (category, substrings of a CUDA kernel's name), first match wins
    ("group norm (Triton)", ("group_norm_act",)),
    ("attention", ("flash", "fmha", "attention")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("inductor reduction", ("triton_red", "triton_per")),
    ("inductor pointwise", ("triton_poi",)),
    ("convolution", ("conv", "xmma", "implicit", "wgrad", "dgrad", "cudnn", "nhwc", "nchw")),
    ("matmul", ("gemm", "cutlass", "sm90", "cublas")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile(step, steps: int, top: int = 25) -> dict:
    """CUDA time of ``steps`` calls of step, by kernel category and by kernel (printed); returns the categories."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    if not kernels:
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
        return {}
    total = sum(e.self_device_time_total for e in kernels)
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_kind[kernel_kind(e.key)][0] += e.self_device_time_total
        by_kind[kernel_kind(e.key)][1] += e.count
    print(f"\nCUDA time per step {total / steps / 1e3:.1f} ms over {steps} steps")
    for kind, (us, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:<20}{us / steps / 1e3:>8.2f} ms {100 * us / total:>5.1f}%  {count // steps:>5} launches/step")
    print(f"  top {top} kernels (ms/step, launches/step, us/launch):")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        ms, per_launch = e.self_device_time_total / steps / 1e3, e.self_device_time_total / e.count
        print(f"    {ms:>7.2f} {e.count // steps:>4} {per_launch:>8.1f}  {e.key[:150]}")
    return {kind: round(us / steps / 1e3, 3) for kind, (us, _) in by_kind.items()} | {"total_ms": total / steps / 1e3}


def run(
    name: str,
    cfg: dict,
    mode: str,
    opts: dict,
    cudnn_benchmark: bool = True,
    probe_steps: int = 3,
    batch: int | None = None,
    profile_steps: int = 0,
    profile_top: int = 25,
    sample: bool = True,
) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.manual_seed(0)
    net = build_net(cfg).cuda()
    mem = torch.channels_last if opts["channels_last"] else torch.contiguous_format
    net = net.to(memory_format=mem)
    set_fused_norm(net, opts.get("fused_norm", False))
    denoiser, loss_fn, law, betas = training_parts(cfg, net)
    denoiser = denoiser.cuda()
    graphs = opts.get("compile_mode") == "reduce-overhead"
    fwd = torch.compile(denoiser, mode=opts.get("compile_mode")) if opts["compile"] else denoiser
    params = sum(p.numel() for p in net.parameters())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        denoiser(torch.randn(1, *cfg["data_shape"], device="cuda"), torch.ones(1, device="cuda"), labels(net, 1))
    gflop = fc.get_total_flops() / 1e9
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-4, betas=betas, fused=opts["fused"])
    B = batch or cfg["train_batch"]
    x0 = (torch.rand(B, *cfg["data_shape"], device="cuda") * 2 - 1).contiguous(memory_format=mem)
    cond = labels(net, B)

    def step():
        if graphs:  # a new training step: the graphs' static outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=opts["dtype"] or torch.float32, enabled=opts["dtype"] is not None):
            loss = loss_fn(fwd, x0, law(B, device="cuda"), torch.randn_like(x0), cond).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.get("edm2"):
            with torch.no_grad():
                normalize_mp_weights_(net)

    for _ in range(3 if opts["compile"] else 2):
        step()
    torch.cuda.reset_peak_memory_stats()
    sec = timed(step, repeats=3, inner=5)
    peak = torch.cuda.max_memory_allocated() / 2**30
    train = B / sec
    kernels = profile(step, profile_steps, profile_top) if profile_steps else None
    row = {
        "config": name,
        "mode": mode,
        "batch": B,
        "params_M": round(params / 1e6, 2),
        "gflop_per_img": round(gflop, 1),
        "train_img_s": round(train, 1),
        "train_tflop_s": round(train * 3 * gflop / 1e3, 1),
        "peak_mem_gib": round(peak, 1),
        "peak_mem_mib_per_img": round(peak * 1024 / B, 1),
        "cudnn_benchmark": cudnn_benchmark,
        "gpu": torch.cuda.get_device_name(),
    } | ({"kernel_ms": kernels} if kernels else {})
    if not sample:
        return row
    # sampling: Heun 18 steps (35 evaluations), inference only. Every evaluation costs the same (one network call
    # on the same batch), so the rate is timed on the first `probe_steps` steps (plus a last step to 0) and scaled
    # to 35 evaluations.
    S = cfg["sample_batch"]
    noise = torch.randn(S, *cfg["data_shape"], device="cuda").contiguous(memory_format=mem) * 80
    sigmas = torch.cat([karras_sigmas(18)[: probe_steps + 1], torch.zeros(1, dtype=torch.float64)])
    net.eval()
    call, cond = fwd, labels(net, S)
    if graphs:  # each call replays into the same static output: the sampler keeps a copy, as it keeps results

        def call(x, sigma, cond=None):
            torch.compiler.cudagraph_mark_step_begin()
            return fwd(x, sigma, cond).clone()

    def sample():
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=opts["dtype"] or torch.float32, enabled=opts["dtype"] is not None),
        ):
            heun(call, noise, sigmas, cond)

    sample()
    per_eval = timed(sample, repeats=3, inner=1) / nfe("heun", probe_steps + 1)  # 2 per step, 1 for the last
    sample_rate = S / (per_eval * nfe("heun", 18))
    return row | {"sample_img_s_heun35": round(sample_rate, 1)}


def find_max_batch(config: str, mode: str, start: int, extra: list[str], step: int = 128) -> int:
    """The largest training batch among start, start - step, ... that runs; each tried in a fresh process (an
    out-of-memory error leaves a process's allocator fragmented). Other failures are raised, not skipped."""
    for batch in range(start, 0, -step):
        cmd = [sys.executable, __file__, "--configs", config, "--modes", mode, "--batch", str(batch), "--no-sample"]
        cmd += extra  # the parent's --no-cudnn-benchmark, --out and --inductor options
        child = subprocess.run(cmd, capture_output=True, text=True)
        fits = child.returncode == 0
        if not fits and "OutOfMemoryError" not in child.stderr:
            raise RuntimeError(f"batch {batch} failed for another reason than memory:\n{child.stderr[-3000:]}")
        print(json.dumps({"config": config, "mode": mode, "batch": batch, "fits": fits}), flush=True)
        if fits:
            print(child.stdout.splitlines()[0])  # the row: rate and peak memory at that batch
            return batch
    raise RuntimeError(f"not even batch {start % step or step} fits")


def check_fused_norm(name: str, cfg: dict, batch: int = 32) -> dict:
    """How far the Triton group norms move the bf16 loss and gradients, against the size of bf16 itself: one
    batch, the same weights, eager and (fused) compiled as training runs it; each bf16 arm against the float32
    network (unfused, contiguous, eager)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true float32 reference
    torch.manual_seed(0)
    net = build_net(cfg | {"dropout": 0.0}).cuda()
    x0 = torch.rand(batch, *cfg["data_shape"], device="cuda") * 2 - 1
    sigma, noise, cond = LogNormalSigma()(batch, device="cuda"), torch.randn_like(x0), labels(net, batch)

    def loss_and_grads(fused: bool, bf16: bool, compiled: bool = False) -> tuple[float, torch.Tensor]:
        mem = torch.channels_last if bf16 else torch.contiguous_format
        net.to(memory_format=mem).zero_grad(set_to_none=True)
        set_fused_norm(net, fused)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            denoiser = torch.compile(EDMPrecond(net)) if compiled else EDMPrecond(net)
            loss = edm_loss(denoiser, x0.contiguous(memory_format=mem), sigma, noise, cond).mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().float() for p in net.parameters() if p.grad is not None])

    ref_loss, ref_grad = loss_and_grads(False, False)
    row = {"config": name, "check": "fused norm vs fp32", "batch": batch, "loss_fp32": ref_loss}
    for label, fused, compiled in (("fused", True, False), ("unfused", False, False), ("fused_compiled", True, True)):
        loss, grad = loss_and_grads(fused, True, compiled)
        row[f"loss_{label}"] = loss
        row[f"grad_rel_err_{label}"] = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=DEFAULT_MODES)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    ap.add_argument("--probe-steps", type=int, default=3, help="Heun steps timed for the 35-NFE sampling rate")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: the config's)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS", help="print where STEPS steps' time goes")
    ap.add_argument("--profile-top", type=int, default=25, metavar="N", help="kernels listed by --profile")
    ap.add_argument("--check-fused", action="store_true", help="Triton group norms' bf16 error vs the fp32 network")
    ap.add_argument("--no-sample", dest="sample", action="store_false", help="time training only")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE", help="torch._inductor.config")
    ap.add_argument("--max-batch", type=int, default=0, metavar="START", help="largest training batch: START, -128..")
    args = ap.parse_args()
    if args.check_fused:
        for name in args.configs:
            print(json.dumps(check_fused_norm(name, CONFIGS[name])), flush=True)
        return
    if args.max_batch:
        for name in args.configs:
            for mode in args.modes:
                extra = [] if args.cudnn_benchmark else ["--no-cudnn-benchmark"]
                extra += [f"--out={args.out}"] if args.out else []  # the fitting batch's row
                find_max_batch(name, mode, args.max_batch, extra + [f"--inductor={i}" for i in args.inductor])
        return
    if args.inductor:
        import torch._inductor.config as inductor_config

        for item in args.inductor:  # e.g. --inductor coordinate_descent_tuning=true
            key, value = item.split("=", 1)
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a string
            setattr(inductor_config, key, value)
    rows = []
    timing = dict(
        cudnn_benchmark=args.cudnn_benchmark,
        probe_steps=args.probe_steps,
        batch=args.batch,
        profile_steps=args.profile,
        profile_top=args.profile_top,
        sample=args.sample,
    )
    for name in args.configs:
        for mode in args.modes:
            rows.append(run(name, CONFIGS[name], mode, MODES[mode], **timing))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:  # row by row, so a run cut short keeps what it measured
                with open(args.out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
            torch.cuda.empty_cache()
    print(f"\n{'config':<12}{'mode':<27}{'train img/s':>12}{'TFLOP/s':>9}{'MiB/img':>9}{'Heun-35 img/s':>15}")
    for r in rows:
        print(
            f"{r['config']:<12}{r['mode']:<27}{r['train_img_s']:>12.0f}{r['train_tflop_s']:>9.0f}"
            f"{r['peak_mem_mib_per_img']:>9.1f}{r.get('sample_img_s_heun35', float('nan')):>15.1f}"
        )


if __name__ == "__main__":
    main()
