"""`diffscore phema`: the EMA of any length, chosen after training, from a run's PostHocEMA snapshots.

EDM2's post-hoc EMA (Karras et al. 2024, Sec. 3.2 and Appendix C.3): the snapshots of the tracked power-function
profiles are combined with least-squares weights (diffscore.core.phema.reconstruction_weights) into the profile
of each requested sigma_rel, ending at the last snapshot's time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffscore.core.phema import (
    SIGMA_REL_MAX,
    power_profile,
    reconstruction_error,
    reconstruction_weights,
    sigma_rel_to_gamma,
)
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write, pyplot
from diffscore.lit.callbacks.phema import SNAPSHOT_DIR, SNAPSHOT_FORMAT
from diffscore.loading.files import read_torch_file
from diffscore.outputs import check_folder, folder_output

TRAINING_STATE = ("optimizer_states", "lr_schedulers", "callbacks", "loops", "current_model_state", "averaging_state")
TRAINING_STATE += ("rng_states",)


def join_list_options(argv: list[str], options: tuple[str, ...] = ("--sigma_rel", "--from_sigma_rels")) -> list[str]:
    """``--sigma_rel 0.03 0.05`` as jsonargparse's list form ``--sigma_rel=[0.03,0.05]`` (it takes one token)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            out.append(f"{argv[i]}=[{','.join(argv[i + 1 : j])}]")
            i = j
        else:
            out.append(argv[i])
            i += 1
    return out


def read_snapshots(run: Path) -> list[dict[str, Any]]:
    """The snapshots of ``<run>/phema/``, oldest first: their metadata, and their tensors memory-mapped."""
    folder = run / SNAPSHOT_DIR
    files = sorted(folder.glob("phema-*.pt")) if folder.is_dir() else []
    if not files:
        raise DiffscoreError(
            f"no PostHocEMA snapshots in {folder}: train the run with diffscore.lit.callbacks.PostHocEMA in "
            "trainer.callbacks (it writes <run>/phema/phema-*.pt)"
        )
    snaps = []
    for f in files:
        try:
            snap = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise DiffscoreError(f"{f} is not a readable PostHocEMA snapshot ({type(e).__name__}); delete it") from None
        if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
            raise DiffscoreError(f"{f} is not a PostHocEMA snapshot ({SNAPSHOT_FORMAT}); move it out of {folder}")
        check_snapshot(snap, f, snaps[0]["ema"][0] if snaps else None)
        snaps.append({**snap, "file": f.name})
    return sorted(snaps, key=lambda s: s["images"])


def check_snapshot(snap: dict[str, Any], path: Path, first: dict[str, torch.Tensor] | None) -> None:
    """A snapshot's fields have the types and lengths PostHocEMA writes, its averages are finite and name the same
    tensors, of the same shapes, as the first snapshot's; else one line naming the file and the field."""

    def bad(what: str) -> DiffscoreError:
        return DiffscoreError(f"{path} is a damaged PostHocEMA snapshot ({what}); delete it or move it away")

    number = (int, float)
    if not isinstance(snap.get("images"), int) or not isinstance(snap.get("step"), int) or snap["images"] < 0:
        raise bad("images/step are not counts")
    rels, gammas, ema = snap.get("sigma_rels"), snap.get("gammas"), snap.get("ema")
    if not all(isinstance(v, list | tuple) and v and all(isinstance(x, number) for x in v) for v in (rels, gammas)):
        raise bad("sigma_rels/gammas are not lists of numbers")
    if not isinstance(ema, list | tuple) or len(ema) != len(rels) or len(gammas) != len(rels):
        raise bad("one EMA per tracked sigma_rel is expected")
    for average in ema:
        if not isinstance(average, dict) or not all(isinstance(t, torch.Tensor) for t in average.values()):
            raise bad("an EMA that is not a mapping of tensors")
        reference = first if first is not None else ema[0]
        if {k: tuple(v.shape) for k, v in average.items()} != {k: tuple(v.shape) for k, v in reference.items()}:
            raise bad("its tensors are not the ones of the run's other snapshots")
        nonfinite = next((k for k, t in average.items() if not torch.isfinite(t.float()).all()), None)
        if nonfinite is not None:
            raise bad(f"{nonfinite} is not finite")


def _basis(snaps: list[dict[str, Any]], use: list[float] | None) -> list[tuple[int, int, float, int]]:
    """(snapshot index, profile index, gamma, images) of every stored profile to combine."""
    tracked = sorted({float(s) for snap in snaps for s in snap["sigma_rels"]})
    if use is not None and set(use) - set(tracked):
        raise DiffscoreError(
            f"--from_sigma_rels {sorted(set(use) - set(tracked))} were not tracked; the snapshots hold {tracked}"
        )
    basis = [
        (i, j, float(g), int(snap["images"]))
        for i, snap in enumerate(snaps)
        for j, (s, g) in enumerate(zip(snap["sigma_rels"], snap["gammas"], strict=True))
        if use is None or float(s) in use
    ]
    if len(snaps) < 2:
        raise DiffscoreError(
            f"too few snapshots: {len(snaps)} in the run's {SNAPSHOT_DIR}/ folder, at least 2 are needed (EDM2 "
            "uses dozens): train longer or lower PostHocEMA.snapshot_every_images"
        )
    return basis


