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


def test_state_dict_layout_is_pinned():  # checkpoints written today must keep loading
    with torch.device("meta"):
        net = ADMUNet(
            data_shape=[3, 16, 16], model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
            label_dim=5, augment_dim=9,
        )  # fmt: skip
    sd = net.state_dict()
    assert list(net.enc) == ["16x16_conv", "16x16_block0", "8x8_down", "8x8_block0"]
    assert list(net.dec) == [
        "8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "16x16_up", "16x16_block0", "16x16_block1"
    ]  # fmt: skip
    assert {k: tuple(v.shape) for k, v in sd.items() if k.startswith("emb.")} == {
        "emb.map_label.weight": (128, 5),
        "emb.map_augment.weight": (32, 9),
        "emb.map_layer0.weight": (128, 32),
        "emb.map_layer0.bias": (128,),
        "emb.map_layer1.weight": (128, 128),
        "emb.map_layer1.bias": (128,),
    }
    assert [k for k in sd if k.endswith("qkv.weight")] == [
        f"{b}.qkv.weight" for b in ["enc.8x8_block0", "dec.8x8_in0", "dec.8x8_block0", "dec.8x8_block1"]
    ]
    assert {k.split(".")[2] for k in sd if k.startswith("enc.8x8_block0.")} == {
        "norm0", "conv0", "affine", "norm1", "conv1", "skip", "norm2", "qkv", "proj"
    }  # fmt: skip
    assert len(sd) == 146 and tuple(sd["out_conv.weight"].shape) == (3, 32, 3, 3)
