"""`diffscore probe gaussian` and `diffscore probe ntk`: score analysis of a model, by the same code the
GaussianScoreProbe and NTKProbe callbacks run during fit (diffscore.probes).

gaussian: the explained variance of the network's score against the Gaussian, GMM and delta-mixture scores of its
training data, per sigma (Wang & Vastola 2024, Fig. 2). ntk: score error against the exact score, held-out loss,
the empirical NTK's spectrum, alignment and drift, and the kernel twin (Han, Razaviyayn & Xu 2024).
"""

from __future__ import annotations

from pathlib import Path

from diffscore.core.ntk import draw_regression_set, ntk_drift
from diffscore.core.schedules import LogNormalSigma
from diffscore.errors import DiffscoreError
from diffscore.io import write_json
from diffscore.lit.datamodules.base import split_images, train_images
from diffscore.lit.datamodules.from_file import training_data
from diffscore.lit.datamodules.tensor import GMMDataModule
from diffscore.loading.classes import config_differences
from diffscore.loading.model import LoadedModel
from diffscore.loading.open import open_model
from diffscore.outputs import check_folder, folder_output
from diffscore.probes.gaussian import (
    NetworkDenoiser,
    build_references,
    explained_variance_table,
    format_table,
    plot_table,
)
from diffscore.probes.ntk import BackboneOutput, NTKMeasurer, NTKSettings, plain_sgd_eta


def _out_folder(out: str | None, command: str) -> Path | None:
    """--out: a new folder or one this probe wrote (its own files are replaced, others stay)."""
    if out is not None:
        check_folder(Path(out), "--out", command)
    return None if out is None else Path(out)


def probe_gaussian(
    ckpt_path: str,
    out: str | None = None,
    gmm_components: list[int] | None = None,
    num_points: int = 256,
    data: str | None = None,
) -> dict[str, dict[float, float]]:
    """EV of a model's score against Gaussian, GMM and delta-mixture references of its training data, per sigma.

    Args:
        ckpt_path: a checkpoint written by `diffscore fit` (its data are rebuilt from it) or an NVlabs/edm .pkl.
        out: folder for ev.json and ev.png (default: print only).
        gmm_components: the k of each GMM reference (k-means on the training data; default [10]).
        num_points: training points noised at each sigma.
        data: the training data (an EDM dataset ZIP or folder; default: the checkpoint's, which an NVlabs/edm
            pickle does not have).
    """
    folder = _out_folder(out, "probe gaussian")
    model = open_model(ckpt_path)
    denoiser = model.denoiser("probe gaussian")
    train = train_images(training_data(model, data))
    refs = build_references(train.flatten(1).double(), gmm_components or [10])
    table = explained_variance_table(NetworkDenoiser(denoiser), train, refs, num_points=num_points)
    print(format_table(table))
    if folder is not None:
        with folder_output(folder, "probe gaussian") as tmp:
            write_json(tmp / "ev.json", {k: {str(s): v for s, v in r.items()} for k, r in table.items()})
            plot_table(table, tmp / "ev.png", Path(ckpt_path).name)
        print(f"diffscore: wrote {folder / 'ev.json'} and {folder / 'ev.png'}")
    return table


def _regression_set(model: LoadedModel, train):
    """The fixed regression set a RegressionDiffusionModule checkpoint trained on (None for other modules)."""
    if not str(model.settings.get("_class_path", "")).endswith("RegressionDiffusionModule"):
        return None
    law = LogNormalSigma(model.settings.get("P_mean", -1.2), model.settings.get("P_std", 1.2))
    return draw_regression_set(train, int(model.settings.get("noise_seed", 0)), law)


def _reference(reference_ckpt: str, model: LoadedModel) -> LoadedModel:
    """The earlier checkpoint's model, refused unless it is the same network (class and arguments)."""
    ref = open_model(reference_ckpt)
    ref.denoiser("--reference_ckpt")
    if ref.backbone_config != model.backbone_config:
        differ = "; ".join(config_differences(ref.backbone_config, model.backbone_config))
        raise DiffscoreError(
            f"--reference_ckpt {reference_ckpt} holds another network than {model.path} ({differ}); "
            "pass an earlier checkpoint of the same run"
        )
    return ref


def _since_reference(m: NTKMeasurer, K, f_now, model: LoadedModel, ref: LoadedModel, regression: bool) -> dict:
    """Kernel drift since an earlier checkpoint and, for full-batch plain SGD on a regression set, the kernel twin
    started there against the network."""
    ref_view = BackboneOutput(ref.network.requires_grad_(True))
    result = {"ntk/drift": ntk_drift(K, m.gram(ref_view, *m.kernel_set[:2]))}
    steps = model.step - ref.step
    n, out_dim = m.kernel_set[2].shape
    eta, why = plain_sgd_eta(model.settings.get("optimizer"), n, out_dim)
    if regression and m.kernel == "full" and eta is not None and steps >= 0:
        result.update(m.twin_scalars(m.twin(ref_view, eta), m.outputs(ref_view), f_now, steps))
    else:
        reason = why or "it needs the full Gram and a later checkpoint than the reference"
        print(f"diffscore: no kernel twin ({reason if regression else 'it needs a RegressionDiffusionModule'})")
    return result


def probe_ntk(
    ckpt_path: str,
    reference_ckpt: str | None = None,
    out: str | None = None,
    settings: NTKSettings = NTKSettings(),
    data: str | None = None,
) -> dict[str, float]:
    """NTK measurements of a model: score error against the exact score (per sigma), held-out loss, the kernel's
    top eigenvalues and kernel-target alignment; with ``reference_ckpt`` (an earlier checkpoint of the same run)
    also the kernel drift since then and, for full-batch plain SGD on a RegressionDiffusionModule, the kernel twin
    started at the reference against the network.

    Args:
        ckpt_path: a checkpoint written by `diffscore fit` (its data are rebuilt from it).
        reference_ckpt: an earlier checkpoint of the same run (K_0 and F_0 of the drift and the twin).
        out: folder for ntk.json (default: print only).
        data: the training data (an EDM dataset ZIP or folder; default: the checkpoint's).
    """
    folder = _out_folder(out, "probe ntk")
    model = open_model(ckpt_path)
    denoiser = model.denoiser("probe ntk").requires_grad_(True)  # the kernel differentiates in the weights
    dm = training_data(model, data)
    train, heldout = train_images(dm), split_images(dm, "val")
    if heldout is None or len(heldout) == 0:
        raise DiffscoreError(f"{type(dm).__name__} has no 'val' split; the NTK probe needs held-out points")
    regression_set = _regression_set(model, train)
    ref = None if reference_ckpt is None else _reference(reference_ckpt, model)
    mixture = dm.mixture if isinstance(dm, GMMDataModule) else None
    m = NTKMeasurer(train, heldout, denoiser.coefficients, settings, mixture, regression_set)
    view = BackboneOutput(denoiser)
    f_now = m.outputs(view)
    result = m.score_errors(f_now[0])
    K = m.gram(view, *m.kernel_set[:2])
    result.update(m.kernel_scalars(K, None))
    if ref is not None:
        result.update(_since_reference(m, K, f_now, model, ref, regression_set is not None))
    width = max(len(k) for k in result)
    print(f"exact score: {m.exact_name}; kernel: {m.kernel}")
    print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in result.items()))
    if folder is not None:
        with folder_output(folder, "probe ntk") as tmp:
            write_json(tmp / "ntk.json", result)
        print(f"diffscore: wrote {folder / 'ntk.json'}")
    return result
