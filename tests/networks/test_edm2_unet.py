"""diffscore's EDM2UNet computes NVlabs/edm2's UNet (training/networks_edm2.py, Karras et al. 2024).

``edm2_precond`` below restates EDM2's Precond/UNet/Block forward in float64 with EDM2's parameter names, in plain
torch.nn.functional ops, from the facts of EDM2's classes: normalize = x / (eps + RMS(x)) with eps 1e-4; MPConv's
weight normalize(w) * gain / sqrt(fan_in), after a forced normalize(w) of the stored weight in training; mp_silu,
mp_sum, mp_cat, MPFourier; the [1, 1] resampling (2x2 mean down, pixel repeat up); the encoder's skip conv and
pixel norm before the residual branch, the decoder's skip conv after it; cosine attention with qkv channels read as
(head, channel, part); the ones channel, the label one-hot times sqrt(label_dim), out_gain; EDM's coefficients and
the logvar head. It draws its tensors, random, the first time it runs, and reads them afterwards.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffscore.errors import DiffscoreError
from diffscore.networks.backbone import config
from diffscore.networks.edm2_unet import EDM2UNet
from diffscore.networks.mp_layers import (
    MPConv,
    MPFourier,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    normalize_mp_weights_,
    set_forced_normalization,
)

SIDE = 16


class EDM2Tensors:
    """An EDM2 state_dict that fills itself: a name's tensor is drawn the first time it is asked for."""

    def __init__(self, seed: int) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def get(self, name: str, shape: tuple[int, ...], kind: str = "weight") -> torch.Tensor:
        if name not in self.state:
            r = lambda *s: torch.randn(s, generator=self.gen, dtype=torch.float64)  # noqa: E731
            if kind == "weight":  # rows of unequal size: each output channel's normalisation matters
                t = r(*shape) * torch.exp(r(shape[0])).view(-1, *[1] * (len(shape) - 1))
            elif kind == "gain":  # EDM2 starts gains at 0; a test needs them non-zero
                t = 0.5 + r(*shape).abs()
            elif kind == "freqs":
                t = 2 * math.pi * r(*shape)
            else:  # phases
                t = 2 * math.pi * torch.rand(shape, generator=self.gen, dtype=torch.float64)
            self.state[name] = t
        assert tuple(self.state[name].shape) == shape, name
        return self.state[name]


def rms_normalize(x, dims):
    """x / (1e-4 + sqrt(mean of x^2 over dims))."""
    return x / (1e-4 + x.square().mean(dim=dims, keepdim=True).sqrt())


def mp_weight(P, name, shape, train, gain=1.0):
    w = P.get(f"{name}.weight", shape)
    dims = list(range(1, len(shape)))
    if train:  # forced weight normalisation overwrites the stored weight first
        w = rms_normalize(w, dims)
    return rms_normalize(w, dims) * gain / math.sqrt(math.prod(shape[1:]))


def conv(P, name, x, cout, k, train, gain=1.0):
    return F.conv2d(x, mp_weight(P, name, (cout, x.shape[1], k, k), train, gain), padding=k // 2)


def linear(P, name, x, cout, train, gain=1.0):
    return x @ mp_weight(P, name, (cout, x.shape[1]), train, gain).T


def silu(x):
    return x * torch.sigmoid(x) / 0.596


def msum(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)


def mcat(a, b, t):
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * c * (1 - t) / math.sqrt(na), b * c * t / math.sqrt(nb)], dim=1)


def fourier(P, name, x, channels):
    freqs, phases = P.get(f"{name}.freqs", (channels,), "freqs"), P.get(f"{name}.phases", (channels,), "phases")
    return math.sqrt(2) * torch.cos(x[:, None] * freqs[None] + phases[None])


def attention(P, name, x, heads, train):
    B, C, H, W = x.shape
    D = C // heads
    y = conv(P, f"{name}.attn_qkv", x, 3 * C, 1, train).reshape(B, heads, D, 3, H * W)
    y = rms_normalize(y, [2])
    q, k, v = y[:, :, :, 0], y[:, :, :, 1], y[:, :, :, 2]  # [B, h, D, HW]
    logits = torch.einsum("bhdq,bhdk->bhqk", q, k) / math.sqrt(D)
    w = torch.exp(logits - logits.amax(dim=3, keepdim=True))
    a = torch.einsum("bhqk,bhdk->bhdq", w / w.sum(dim=3, keepdim=True), v).reshape(B, C, H, W)
    return conv(P, f"{name}.attn_proj", a, C, 1, train)