def _base_checkpoint(path: Path, names: list[str]) -> dict[str, Any]:
    """The checkpoint whose configuration and buffers the reconstructions keep; it must hold every parameter."""
    if not path.is_file():
        raise DiffscoreError(f"{path} does not exist; pass --ckpt, a checkpoint of this run")
    base = read_torch_file(path)
    if not isinstance(base, dict):
        raise DiffscoreError(f"{path} is not a checkpoint of `diffscore fit`")
    missing = [n for n in names if n not in base.get("state_dict", {})]
    if missing:
        raise DiffscoreError(f"{path} is not this run's checkpoint: it lacks {missing[0]} of the snapshots")
    return base


def _up_to(snaps: list[dict[str, Any]], at_images: int | None, run: Path) -> list[dict[str, Any]]:
    """The snapshots up to the one at ``at_images`` (all of them if None)."""
    if at_images is None:
        return snaps
    kept = [s for s in snaps if s["images"] <= at_images]
    if not kept or kept[-1]["images"] != at_images:
        raise DiffscoreError(f"--at_images {at_images} is not the time of a snapshot in {run / SNAPSHOT_DIR}")
    return kept


def _check_targets(sigma_rel: list[float]) -> list[float]:
    targets = [float(s) for s in sigma_rel]
    if not targets:
        raise DiffscoreError("--sigma_rel needs at least one value, e.g. --sigma_rel 0.05 0.1")
    bad = [s for s in targets if not 0 < s <= SIGMA_REL_MAX]
    if bad:
        raise DiffscoreError(
            f"--sigma_rel {bad} out of range: a power-function EMA has 0 < sigma_rel <= {SIGMA_REL_MAX:.4f}"
        )
    if len(set(targets)) != len(targets):
        raise DiffscoreError(f"--sigma_rel lists a value twice: {targets}")
    return targets


