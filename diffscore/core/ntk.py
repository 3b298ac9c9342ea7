"""Empirical neural tangent kernels and the kernel-regression twin of gradient-descent training.

Han, Razaviyayn & Xu 2024 (arXiv 2401.15604) read denoising score matching as regression of the denoising target
on (x_sigma, sigma) with noisy labels; for a wide network, gradient descent on it follows kernel regression with
the network's neural tangent kernel (Jacot et al. 2018):

    K(x, x')_{ab} = sum_p  d f_a(x) / d theta_p  *  d f_b(x') / d theta_p          (O x O block per pair of inputs)

Under gradient flow d theta / dt = -eta J^T (f - y) (the loss 1/2 ||f(X) - y||^2) with K fixed at its
initial value, the outputs on the training inputs X and on other inputs X' follow (Lee et al. 2019, Eq. 9)

    f_X(t)  = f_X(0)  + (I - exp(-eta K t)) (y - f_X(0))
    f_X'(t) = f_X'(0) + K_X'X K^{-1} (I - exp(-eta K t)) (y - f_X(0))

and n discrete steps of size eta replace exp(-eta K t) by (I - eta K)^n; both are exact for a model linear in its
parameters. Everything here is pure torch on torch.func (functional_call, vmap, jacrev, jvp, vjp), following
the recipe of PyTorch's "Neural Tangent Kernels" tutorial; kernels and twins are computed in float64 where the
inputs allow. A model is called as ``model(x, sigma)`` and returns [B, O] (any trailing shape is flattened).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffscore.core.schedules import LogNormalSigma

COMPUTE_MODES = ("full", "trace", "diagonal")


def _sigmas(sigma: float | Tensor | tuple[Tensor, Tensor], n1: int, n2: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """sigma as ([N1], [N2]): a scalar for all inputs, a pair (sigma1, sigma2), or one [N] when N1 == N2."""
    if isinstance(sigma, tuple | list):
        if len(sigma) != 2:
            raise ValueError("sigma as a sequence must be the pair (sigma1 [N1], sigma2 [N2])")
        s1, s2 = (torch.as_tensor(s, dtype=like.dtype, device=like.device) for s in sigma)
    else:
        s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
        if s.ndim > 0 and n1 != n2:
            raise ValueError(f"one sigma tensor needs N1 == N2 (got {n1}, {n2}); pass the pair (sigma1, sigma2)")
        s1 = s2 = s
    s1 = s1.expand(n1) if s1.ndim == 0 else s1.reshape(-1)
    s2 = s2.expand(n2) if s2.ndim == 0 else s2.reshape(-1)
    if s1.shape != (n1,) or s2.shape != (n2,):
        raise ValueError(f"sigma must give [N1]={n1} and [N2]={n2} values, got {tuple(s1.shape)}, {tuple(s2.shape)}")
    return s1, s2


def _outputs(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, sigma: Tensor) -> Tensor:
    # attention through the math backend: the fused kernels have no forward-mode (jvp) or batching rules
    with sdpa_kernel([SDPBackend.MATH]):
        return functional_call(model, dict(params), (x, sigma)).flatten(1)  # [B, O]


def per_sample_jacobian(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, sigma: Tensor, chunk_size: int | None = None
) -> Tensor:
    """The Jacobian of each sample's output with respect to ``params``, flattened: [N, O, P]."""

    def one(p: dict[str, Tensor], xi: Tensor, si: Tensor) -> Tensor:
        return _outputs(model, p, xi.unsqueeze(0), si.unsqueeze(0)).squeeze(0)  # [O]

    detached = {k: v.detach() for k, v in params.items()}  # kernels are measured, never differentiated
    jac = vmap(jacrev(one), (None, 0, 0), chunk_size=chunk_size)(detached, x, sigma)  # name -> [N, O, *shape]
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)  # [N, O, P]


def empirical_ntk(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x1: Tensor,
    x2: Tensor,
    sigma: float | Tensor | tuple[Tensor, Tensor],
    compute: str = "full",
    chunk_size: int | None = None,
) -> Tensor:
    """The empirical NTK between x1 [N1, ...] and x2 [N2, ...] with respect to ``params`` (a dict of the tensors
    to differentiate, by name as in ``model.named_parameters()``; other parameters and buffers stay fixed).

    compute: "full" -> [N1, N2, O, O]; "trace" -> [N1, N2] (sum over a of K_aa); "diagonal" -> [N1, N2, O]
    (the K_aa). sigma: a scalar, a pair (sigma1 [N1], sigma2 [N2]), or one [N] tensor when N1 == N2.
    Built from per-sample Jacobians (vmap of jacrev), so memory is N * O * P; for large models use
    :func:`ntk_vector_product` or :func:`ntk_trace_estimate`.
    """
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
    s1, s2 = _sigmas(sigma, len(x1), len(x2), x1)
    j1 = per_sample_jacobian(model, params, x1, s1, chunk_size)  # [N1, O, P]
    same = x2 is x1 and torch.equal(s1, s2)
    j2 = j1 if same else per_sample_jacobian(model, params, x2, s2, chunk_size)  # [N2, O, P]
    if compute == "full":
        return torch.einsum("iap,jbp->ijab", j1, j2)
    if compute == "trace":
        return torch.einsum("iap,jap->ij", j1, j2)
    return torch.einsum("iap,jap->ija", j1, j2)


