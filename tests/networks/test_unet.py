import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffscore.networks import MLP, UNet
from diffscore.networks.group_norm import GroupNorm
from diffscore.networks.resample import ConvDown, Resample, upsample_nearest
from diffscore.networks.unet import UNetBlock


def count(net, resolution, channels=3):
    params = sum(p.numel() for p in net.parameters())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net.eval()(torch.randn(1, channels, resolution, resolution), torch.zeros(1))
    return params, fc.get_total_flops()


def test_ddpmpp_cifar10_matches_edm_size_and_cost(capsys):
    """EDM's DDPM++ at 32x32: 55.7M parameters, 42.4 GFLOP per image (FACTS.md)."""
    params, flops = count(UNet(), 32)
    with capsys.disabled():
        print(f"\nDDPM++ 32x32: {params / 1e6:.2f}M parameters, {flops / 1e9:.2f} GFLOP/img")
    assert params / 1e6 == pytest.approx(55.73, abs=0.05)
    assert flops / 1e9 == pytest.approx(42.38, abs=0.1)


def test_ddpmpp_ffhq64_matches_edm_size_and_cost():
    params, flops = count(UNet(data_shape=[3, 64, 64], channel_mult=[1, 2, 2, 2]), 64)
    assert params / 1e6 == pytest.approx(61.80, abs=0.05)
    assert flops / 1e9 == pytest.approx(83.72, abs=0.1)


def test_ncsnpp_options_run():
    net = UNet(
        data_shape=[3, 16, 16],
        model_channels=32,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        embedding_type="fourier",
        channel_mult_noise=2,
        encoder_type="residual",
        resample_filter=[1, 3, 3, 1],
    )
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def small(**kw):
    torch.manual_seed(0)
    net = UNet(
        data_shape=[1, 8, 8],
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        **kw,
    )
    for p in net.parameters():  # leave the near-zero init so that every input path shows in the output
        p.data.normal_(0, 0.2)
    return net.eval()


def test_zero_labels_mean_none():
    net = small(label_dim=10, augment_dim=9)
    x, c = torch.randn(3, 1, 8, 8), torch.randn(3)
    base = net(x, c)
    torch.testing.assert_close(net(x, c, torch.zeros(3, 10), torch.zeros(3, 9)), base)
    assert not torch.allclose(net(x, c, torch.tensor([1, 2, 3])), base)
    assert not torch.allclose(net(x, c, None, torch.ones(3, 9)), base)
    # class indices and one-hot rows are the same thing
    torch.testing.assert_close(net(x, c, torch.tensor([1, 2, 3])), net(x, c, F.one_hot(torch.tensor([1, 2, 3]), 10)))


def test_conditioning_without_hook_is_an_error():
    with pytest.raises(ValueError, match="label_dim"):
        small()(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expects"):
        small()(torch.randn(2, 3, 8, 8), torch.zeros(2))


MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_attention_equals_a_slow_einsum_implementation(memory_format):
    torch.manual_seed(0)
    block = UNetBlock(16, 16, emb_channels=8, attention=True, num_heads=2).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    out = block.to(memory_format=memory_format)(x.contiguous(memory_format=memory_format), emb)
    assert out.is_contiguous(memory_format=memory_format)
    # reference: the same block with attention computed by hand
    h = F.silu(block.norm0(x))
    h = block.conv0(h)
    h = F.silu(block.norm1(h + block.affine(emb)[:, :, None, None]))
    y = (block.conv1(h) + x) * math.sqrt(0.5)
    qkv = block.qkv(block.norm2(y)).reshape(2, 3, 2, 8, 16)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [B, heads, C/h, HW]
    w = torch.einsum("bhci,bhcj->bhij", q, k).div(math.sqrt(8)).softmax(-1)
    a = torch.einsum("bhij,bhcj->bhci", w, v).reshape(2, 16, 4, 4)
    ref = (block.proj(a) + y) * math.sqrt(0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_upsample_nearest_channels_last_equals_interpolate_in_value_and_gradient():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    out, ref = upsample_nearest(x), F.interpolate(x, scale_factor=2, mode="nearest")
    assert out.shape == (2, 3, 8, 10) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_unet_is_the_same_function_in_channels_last_memory():
    torch.manual_seed(0)
    net = UNet(data_shape=[3, 16, 16], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    net.eval()
    layouts = []  # the memory layout every group norm sees: one layout throughout, no conversions
    for module in net.modules():
        if isinstance(module, GroupNorm):
            module.register_forward_pre_hook(lambda _, args: layouts.append(args[0].is_contiguous()))
    x, c_noise = torch.randn(2, 3, 16, 16), torch.randn(2)
    ref = net(x, c_noise)
    assert all(layouts)  # a contiguous network stays contiguous (the CPU's fast path)
    layouts.clear()
    out = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), c_noise)
    assert layouts and not any(layouts) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_resampling_filters():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(Resample("down")(Resample("up")(x)), x)  # box filter: up then down is identity
    torch.testing.assert_close(Resample("down")(x), F.avg_pool2d(x, 2))
    const = torch.full((1, 2, 8, 8), 0.7)
    fir_down = Resample("down", [1, 3, 3, 1])(const)
    fir_up = Resample("up", [1, 3, 3, 1])(const)
    assert fir_down.shape == (1, 2, 4, 4) and fir_up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(fir_down[..., 1:-1, 1:-1], torch.full((1, 2, 2, 2), 0.7))  # interior keeps the DC
    torch.testing.assert_close(fir_up[..., 2:-2, 2:-2], torch.full((1, 2, 12, 12), 0.7))


@pytest.mark.parametrize("taps", [[1, 1], [1, 3, 3, 1]])
def test_conv_down_is_edms_fused_conv_and_keeps_the_old_keys(taps):
    """NCSN++'s aux_residual: EDM's Conv2d(kernel=3, down=True, fused_resample=True) = conv without bias at padding
    1 + f_pad, the filter at stride 2 without padding, then the bias (FACTS.md). For [1, 3, 3, 1] that differs from
    conv-then-resample on the border only; for [1, 1] it is conv-then-average-pool."""
    torch.manual_seed(0)
    layer = ConvDown(3, 5, taps)
    layer[0].bias.data.normal_()
    assert set(layer.state_dict()) == {"0.weight", "0.bias"}  # the keys of the earlier Sequential(conv, Resample)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w, b = layer[0].weight.double(), layer[0].bias.double()
    f = torch.as_tensor(taps, dtype=torch.float64)
    f = (torch.outer(f, f) / f.sum() ** 2).expand(5, 1, len(taps), len(taps))
    pad = (len(taps) - 1) // 2
    ref = F.conv2d(F.conv2d(x, w, padding=1 + pad), f, groups=5, stride=2) + b.view(1, 5, 1, 1)
    out = layer.double()(x)
    assert out.shape == (2, 5, 4, 4)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    unfused = layer[1](layer[0](x))  # conv (with bias, padding 1), then the resampling with its zero padding
    torch.testing.assert_close(out[..., 1:-1, 1:-1], unfused[..., 1:-1, 1:-1], atol=1e-12, rtol=0)
    assert (taps == [1, 1]) == torch.allclose(out, unfused, atol=1e-12, rtol=0)


def test_residual_encoder_state_dict_keys_are_unchanged():
    net = UNet(data_shape=[3, 16, 16], model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, encoder_type="residual")
    aux = sorted(k for k in net.state_dict() if "aux" in k)
    assert aux == [f"enc.{r}x{r}_aux_residual.0.{p}" for r in (4, 8) for p in ("bias", "weight")]


def test_bad_configs():
    with pytest.raises(ValueError, match="power of two"):
        UNet(data_shape=[3, 12, 12])
    with pytest.raises(ValueError, match="encoder_type"):
        UNet(data_shape=[3, 8, 8], encoder_type="skip")


def test_mlp_shapes_and_hooks():
    torch.manual_seed(0)
    net = MLP(data_shape=[3], width=32, depth=2, label_dim=4)
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    x, c = torch.randn(5, 3), torch.randn(5)
    assert net(x, c).shape == (5, 3)
    torch.testing.assert_close(net(x, c, torch.zeros(5, 4)), net(x, c))
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(5, 2), c)