def block(P, cfg, name, x, emb, cout, flavor, mode="keep", attn=False, train=False):
    B, cin, H, W = x.shape
    if mode == "down":
        x = x.reshape(B, cin, H // 2, 2, W // 2, 2).mean(dim=(3, 5))
    if mode == "up":
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if flavor == "enc":
        if cin != cout:
            x = conv(P, f"{name}.conv_skip", x, cout, 1, train)
        x = rms_normalize(x, [1])
    y = conv(P, f"{name}.conv_res0", silu(x), cout, 3, train)
    c = linear(P, f"{name}.emb_linear", emb, cout, train, gain=P.get(f"{name}.emb_gain", (), "gain")) + 1
    y = silu(y * c[:, :, None, None])
    if train and cfg.get("dropout", 0):
        y = F.dropout(y, p=cfg["dropout"])
    y = conv(P, f"{name}.conv_res1", y, cout, 3, train)
    if flavor == "dec" and cin != cout:
        x = conv(P, f"{name}.conv_skip", x, cout, 1, train)
    x = msum(x, y, 0.3)
    heads = cout // cfg.get("channels_per_head", 64) if attn else 0
    if heads:
        x = msum(x, attention(P, name, x, heads, train), 0.3)
    return x.clip(-256, 256)


def edm2_unet(P, cfg, x, c_noise, onehot=None, train=False):
    """EDM2's UNet.forward with prefix-less names (EDM2's UNet state_dict keys)."""
    mc, mults, nb = cfg["model_channels"], cfg["channel_mult"], cfg["num_blocks"]
    widths, attn_res = [mc * m for m in mults], cfg["attn_resolutions"]
    emb = linear(P, "emb_noise", fourier(P, "emb_fourier", c_noise, widths[0]), max(widths), train)
    if cfg.get("label_dim"):
        L = cfg["label_dim"]
        onehot = torch.zeros(x.shape[0], L, dtype=x.dtype) if onehot is None else onehot
        emb = msum(emb, linear(P, "emb_label", onehot * math.sqrt(L), max(widths), train), 0.5)
    emb = silu(emb)
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for level, width in enumerate(widths):
        res = SIDE >> level
        if level == 0:
            x = conv(P, f"enc.{res}x{res}_conv", x, width, 3, train)
        else:
            x = block(P, cfg, f"enc.{res}x{res}_down", x, emb, x.shape[1], "enc", "down", train=train)
        skips.append(x)
        for idx in range(nb):
            x = block(P, cfg, f"enc.{res}x{res}_block{idx}", x, emb, width, "enc", attn=res in attn_res, train=train)
            skips.append(x)
    for level, width in reversed(list(enumerate(widths))):
        res = SIDE >> level
        if level == len(widths) - 1:
            x = block(P, cfg, f"dec.{res}x{res}_in0", x, emb, x.shape[1], "dec", attn=True, train=train)
            x = block(P, cfg, f"dec.{res}x{res}_in1", x, emb, x.shape[1], "dec", train=train)
        else:
            x = block(P, cfg, f"dec.{res}x{res}_up", x, emb, x.shape[1], "dec", "up", train=train)
        for idx in range(nb + 1):
            x = mcat(x, skips.pop(), 0.5)
            x = block(P, cfg, f"dec.{res}x{res}_block{idx}", x, emb, width, "dec", attn=res in attn_res, train=train)
    return conv(P, "out_conv", x, cfg["img_channels"], 3, train, gain=P.get("out_gain", (), "gain"))


class Prefixed:
    """The same tensors seen under ``prefix`` (EDM2's Precond holds the UNet as ``unet``)."""

    def __init__(self, P: EDM2Tensors, prefix: str) -> None:
        self.P, self.prefix = P, prefix

    def get(self, name, shape, kind="weight"):
        return self.P.get(self.prefix + name, shape, kind)


def edm2_precond(P, cfg, x, sigma, onehot=None, train=False):
    """EDM2's Precond.forward(..., return_logvar=True) in float64: (D(x; sigma), logvar [B])."""
    sd = 0.5
    s = sigma.view(-1, 1, 1, 1)
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (sd**2 + s**2).sqrt()
    c_noise = sigma.log() / 4
    F_x = edm2_unet(Prefixed(P, "unet."), cfg, c_in * x, c_noise, onehot, train)
    logvar = linear(P, "logvar_linear", fourier(P, "logvar_fourier", c_noise, 128), 1, train)
    return c_skip * x + c_out * F_x, logvar.reshape(-1)


UNET = dict(
    img_channels=3,
    model_channels=16,
    channel_mult=[1, 2, 2],
    num_blocks=2,
    attn_resolutions=[8],
    channels_per_head=8,  # 2-4 heads at these widths (EDM2's 64 would give none)
)
CASES = {"uncond": dict(UNET), "cond": dict(UNET, label_dim=10), "cond_dropout": dict(UNET, label_dim=10, dropout=0.3)}


def our_kwargs(cfg):
    """EDM2UNet's kwargs for a reference config."""
    kwargs = {k: v for k, v in cfg.items() if k != "img_channels"}
    return dict(kwargs, data_shape=[cfg["img_channels"], SIDE, SIDE])


def reference_net(cfg, seed=0):
    """EDM2's UNet state_dict for ``cfg`` (random, float64), drawn by one run of the reference."""
    P = EDM2Tensors(seed)
    x = torch.zeros(1, cfg["img_channels"], SIDE, SIDE, dtype=torch.float64)
    edm2_unet(P, cfg, x, torch.zeros(1, dtype=torch.float64), None)
    return P


def inputs(seed=1, batch=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, SIDE, SIDE, generator=gen, dtype=torch.float64)
    return x, torch.randn(batch, generator=gen, dtype=torch.float64), torch.tensor([1, 7, 3])[:batch]


def assert_same(out, ref):
    assert ref.abs().mean() > 0.1  # outputs of order one, so atol 1e-10 is a real bound
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_edm2_unet_is_the_float64_reference(case, train):
    cfg = CASES[case]
    P = reference_net(cfg)
    net = EDM2UNet(**our_kwargs(cfg)).double()
    net.load_state_dict(P.state, strict=True)
    net.train(train)
    x, c_noise, labels = inputs()
    onehot = F.one_hot(labels, 10).double() if cfg.get("label_dim") else None
    with torch.random.fork_rng():
        torch.manual_seed(5)
        out = net(x, c_noise, labels if onehot is not None else None)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        ref = edm2_unet(P, cfg, x, c_noise, onehot, train=train)
    assert_same(out, ref)
    stored = net.enc["16x16_block0"].conv_res0.weight.detach()
    w0 = P.state["enc.16x16_block0.conv_res0.weight"]
    expected = rms_normalize(w0, [1, 2, 3]) if train else w0  # forced normalisation in training only
    torch.testing.assert_close(stored, expected, atol=1e-12, rtol=0)


def test_edm2_unet_missing_label_is_the_zero_label_and_one_hot_equals_indices():
    cfg = CASES["cond"]
    net = EDM2UNet(**our_kwargs(cfg)).double().eval()
    net.load_state_dict(reference_net(cfg).state)
    x, c_noise, labels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(x, c_noise, labels), net(x, c_noise, F.one_hot(labels, 10).double()))
        torch.testing.assert_close(net(x, c_noise, None), net(x, c_noise, torch.zeros(3, 10, dtype=torch.float64)))
        assert (net(x, c_noise, labels) - net(x, c_noise, None)).abs().mean() > 1e-3


