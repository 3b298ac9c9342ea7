"""`diffscore probe gaussian` and `diffscore probe ntk`: score analysis of a checkpoint.

gaussian: the explained variance of the network's score against the Gaussian, GMM and delta-mixture scores of its
training data, per sigma (Wang & Vastola 2024, Fig. 2). ntk: score error against the exact score, held-out loss,
the empirical NTK's spectrum, alignment and drift, and the kernel twin (Han, Razaviyayn & Xu 2024).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule

from diffscore.core.ntk import ntk_drift, relative_error
from diffscore.core.schedules import LogNormalSigma
from diffscore.errors import DiffscoreError
from diffscore.io import write_json
from diffscore.lit.callbacks.gaussian_probe import (
    NetworkDenoiser,
    build_references,
    explained_variance_table,
    format_table,
    plot_table,
)
from diffscore.lit.callbacks.ntk_probe import KERNEL_MODES, SIGMAS, BackboneOutput, NTKMeasurer, split_data
from diffscore.lit.checkpoint import flat_config, load_model, read_checkpoint, training_data
from diffscore.lit.data.base import train_images
from diffscore.lit.modules.regression import draw_regression_set


def probe_gaussian(
    ckpt_path: str,
    out: str | None = None,
    gmm_components: list[int] | None = None,
    num_points: int = 256,
    data: str | None = None,
) -> dict[str, dict[float, float]]:
    """EV of a checkpoint's (EMA) score against Gaussian, GMM and delta-mixture references, per sigma.

    Args:
        ckpt_path: checkpoint written by `diffscore fit` (its data are rebuilt from the checkpoint).
        out: folder for ev.json and ev.png (default: print only).
        gmm_components: the k of each GMM reference (k-means on the training data; default [10]).
        num_points: training points noised at each sigma.
        data: the training data (an EDM dataset ZIP or folder; default: the checkpoint's, which an NVlabs/edm
            pickle does not have).
    """
    model = load_model(ckpt_path).eval()
    train = train_images(training_data(ckpt_path, data, shape=model.data_shape))
    refs = build_references(train.flatten(1).double(), gmm_components or [10])
    table = explained_variance_table(NetworkDenoiser(model), train, refs, num_points=num_points)
    print(format_table(table))
    if out is not None:
        folder = Path(out)
        if not folder.parent.is_dir():
            raise DiffscoreError(f"output folder {folder.parent} does not exist")
        write_json(folder / "ev.json", {k: {str(s): v for s, v in r.items()} for k, r in table.items()})
        plot_table(table, folder / "ev.png", Path(ckpt_path).name)
        print(f"diffscore: wrote {folder / 'ev.json'} and {folder / 'ev.png'}")
    return table


def _regression_set_of(ckpt_path: str, dm: LightningDataModule):
    """The fixed regression set a RegressionDiffusionModule checkpoint trained on (None for other modules)."""
    hp = read_checkpoint(ckpt_path).get("hyper_parameters") or {}
    if not str(hp.get("_class_path", "")).endswith("RegressionDiffusionModule"):
        return None, hp
    law = LogNormalSigma(hp.get("P_mean", -1.2), hp.get("P_std", 1.2))
    return draw_regression_set(split_data(dm, "train"), int(hp.get("noise_seed", 0)), law), hp


def _reference_model(reference_ckpt: str, ckpt_path: str, hp: dict):
    """The earlier checkpoint's model, refused unless it is the same network (class and arguments)."""
    ref = load_model(reference_ckpt).eval()
    mine, theirs = hp.get("backbone") or {}, {} if ref.one_step else ref.hparams.get("backbone") or {}
    if theirs != mine:
        a, b = flat_config(theirs), flat_config(mine)
        differ = [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise DiffscoreError(
            f"--reference_ckpt {reference_ckpt} holds another network than {ckpt_path} ({'; '.join(differ[:4])}); "
            "pass an earlier checkpoint of the same run"
        )
    return ref


def _since_reference(m, K, f_probe, f_kernel, ckpt_path, reference_ckpt, ref, regression_set, hp) -> dict:
    """Kernel drift since an earlier checkpoint and, for full-batch plain SGD on a regression set, the kernel twin
    started there against the network."""
    result = {}
    ref_view = BackboneOutput(ref.denoiser)
    result["ntk/drift"] = ntk_drift(K, m.gram(ref_view, *m.kernel_set[:2]))
    steps = int(read_checkpoint(ckpt_path).get("global_step", 0)) - int(
        read_checkpoint(reference_ckpt).get("global_step", 0)
    )
    opt = hp.get("optimizer") or {}
    lr = (opt.get("init_args") or {}).get("lr")
    plain = opt.get("class_path") == "torch.optim.SGD" and not any(
        (opt.get("init_args") or {}).get(k) for k in ("momentum", "weight_decay", "nesterov")
    )
    if regression_set is not None and m.kernel == "full" and plain and lr and steps >= 0:
        n, out_dim = m.kernel_set[2].shape
        twin = m.twin(ref_view, 2 * float(lr) / (n * out_dim))
        f0_probe, f0_kernel = m.outputs(ref_view)
        t_kernel, t_probe = twin.after_steps(steps)
        result["ntk/twin_rel_error"] = relative_error(t_probe, f_probe, f0_probe)
        result["ntk/twin_rel_error_train"] = relative_error(t_kernel, f_kernel, f0_kernel)
        result.update(m.score_errors(t_probe, prefix="ntk/twin_"))
    else:
        print("diffscore: no kernel twin (it needs a RegressionDiffusionModule trained with plain SGD)")
    return result


def probe_ntk(
    ckpt_path: str,
    reference_ckpt: str | None = None,
    out: str | None = None,
    sigmas: list[float] | None = None,
    num_points: int = 32,
    kernel: str = "auto",
    num_kernel_points: int = 128,
    num_projections: int = 8,
    top_k: int = 5,
    data: str | None = None,
) -> dict[str, float]:
    """NTK measurements of a checkpoint: score error, held-out loss, kernel spectrum, alignment, drift, twin.

    The score error against the exact score (per sigma), held-out loss, the kernel's top eigenvalues and
    kernel-target alignment; with ``reference_ckpt`` (an earlier checkpoint of the
    same run) also the kernel drift since then and, for full-batch plain SGD on a RegressionDiffusionModule, the
    kernel twin started at the reference against the network.

    Args:
        ckpt_path: checkpoint written by `diffscore fit` (its data are rebuilt from the checkpoint).
        reference_ckpt: an earlier checkpoint of the same run (K_0 and F_0 of the drift and the twin).
        out: folder for ntk.json (default: print only).
        sigmas: noise levels of the probe points (default 0.05, 0.2, 0.5, 1, 2).
        num_points: training and held-out points each, noised at every sigma.
        kernel: "full", "trace_estimate" or "auto" (full for vector data).
        num_kernel_points: kernel-set size when the checkpoint has no regression set.
        num_projections: projections of the trace estimate.
        top_k: eigenvalues reported.
        data: the training data (an EDM dataset ZIP or folder; default: the checkpoint's).
    """
    if kernel not in KERNEL_MODES:
        raise DiffscoreError(f"--kernel must be one of {KERNEL_MODES}, got {kernel!r}")
    model = load_model(ckpt_path).eval()
    dm = training_data(ckpt_path, data, shape=model.data_shape)
    regression_set, hp = _regression_set_of(ckpt_path, dm)
    ref = None if reference_ckpt is None else _reference_model(reference_ckpt, ckpt_path, hp)
    m = NTKMeasurer(
        dm,
        model.denoiser.sigma_data,
        regression_set,
        tuple(sigmas or SIGMAS),
        num_points,
        kernel,
        num_kernel_points,
        num_projections,
        top_k,
    )
    view = BackboneOutput(model.denoiser)
    f_probe, f_kernel = m.outputs(view)
    result = m.score_errors(f_probe)
    K = m.gram(view, *m.kernel_set[:2])
    result.update(m.kernel_scalars(K, None))
    if ref is not None:
        result.update(_since_reference(m, K, f_probe, f_kernel, ckpt_path, reference_ckpt, ref, regression_set, hp))
    width = max(len(k) for k in result)
    print(f"exact score: {m.exact_name}; kernel: {m.kernel}")
    print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in result.items()))
    if out is not None:
        folder = Path(out)
        if not folder.parent.is_dir():
            raise DiffscoreError(f"output folder {folder.parent} does not exist")
        write_json(folder / "ntk.json", result)
        print(f"diffscore: wrote {folder / 'ntk.json'}")
    return result
