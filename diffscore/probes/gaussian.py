"""How Gaussian is the learned score? EV of the network's score against analytic references, per sigma.

References, all fitted to the training data: the Gaussian (mean + covariance), a GMM with k components
(k-means), and the delta mixture (the training set's exact score). Probe points are training images noised
at each sigma (Wang & Vastola 2024, Fig. 2). The GaussianScoreProbe callback logs ``probe/ev_<ref>_s<sigma>``
during fit and `diffscore probe gaussian` prints the table of a checkpoint; both call this module.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffscore.core.gaussian import DeltaMixtureDenoiser, GaussianDenoiser, GMMDenoiser, score_explained_variance
from diffscore.io import atomic_write, pyplot

SIGMA_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


def build_references(train: Tensor, gmm_components: list[int]) -> dict:
    refs = {"gaussian": GaussianDenoiser.from_data(train)}
    for k in gmm_components:
        refs[f"gmm{k}"] = GMMDenoiser.from_data(train, k)
    refs["delta"] = DeltaMixtureDenoiser(train)
    return refs


@torch.no_grad()
def explained_variance_table(
    denoiser, train: Tensor, refs: dict, sigmas=SIGMA_GRID, num_points: int = 256, seed: int = 0
) -> dict[str, dict[float, float]]:
    """{reference: {sigma: mean EV}} over ``num_points`` training points noised at each sigma."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[:num_points]
    x0 = train[idx]
    device = getattr(denoiser, "device", "cpu")  # a network on its device, or an analytic denoiser
    table: dict[str, dict[float, float]] = {name: {} for name in refs}
    for s in sigmas:
        x = x0 + s * torch.randn(x0.shape, generator=g)
        sig = torch.full((len(x),), float(s))
        d_net = denoiser(x.to(device), sig.to(device)).cpu()
        for name, ref in refs.items():
            ev = score_explained_variance(d_net, ref(x, sig), x)
            table[name][float(s)] = float(ev.mean())
    return table


def plot_table(table: dict[str, dict[float, float]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, row in table.items():
        ax.plot(list(row), list(row.values()), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(min(-0.1, min(min(r.values()) for r in table.values())), 1.05)
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xlabel("sigma")
    ax.set_ylabel("explained variance of the network's score")
    ax.set_title(title)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def format_table(table: dict[str, dict[float, float]]) -> str:
    sigmas = list(next(iter(table.values())))
    lines = [f"{'sigma':>8}" + "".join(f"{name:>12}" for name in table)]
    for s in sigmas:
        lines.append(f"{s:>8g}" + "".join(f"{table[name][s]:>12.3f}" for name in table))
    return "\n".join(lines)


class NetworkDenoiser:
    """A network denoiser (a preconditioning) as a float64 function on its device, for the EV table."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        self.device = next(iter(denoiser.parameters())).device

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.denoiser(x.float(), sigma.float()).double()