def test_edm2_unet_zero_augmentation_label_is_no_augmentation():
    torch.manual_seed(0)
    net = EDM2UNet(**our_kwargs(CASES["uncond"]), augment_dim=6).double().eval()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        for module in net.modules():
            if hasattr(module, "emb_gain"):
                module.emb_gain.fill_(1.0)
        x, c_noise, _ = inputs()
        aug = torch.randn(3, 6, dtype=torch.float64)
        none = net(x, c_noise, None, None)
        torch.testing.assert_close(net(x, c_noise, None, torch.zeros_like(aug)), none, atol=0, rtol=0)
        assert (net(x, c_noise, None, aug) - none).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="augment_dim=0"):
        EDM2UNet(**our_kwargs(CASES["uncond"]))(x.float(), c_noise.float(), None, aug.float())


def test_edm2_unet_starts_at_zero_and_trains():
    """out_gain starts at 0 (F = 0 at initialisation, EDM2 Fig. 21) and receives a gradient."""
    torch.manual_seed(0)
    net = EDM2UNet(**our_kwargs(CASES["cond"]))
    x, c_noise, labels = (t.float() if t.is_floating_point() else t for t in inputs())
    out = net(x, c_noise, labels)
    assert torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out)).sum().backward()
    assert net.out_gain.grad.abs() > 0