def _text_unet(**kw):
    from diffscore.networks.text_encoder import SPECIALS

    torch.manual_seed(0)
    net = UNet(
        data_shape=[1, 16, 16],
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        text_dim=16,
        text_layers=1,
        text_heads=2,
        text_vocab_size=32,
        text_max_length=12,
        cross_attn_resolutions=[16, 8],
        **kw,
    )
    net.text_encoder.set_vocabulary([*SPECIALS, "a", "music", "score", "violin", "cello"])
    return net


def test_text_unet_prompt_changes_output_through_both_paths():
    """The pooled caption (noise embedding) and the tokens (cross-attention) each change the prediction."""
    net = _text_unet().eval()
    crosses = [m for m in net.modules() if type(m).__name__ == "CrossAttention"]
    assert len(crosses) == 8  # 16x16: 1 encoder + 2 decoder blocks; 8x8: 1 encoder, in0, in1, 2 decoder blocks
    with torch.no_grad():  # "initialised": give the near-zero (1e-5) last layers real weights so differences show
        blocks = [m for m in net.modules() if isinstance(m, UNetBlock)]
        for m in [net.out_conv, *(c.proj for c in crosses), *(b.conv1 for b in blocks)]:
            m.weight.normal_(0, 0.1)
    x, c_noise = torch.randn(2, 1, 16, 16), torch.zeros(2)

    def diff():
        with torch.no_grad():
            return (net(x, c_noise, ["a music score violin"] * 2) - net(x, c_noise, ["a music score cello"] * 2)).abs()

    assert diff().mean() > 1e-3
    saved = net.emb.map_text.weight.detach().clone()
    with torch.no_grad():
        net.emb.map_text.weight.zero_()  # tokens only
    assert diff().mean() > 1e-3
    with torch.no_grad():
        net.emb.map_text.weight.copy_(saved)
        for c in crosses:
            c.proj.weight.zero_()  # pooled vector only
    assert diff().mean() > 1e-3
    with torch.no_grad():
        net.emb.map_text.weight.zero_()
    assert diff().max() == 0  # neither: the caption has no way in


def test_text_dropout_replaces_captions_by_the_empty_one_in_training_only():
    net = _text_unet(text_dropout=0.5)
    captions = ["a music score violin"] * 400
    null = net.text_encoder.tokenize([""])[0]
    torch.manual_seed(1)
    dropped = (net.train()._text_tokens(captions, 400) == null).all(1).float().mean()
    assert 0.4 < dropped < 0.6
    assert not (net.eval()._text_tokens(captions, 400) == null).all(1).any()


def test_text_options_are_checked_and_default_configs_have_no_text_parameters():
    with pytest.raises(ValueError, match="needs text_dim"):
        UNet(data_shape=[1, 16, 16], cross_attn_resolutions=[8])
    with pytest.raises(ValueError, match="not both"):
        UNet(data_shape=[1, 16, 16], label_dim=10, text_dim=16)
    assert not any("text" in n or "cross" in n for n, _ in UNet(data_shape=[1, 16, 16]).named_parameters())