def combine(snaps, basis, weights: torch.Tensor, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """sum_i x_im * snapshot_i for every target m, accumulated in float64, one snapshot file at a time."""
    out = [{n: None for n in names} for _ in range(weights.shape[1])]
    for k, (i, j, _, _) in enumerate(basis):
        if k == 0 or basis[k - 1][0] != i:
            print(f"diffscore: phema: snapshot {i + 1}/{len(snaps)} ({snaps[i]['file']})", flush=True)
        ema = snaps[i]["ema"][j]
        for m, acc in enumerate(out):
            for n in names:
                term = ema[n].double() * float(weights[k, m])
                acc[n] = term if acc[n] is None else acc[n].add_(term)
    return out


def phema(
    run: str,
    sigma_rel: list[float],
    out: str,
    ckpt: str | None = None,
    from_sigma_rels: list[float] | None = None,
    at_images: int | None = None,
    plot: bool = True,
) -> list[Path]:
    """Write the EMA of each --sigma_rel, reconstructed from a run's PostHocEMA snapshots, as checkpoints.

    Each ``<out>/phema-<sigma_rel>.ckpt`` is the run's checkpoint with its ``state_dict`` parameters replaced by the
    reconstruction (buffers and configuration kept, training state dropped: it samples, evaluates, probes and
    teaches DisBack, but does not resume) and a ``phema`` record of sigma_rel and the snapshot weights. Also
    writes ``phema.json`` (the weights and each profile's relative L2 reconstruction error) and ``phema.png``.

    Args:
        run: the run folder (holding checkpoints/ and phema/).
        sigma_rel: relative EMA lengths to reconstruct, in (0, 0.3003]; the further from the tracked ones, the
            less exact (each one's profile error is printed and kept in phema.json).
        out: folder to write: new, or one `diffscore phema` wrote before (its own files are replaced, others stay).
        ckpt: the checkpoint that gives configuration and buffers (default: <run>/checkpoints/last.ckpt).
        from_sigma_rels: combine only the snapshots of these tracked profiles (default: all tracked ones).
        at_images: the EMA at this earlier time (training images; a snapshot's time), from the snapshots up to
            it (default: the last snapshot's time).
        plot: write phema.png (the weights; target vs reconstructed profiles).
    """
    run_path, out_path = Path(run), Path(out)
    targets = _check_targets(sigma_rel)
    if not run_path.is_dir():
        raise DiffscoreError(f"--run {run} is not a folder; pass the run folder that holds checkpoints/ and phema/")
    check_folder(out_path, "--out", "phema")
    snaps = _up_to(read_snapshots(run_path), at_images, run_path)
    use = None if from_sigma_rels is None else [float(s) for s in from_sigma_rels]
    basis = _basis(snaps, use)
    base_path = Path(ckpt) if ckpt else run_path / "checkpoints" / "last.ckpt"
    names = list(snaps[-1]["ema"][0])
    base = _base_checkpoint(base_path, names)
    gammas = torch.tensor([b[2] for b in basis], dtype=torch.float64)
    times = torch.tensor([b[3] for b in basis], dtype=torch.float64)
    t_end = float(times.max())
    target_gammas = sigma_rel_to_gamma(torch.tensor(targets))
    weights = reconstruction_weights(gammas, times, target_gammas, t_end)  # [N, M]
    errors = reconstruction_error(gammas, times, weights, target_gammas, t_end)  # [M]
    step = int(snaps[-1]["step"])
    if int(base.get("global_step", step)) != step:
        print(
            f"diffscore: phema: note: {base_path.name} is from step {base['global_step']}, the snapshots end at {step}"
        )
    print(
        f"diffscore: phema: {len(snaps)} snapshots ({len(basis)} profiles) up to step {step} ({t_end:.0f} images)",
        flush=True,
    )
    states = combine(snaps, basis, weights, names)
    records = [
        _record(s, float(g), float(e), t_end, step, snaps, basis, weights[:, m], run_path, base_path)
        for m, (s, g, e) in enumerate(zip(targets, target_gammas, errors, strict=True))
    ]
    written = []
    with folder_output(out_path, "phema") as tmp:
        for state, rec in zip(states, records, strict=True):
            path = tmp / f"phema-{rec['sigma_rel']:.3f}.ckpt"
            torch.save(_checkpoint(base, state, rec), path)
            written.append(out_path / path.name)
            print(
                f"diffscore: phema: sigma_rel {rec['sigma_rel']:g}: relative profile error "
                f"{rec['reconstruction_error']:.3g}",
                flush=True,
            )
        if plot:
            plot_reconstruction(tmp / "phema.png", records, t_end)
        (tmp / "phema.json").write_text(json.dumps({"written_by": "diffscore phema", "targets": records}, indent=1))
    print(f"diffscore: wrote {len(written)} checkpoints to {out_path}", flush=True)
    return written


def _record(sigma, gamma, error, t_end, step, snaps, basis, x, run: Path, base: Path) -> dict[str, Any]:
    """The plain-data record a reconstructed checkpoint carries: what it is and which snapshots made it."""
    return {
        "sigma_rel": sigma,
        "gamma": gamma,
        "images": t_end,
        "step": step,
        "reconstruction_error": error,  # relative L2 distance of the reconstructed profile from the target
        "run": str(run.resolve()),
        "base_checkpoint": str(base.resolve()),
        "snapshots": [
            {
                "file": snaps[i]["file"],
                "images": t,
                "sigma_rel": float(snaps[i]["sigma_rels"][j]),
                "gamma": g,
                "weight": float(w),
            }
            for (i, j, g, t), w in zip(basis, x, strict=True)
        ],
    }


def _checkpoint(base: dict[str, Any], params: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, Any]:
    """The run's checkpoint, its parameters replaced (in their saved dtype), the training state left out."""
    state = dict(base["state_dict"])
    for name, value in params.items():
        state[name] = value.to(state[name].dtype)
    kept = {k: v for k, v in base.items() if k not in TRAINING_STATE and k != "state_dict"}
    return {**kept, "state_dict": state, "phema": record}


def plot_reconstruction(path: Path, records: list[dict[str, Any]], t_end: float) -> None:
    """Left: each target's weight on every snapshot against its time; right: target vs reconstructed profile."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    tau = torch.linspace(0, t_end, 801, dtype=torch.float64)[1:]  # [T] images
    for k, rec in enumerate(records):
        color = f"C{k % 10}"
        label = f"sigma_rel {rec['sigma_rel']:g}"
        for tracked in sorted({s["sigma_rel"] for s in rec["snapshots"]}):
            pts = [s for s in rec["snapshots"] if s["sigma_rel"] == tracked]
            marker = "o" if tracked == rec["snapshots"][0]["sigma_rel"] else "^"
            left.plot(
                [s["images"] for s in pts],
                [s["weight"] for s in pts],
                marker=marker,
                ms=3,
                lw=0.8,
                color=color,
                label=f"{label}, from {tracked:g}",
            )
        target = power_profile(rec["gamma"], t_end, tau) * t_end  # [T], per unit of tau / t
        recon = sum(s["weight"] * power_profile(s["gamma"], s["images"], tau) for s in rec["snapshots"]) * t_end
        right.plot(tau / t_end, target, color=color, lw=1.5, label=f"{label} target")
        right.plot(
            tau / t_end,
            recon,
            color=color,
            lw=1,
            ls="--",
            label=f"reconstructed (error {rec['reconstruction_error']:.2g})",
        )
    left.set(title="reconstruction weights of the snapshots", xlabel="snapshot time (images)", ylabel="weight")
    right.set(
        title="EMA profiles: target (solid) vs reconstructed (dashed)",
        xlabel="tau / t",
        ylabel="weight density (t p(tau))",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