def test_presets_and_bad_preset():
    net = EDM2UNet([3, 64, 64], preset="m", channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    assert net.enc["64x64_conv"].out_channels == 256 and net.enc["64x64_block0"].dropout == 0.1
    assert EDM2UNet([3, 64, 64], preset="XS", channel_mult=[1], num_blocks=1).enc["64x64_conv"].out_channels == 128
    with pytest.raises(DiffscoreError, match=r"'huge'.*xs, s, m, l, xl, xxl") as err:
        EDM2UNet(preset="huge")
    assert "\n" not in str(err.value)
    rebuilt = EDM2UNet(**config(net)["init_args"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# magnitude-preserving primitives (EDM2 Eqs. 47, 66, 75, 81, 88, 103)


def unit_normal(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_and_mp_cat_preserve_unit_magnitude(t):
    """Exactly, for inputs of unit mean square that are uncorrelated (b made orthogonal to a)."""
    a, b = unit_normal(400, 64, seed=1), unit_normal(400, 64, seed=2)
    b = b - (a * b).sum() / a.square().sum() * a
    a, b = a / a.square().mean().sqrt(), b / b.square().mean().sqrt()
    assert mp_sum(a, b, t).square().mean().item() == pytest.approx(1.0, abs=1e-12)
    c = unit_normal(400, 192, seed=3)
    c = c / c.square().mean().sqrt()
    cat = mp_cat(a, c, t=t)
    assert cat.square().mean().item() == pytest.approx(1.0, abs=1e-12)
    share_c = cat[:, 64:].square().sum() / cat.square().sum()  # c's share of the energy: t^2 / ((1-t)^2 + t^2)
    assert share_c.item() == pytest.approx(t**2 / ((1 - t) ** 2 + t**2), abs=1e-12)


def test_mp_silu_has_unit_second_moment_on_a_standard_normal():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)  # quadrature of E[mp_silu(x)^2], x ~ N(0, 1)
    density = torch.exp(-x.square() / 2) / math.sqrt(2 * math.pi)
    second_moment = torch.trapezoid(mp_silu(x).square() * density, x).item()
    assert second_moment == pytest.approx(1.0, abs=2e-3)  # 0.596 is EDM2's rounded constant


def test_mp_fourier_has_unit_magnitude():
    torch.manual_seed(0)
    y = MPFourier(4096)(torch.randn(64))
    assert y.square().mean().item() == pytest.approx(1.0, abs=0.03)


def test_mpconv_effective_weights_have_unit_norm_per_output_channel_whatever_the_scale():
    torch.manual_seed(0)
    layer = MPConv(50, 7, kernel=[]).double().eval()
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 2, 7, dtype=torch.float64)[:, None])
    w_eff = layer(torch.eye(50, dtype=torch.float64)).T  # [7, 50]: row i = output channel i's weight
    rms = layer.weight.detach().square().mean(1).sqrt()  # [7], from 0.01 to 100 times N(0, 1)'s
    torch.testing.assert_close(w_eff.norm(dim=1), rms / (1e-4 + rms), atol=1e-12, rtol=0)  # 1 but for eps
    conv = MPConv(32, 16, kernel=[3, 3]).eval()
    y = conv(torch.randn(8, 32, 24, 24))
    assert y.square().mean().item() == pytest.approx(1.0, abs=0.05)  # unit variance in, unit variance out
    assert normalize(conv.weight).flatten(1).square().mean(1).allclose(torch.ones(16), atol=1e-3)


def test_forced_weight_normalisation_only_in_training_with_gradients():
    torch.manual_seed(0)
    layer = MPConv(8, 4, kernel=[3, 3])
    w0 = layer.weight.detach().clone() * 5
    with torch.no_grad():
        layer.weight.copy_(w0)
    x = torch.randn(2, 8, 5, 5)
    layer.eval()
    layer(x)
    assert torch.equal(layer.weight, w0)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert torch.equal(layer.weight, w0)
    layer(x)
    torch.testing.assert_close(layer.weight.detach(), normalize(w0), atol=0, rtol=0)
    net = EDM2UNet(**our_kwargs(CASES["cond"]))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    count = sum(isinstance(m, MPConv) for m in net.modules())
    assert set_forced_normalization(net, False) == count > 20
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, c_noise, labels = (t.float() if t.is_floating_point() else t for t in inputs())
    net.train()(x, c_noise, labels)  # turned off: a training forward leaves the weights alone
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert normalize_mp_weights_(net) == count
    for m in net.modules():
        if isinstance(m, MPConv):
            rms = m.weight.flatten(1).square().mean(1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def test_renormalising_after_each_step_runs_through_edm2s_weights():
    """In-forward forced normalisation (EDM2) and, with it off, normalize_mp_weights_ before training and after
    every optimizer step: the same weights and outputs, step after step."""
    torch.manual_seed(0)
    edm2 = EDM2UNet(**our_kwargs(CASES["cond"])).double()
    post = EDM2UNet(**our_kwargs(CASES["cond"])).double()
    post.load_state_dict(edm2.state_dict())
    set_forced_normalization(post, False)
    normalize_mp_weights_(post)
    opts = [torch.optim.Adam(net.parameters(), lr=0.05) for net in (edm2, post)]
    x, c_noise, labels = inputs()
    for _ in range(3):
        outs = []
        for net, opt in zip((edm2, post), opts):
            out = net.train()(x, c_noise, labels)
            (out * x).sum().backward()
            opt.step()
            opt.zero_grad()
            outs.append(out.detach())
        normalize_mp_weights_(post)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0)
    assert outs[0].abs().mean() > 1e-3
    edm2(x, c_noise, labels)  # EDM2 normalises at its next forward
    for (k, a), b in zip(edm2.state_dict().items(), post.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=k)
