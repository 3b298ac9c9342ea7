import pytest
import torch

from diffscore.core.ntk import empirical_ntk
from diffscore.core.precond import EDMPrecond
from diffscore.networks import TheoryNet
from diffscore.probes.ntk import BackboneOutput


def _inputs(n=5, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.rand(n, generator=g) + 0.1


def test_only_the_first_layer_is_trained():
    torch.manual_seed(0)
    net = TheoryNet(data_shape=[3], width=16)
    assert [name for name, _ in net.named_parameters()] == ["weight"]
    assert "output_weight" in net.state_dict() and set(net.output_weight.unique().tolist()) == {-1.0, 1.0}
    out = net(torch.randn(4, 3), torch.randn(4))
    out.square().sum().backward()
    assert out.shape == (4, 3) and net.weight.grad is not None
    with pytest.raises(ValueError, match="unconditional"):
        TheoryNet(data_shape=[3], label_dim=10)


def test_ntk_equals_the_two_layer_closed_form():
    """K(z, z')_ab = (1/m) sum_r a_ra a_rb 1[w_r.z > 0] 1[w_r.z' > 0] z.z' (exact at any width)."""
    torch.manual_seed(0)
    net = TheoryNet(data_shape=[2], width=50).double()
    x, sigma = _inputs()
    x, sigma = x.double(), sigma.double()
    model = BackboneOutput(EDMPrecond(net))  # (x, sigma) -> F(c_in x, c_noise)
    K = empirical_ntk(model, dict(model.named_parameters()), x, x, sigma)  # [5, 5, 2, 2]
    var = sigma**2 + 0.25
    z = torch.cat([x * var.rsqrt()[:, None], (sigma.log() / 4)[:, None], torch.ones(5, 1).double()], 1)
    act = (z @ net.weight.T > 0).double()  # [5, m]
    a = net.output_weight.double()
    closed = torch.einsum("ir,jr,ra,rb->ijab", act, act, a, a) * (z @ z.T)[:, :, None, None] / 50
    torch.testing.assert_close(K, closed, rtol=1e-10, atol=1e-12)


def test_ntk_scaling_gives_a_width_independent_kernel():
    """As m grows, K(z, z)_aa -> |z|^2 / 2 and the off-diagonal output block -> 0 (random signs)."""
    torch.manual_seed(0)
    x, sigma = _inputs(n=3)
    width, tol = 20000, 0.03
    model = BackboneOutput(EDMPrecond(TheoryNet(data_shape=[2], width=width)))
    K = empirical_ntk(model, dict(model.named_parameters()), x, x, sigma)
    var = sigma**2 + 0.25
    z = torch.cat([x * var.rsqrt()[:, None], (sigma.log() / 4)[:, None], torch.ones(3, 1)], 1)
    diag = K.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1)  # [3, 2]: K(z_i, z_i)_aa
    torch.testing.assert_close(diag, (z.square().sum(1) / 2)[:, None].expand(3, 2), rtol=tol, atol=0)
    assert K[:, :, 0, 1].abs().max() < 3 * tol * K[:, :, 0, 0].abs().max()
