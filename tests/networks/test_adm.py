import pytest
import torch

from diffscore.networks import ADMUNet


def test_imagenet64_adm_has_edms_size():
    net = ADMUNet(data_shape=[3, 64, 64], label_dim=1000)
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(295.9, abs=0.1)


def small(**kw):
    torch.manual_seed(0)
    net = ADMUNet(
        data_shape=[3, 16, 16], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], **kw
    )
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net.eval()


def test_shapes_and_label_hooks():
    net = small(label_dim=5, augment_dim=9)
    x, c = torch.randn(2, 3, 16, 16), torch.randn(2)
    base = net(x, c)
    assert base.shape == (2, 3, 16, 16)
    torch.testing.assert_close(net(x, c, torch.zeros(2, 5), torch.zeros(2, 9)), base)
    assert not torch.allclose(net(x, c, torch.tensor([1, 4])), base)
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(2, 3, 8, 8), c)


def test_output_starts_at_zero_as_edm_initialises_it():
    net = ADMUNet(data_shape=[1, 8, 8], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    assert net(torch.randn(2, 1, 8, 8), torch.zeros(2)).abs().max().item() == 0.0