def ntk_vector_product(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x1: Tensor,
    x2: Tensor,
    sigma: float | Tensor | tuple[Tensor, Tensor],
    v: Tensor,
) -> Tensor:
    """(K v)_i = sum_j K(x1_i, x2_j) v_j for v [N2, O] -> [N1, O], without forming K or a Jacobian:
    J1 (J2^T v) as one vector-Jacobian product at x2 and one Jacobian-vector product at x1 (whole batches).
    Exact for models that treat samples independently (no batch statistics)."""
    s1, s2 = _sigmas(sigma, len(x1), len(x2), x1)
    params = {k: v.detach() for k, v in params.items()}
    out2, pullback = vjp(lambda p: _outputs(model, p, x2, s2), params)
    if v.shape != out2.shape:
        raise ValueError(f"v must have the output shape [N2, O]={tuple(out2.shape)}, got {tuple(v.shape)}")
    (direction,) = pullback(v.to(out2.dtype))  # J2^T v, shaped like params
    return jvp(lambda p: _outputs(model, p, x1, s1), (params,), (direction,))[1]  # [N1, O]


def ntk_trace_estimate(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x1: Tensor,
    x2: Tensor,
    sigma: float | Tensor | tuple[Tensor, Tensor],
    num_projections: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Unbiased random-projection estimate of the trace NTK [N1, N2] (Hutchinson's estimator in parameter space).

    For Rademacher directions u in parameter space, E[u u^T] = I, so E[(J1 u)(J2 u)^T] = J1 J2^T; the trace over
    outputs of each projection is taken exactly. Each projection costs one forward-mode pass (jvp) per input
    batch, with memory of a forward pass: usable on U-Net-size models, where N * O * P Jacobians are not.
    """
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    s1, s2 = _sigmas(sigma, len(x1), len(x2), x1)
    params = {k: v.detach() for k, v in params.items()}
    total = None
    for _ in range(num_projections):
        u = {
            k: (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(device=p.device, dtype=p.dtype)
            for k, p in params.items()
        }
        ju1 = jvp(lambda p: _outputs(model, p, x1, s1), (params,), (u,))[1]  # [N1, O]
        ju2 = jvp(lambda p: _outputs(model, p, x2, s2), (params,), (u,))[1]  # [N2, O]
        est = ju1 @ ju2.T  # [N1, N2]
        total = est if total is None else total + est
    return total / num_projections


def flatten_gram(K: Tensor) -> Tensor:
    """[N1, N2, O, O] -> [N1 O, N2 O], rows ordered (sample, output) like ``f.reshape(-1)`` of f [N, O]."""
    n1, n2, o1, o2 = K.shape
    return K.permute(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)


class KernelTwin:
    """The kernel-regression twin of gradient descent on 1/2 ||f(X) - y||^2 with the kernel frozen at K.

    K: Gram on the training inputs [n, n] (flattened, see :func:`flatten_gram`); f0, y: outputs at initialisation
    and labels, [n] or [N, O]; eta: the step size in function space (with loss mean over N*O entries and
    learning rate lr: eta = 2 lr / (N O)). Optional K_cross [n', n] and f0_cross [n'] predict other inputs.
    The eigendecomposition K = V diag(lambda) V^T is computed once, in float64; eigenvalues below ``rtol``
    times the largest count as zero (those directions move linearly in time, the limit lambda -> 0).
    """

    def __init__(
        self,
        K: Tensor,
        f0: Tensor,
        y: Tensor,
        eta: float,
        K_cross: Tensor | None = None,
        f0_cross: Tensor | None = None,
        rtol: float = 1e-12,
    ) -> None:
        self.shape = tuple(f0.shape)
        K = K.to(torch.float64)
        n = K.shape[0]
        if K.shape != (n, n) or f0.numel() != n or y.numel() != n:
            raise ValueError(f"K must be [n, n] with f0 and y of n entries; got {tuple(K.shape)}, {f0.numel()}")
        if eta <= 0:
            raise ValueError(f"eta must be positive, got {eta}")
        self.eta = float(eta)
        lam, V = torch.linalg.eigh((K + K.T) / 2)
        self.lam = torch.where(lam > rtol * lam.abs().max(), lam, torch.zeros_like(lam))  # [n]
        self.V = V  # [n, n]
        self.f0 = f0.reshape(-1).to(torch.float64)
        self.coeff = V.T @ (y.reshape(-1).to(torch.float64) - self.f0)  # residual in the eigenbasis
        self.cross = None
        if K_cross is not None:
            if f0_cross is None or K_cross.shape[1] != n:
                raise ValueError(f"K_cross must be [n', {n}] and comes with f0_cross")
            self.cross_shape = tuple(f0_cross.shape)
            self.cross = (K_cross.to(torch.float64) @ V, f0_cross.reshape(-1).to(torch.float64))

    def _predict(self, decay: Tensor, linear: Tensor) -> tuple[Tensor, Tensor | None]:
        """decay = the factor on each eigen-residual (exp(-eta lambda t) or (1 - eta lambda)^n); linear = the
        limit of (1 - decay) / lambda as lambda -> 0."""
        train = self.f0 + self.V @ ((1 - decay) * self.coeff)
        if self.cross is None:
            return train.reshape(self.shape), None
        safe = torch.where(self.lam > 0, self.lam, torch.ones_like(self.lam))
        gain = torch.where(self.lam > 0, (1 - decay) / safe, linear)  # K^{-1} (1 - decay) per eigendirection
        KcV, f0c = self.cross
        return train.reshape(self.shape), (f0c + KcV @ (gain * self.coeff)).reshape(self.cross_shape)

    def at_time(self, t: float) -> tuple[Tensor, Tensor | None]:
        """Gradient flow: f(t) = f(0) + (I - exp(-eta K t)) (y - f(0)); returns (f_X(t), f_X'(t) or None)."""
        decay = torch.exp(-self.eta * self.lam * t)
        return self._predict(decay, torch.full_like(self.lam, self.eta * t))

    def after_steps(self, n: int) -> tuple[Tensor, Tensor | None]:
        """n gradient-descent steps: f_n = f(0) + (I - (I - eta K)^n) (y - f(0)) (exact for a linear model)."""
        decay = (1 - self.eta * self.lam) ** n
        return self._predict(decay, torch.full_like(self.lam, self.eta * n))


def kernel_ridge_regression(K: Tensor, y: Tensor, ridge: float, K_cross: Tensor | None = None) -> Tensor:
    """Kernel ridge regression with the Gram K [n, n] and labels y [n] or [N, O]: alpha = (K + ridge I)^{-1} y;
    returns K_cross alpha ([n'], or the fit on the training inputs K alpha when K_cross is None), float64."""
    K = K.to(torch.float64)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    yf = y.reshape(-1).to(torch.float64)
    alpha = torch.linalg.solve(K + ridge * torch.eye(len(K), dtype=K.dtype, device=K.device), yf)
    return (K if K_cross is None else K_cross.to(torch.float64)) @ alpha


def ntk_spectrum(K: Tensor, k: int | None = None) -> Tensor:
    """The eigenvalues of a (flattened, symmetric) Gram, largest first; the top ``k`` if given."""
    K = K.to(torch.float64)
    lam = torch.linalg.eigvalsh((K + K.T) / 2).flip(0)
    return lam if k is None else lam[:k]


def kernel_target_alignment(K: Tensor, y: Tensor) -> float:
    """A(K, y) = <K, T>_F / (||K||_F ||T||_F) with the target Gram T = Y Y^T (Cristianini et al. 2002), in [-1, 1];
    1 when K is proportional to T. With a flattened Gram [N O, N O], Y is y flattened to [N O, 1] (so
    A = y^T K y / (||K||_F ||y||^2)); with a trace Gram [N, N], Y = y as [N, O]."""
    K = K.to(torch.float64)
    Y = y.to(torch.float64).reshape(K.shape[0], -1)
    T = Y @ Y.T
    return float((K * T).sum() / (torch.linalg.matrix_norm(K) * torch.linalg.matrix_norm(T)).clamp_min(1e-300))


def ntk_drift(K_t: Tensor, K_0: Tensor) -> float:
    """||K_t - K_0||_F / ||K_0||_F: how far the kernel moved from its value at initialisation (0 in the lazy
    limit of infinite width)."""
    K_t, K_0 = K_t.to(torch.float64), K_0.to(torch.float64)
    return float((K_t - K_0).norm() / K_0.norm().clamp_min(1e-300))


def relative_error(pred: Tensor, ref: Tensor, base: Tensor | None = None) -> float:
    """||pred - ref|| / ||ref - base|| (base defaults to 0): e.g. the twin's error relative to how far the
    network's outputs moved from initialisation."""
    ref = ref.to(torch.float64)
    denom = ref if base is None else ref - base.to(torch.float64)
    return float((pred.to(torch.float64) - ref).norm() / denom.norm().clamp_min(1e-300))


__all__ = [
    "COMPUTE_MODES",
    "KernelTwin",
    "empirical_ntk",
    "flatten_gram",
    "kernel_ridge_regression",
    "kernel_target_alignment",
    "ntk_drift",
    "ntk_spectrum",
    "ntk_trace_estimate",
    "ntk_vector_product",
    "per_sample_jacobian",
    "relative_error",
]


def draw_regression_set(x0: Tensor, noise_seed: int, sigma_law: LogNormalSigma) -> tuple[Tensor, Tensor, Tensor]:
    """The fixed regression set of score matching with noisy labels (Han, Razaviyayn & Xu 2024, Sec. 3):
    (x0 [N, ...], sigma [N], noise [N, ...]) on the CPU, one seeded sigma_i and n_i per training point."""
    g = torch.Generator().manual_seed(noise_seed)
    sigma = sigma_law(len(x0), generator=g)  # [N]
    noise = torch.randn(x0.shape, generator=g)  # [N, ...]
    return x0.float().cpu(), sigma, noise
