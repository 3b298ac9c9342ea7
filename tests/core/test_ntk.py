import pytest
import torch
from torch import nn

from diffscore.core.ntk import (
    KernelTwin,
    empirical_ntk,
    flatten_gram,
    kernel_ridge_regression,
    kernel_target_alignment,
    ntk_drift,
    ntk_spectrum,
    ntk_trace_estimate,
    ntk_vector_product,
)

D, OUT = 3, 2


class SmallMLP(nn.Module):
    """f(x, sigma) = W2 tanh(W1 [x, log sigma] + b1) + b2, [B, D] -> [B, OUT]."""

    def __init__(self, width: int = 7) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D + 1, width)
        self.fc2 = nn.Linear(width, OUT)

    def forward(self, x, sigma):
        return self.fc2(torch.tanh(self.fc1(torch.cat([x, sigma.log()[:, None]], 1))))


class Linear(nn.Module):
    """f(x, sigma) = W x: linear in its parameters (NTK = x.x' I, constant during training)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, OUT, bias=False)

    def forward(self, x, sigma):
        return self.fc(x)


def _setup(model_cls=SmallMLP, n1=5, n2=4, seed=0):
    torch.manual_seed(seed)
    model = model_cls().double()
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n1, D, generator=g, dtype=torch.float64)
    x2 = torch.randn(n2, D, generator=g, dtype=torch.float64)
    s1 = torch.rand(n1, generator=g, dtype=torch.float64) + 0.1
    s2 = torch.rand(n2, generator=g, dtype=torch.float64) + 0.1
    return model, dict(model.named_parameters()), x1, x2, s1, s2


def explicit_jacobian(model, x, sigma):
    """[N, OUT, P] by one autograd.grad call per (sample, output): the slow independent reference."""
    out = model(x, sigma)
    rows = []
    for i in range(out.shape[0]):
        per_out = []
        for a in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, a], list(model.parameters()), retain_graph=True)
            per_out.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_out))
    return torch.stack(rows)


def test_empirical_ntk_equals_explicit_jacobian_product():
    model, params, x1, x2, s1, s2 = _setup()
    j1, j2 = explicit_jacobian(model, x1, s1), explicit_jacobian(model, x2, s2)
    full = empirical_ntk(model, params, x1, x2, (s1, s2))
    assert full.shape == (5, 4, OUT, OUT)
    torch.testing.assert_close(full, torch.einsum("iap,jbp->ijab", j1, j2), rtol=1e-12, atol=1e-12)
    trace = empirical_ntk(model, params, x1, x2, (s1, s2), compute="trace")
    torch.testing.assert_close(trace, full.diagonal(dim1=2, dim2=3).sum(-1), rtol=1e-12, atol=1e-12)
    diag = empirical_ntk(model, params, x1, x2, (s1, s2), compute="diagonal")
    torch.testing.assert_close(diag, full.diagonal(dim1=2, dim2=3), rtol=1e-12, atol=1e-12)
    # a scalar sigma is broadcast to every input
    torch.testing.assert_close(
        empirical_ntk(model, params, x1, x2, 0.3),
        empirical_ntk(model, params, x1, x2, (torch.full((5,), 0.3).double(), torch.full((4,), 0.3).double())),
    )
    with pytest.raises(ValueError, match="compute"):
        empirical_ntk(model, params, x1, x2, 0.3, compute="frobenius")
    with pytest.raises(ValueError, match="pair"):
        empirical_ntk(model, params, x1, x2, s1)


def test_gram_is_symmetric_psd():
    model, params, x1, _, s1, _ = _setup(n1=8)
    K = flatten_gram(empirical_ntk(model, params, x1, x1, s1))  # [16, 16]
    torch.testing.assert_close(K, K.T, rtol=1e-12, atol=1e-12)
    lam = torch.linalg.eigvalsh(K)
    assert lam.min() > -1e-10 * lam.max()
    torch.testing.assert_close(ntk_spectrum(K), lam.flip(0))
    assert ntk_spectrum(K, k=3).shape == (3,)
    Kt = empirical_ntk(model, params, x1, x1, s1, compute="trace")
    assert torch.linalg.eigvalsh(Kt).min() > -1e-10 * Kt.diagonal().max()


def test_ntk_vector_product_matches_full_gram():
    model, params, x1, x2, s1, s2 = _setup()
    v = torch.randn(4, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    K = flatten_gram(empirical_ntk(model, params, x1, x2, (s1, s2)))  # [10, 8]
    kv = ntk_vector_product(model, params, x1, x2, (s1, s2), v)
    torch.testing.assert_close(kv.reshape(-1), K @ v.reshape(-1), rtol=1e-10, atol=1e-12)


def test_projection_trace_estimator_is_unbiased():
    model, params, x1, x2, s1, s2 = _setup()
    exact = empirical_ntk(model, params, x1, x2, (s1, s2), compute="trace")
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([ntk_trace_estimate(model, params, x1, x2, (s1, s2), 1, generator=g) for _ in range(600)])
    mean, stderr = draws.mean(0), draws.std(0) / 600**0.5
    assert ((mean - exact).abs() <= 4.5 * stderr + 1e-12).all()  # every entry within 4.5 standard errors
    assert (mean - exact).norm() / exact.norm() < 0.1
    assert (draws[0] - exact).norm() / exact.norm() > 1e-3  # one projection is an estimate, not the answer
    # num_projections averages the same draws
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    batched = ntk_trace_estimate(model, params, x1, x2, (s1, s2), 3, generator=g1)
    single = [ntk_trace_estimate(model, params, x1, x2, (s1, s2), 1, generator=g2) for _ in range(3)]
    torch.testing.assert_close(batched, torch.stack(single).mean(0))


def _pd_problem(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    K = A @ A.T + 0.5 * torch.eye(n, dtype=torch.float64)
    return K, torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def test_gradient_flow_predictor_limits():
    K, f0, y = _pd_problem()
    twin = KernelTwin(K, f0, y, eta=0.1)
    torch.testing.assert_close(twin.at_time(0.0)[0], f0)
    torch.testing.assert_close(twin.after_steps(0)[0], f0)
    torch.testing.assert_close(twin.at_time(1e4)[0], y)  # a positive-definite Gram interpolates the labels
    # f(t) against the ODE df/dt = -eta K (f - y), integrated by tiny Euler steps
    f, dt = f0.clone(), 1e-4
    for _ in range(20000):
        f = f - dt * 0.1 * K @ (f - y)
    torch.testing.assert_close(twin.at_time(2.0)[0], f, rtol=1e-3, atol=1e-4)


def test_cross_predictions_end_at_kernel_regression():
    K, f0, y = _pd_problem(n=7)
    g = torch.Generator().manual_seed(1)
    K_cross, f0_cross = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    twin = KernelTwin(K, f0, y, eta=0.05, K_cross=K_cross, f0_cross=f0_cross)
    _, cross_inf = twin.at_time(1e5)
    krr = kernel_ridge_regression(K, y - f0, ridge=0.0, K_cross=K_cross)
    torch.testing.assert_close(cross_inf, f0_cross + krr)
    # ridge regression on the training inputs shrinks towards 0 as the ridge grows, and fits at ridge 0
    torch.testing.assert_close(kernel_ridge_regression(K, y, 0.0), y)
    assert kernel_ridge_regression(K, y, 1e6).norm() < 1e-3 * y.norm()


def test_kernel_twin_equals_gradient_descent_of_a_linear_model():
    model, params, x, x_test, s, s_test = _setup(Linear, n1=6, n2=3)
    y = torch.randn(6, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    K = flatten_gram(empirical_ntk(model, params, x, x, s))
    K_cross = flatten_gram(empirical_ntk(model, params, x_test, x, (s_test, s)))
    with torch.no_grad():
        f0, f0_test = model(x, s), model(x_test, s_test)
    lr = 0.05
    twin = KernelTwin(K, f0, y, eta=lr, K_cross=K_cross, f0_cross=f0_test)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(1, 31):
        opt.zero_grad()
        (0.5 * (model(x, s) - y).square().sum()).backward()  # loss 1/2 ||f - y||^2: f moves by -lr K (f - y)
        opt.step()
        if step in (1, 7, 30):
            train, test = twin.after_steps(step)
            with torch.no_grad():
                torch.testing.assert_close(model(x, s), train, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(model(x_test, s_test), test, rtol=1e-10, atol=1e-12)
    # the same model trained with a 100x smaller step for 100x more steps approaches the flow at t = 30 lr
    model2, *_ = _setup(Linear, n1=6, n2=3)  # the same initial weights (same seed)
    opt = torch.optim.SGD(model2.parameters(), lr=lr / 100)
    for _ in range(3000):
        opt.zero_grad()
        (0.5 * (model2(x, s) - y).square().sum()).backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model2(x, s), twin.at_time(30.0)[0], rtol=5e-3, atol=5e-3)


def test_drift_alignment():
    model, params, x, _, s, _ = _setup(n1=6)
    K0 = flatten_gram(empirical_ntk(model, params, x, x, s))
    assert ntk_drift(flatten_gram(empirical_ntk(model, dict(model.named_parameters()), x, x, s)), K0) == 0.0
    with torch.no_grad():  # a step of a nonlinear net moves its kernel
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert ntk_drift(flatten_gram(empirical_ntk(model, dict(model.named_parameters()), x, x, s)), K0) > 1e-3
    y = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert kernel_target_alignment(torch.outer(y, y), y) == pytest.approx(1.0)
    a = kernel_target_alignment(K0, y)
    assert -1.0 <= a <= 1.0
    assert kernel_target_alignment(3 * K0, y) == pytest.approx(a)  # scale-free
    assert a == pytest.approx(float(y @ K0 @ y / (K0.norm() * (y @ y))))
    Y = y.reshape(6, 2)  # a trace Gram [N, N] is aligned with Y Y^T
    assert kernel_target_alignment(Y @ Y.T, Y) == pytest.approx(1.0)
