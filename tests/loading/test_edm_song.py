"""diffscore's UNet loaded from EDM SongUNet weights computes EDM's SongUNet (NVlabs/edm training/networks.py).

``song_unet`` below restates SongUNet's forward in float64 with EDM's parameter names and layouts, in plain
torch.nn.functional ops, from the facts of EDM's classes (Conv2d with its fused and unfused resampling, UNetBlock,
GroupNorm with min(32, C // 4) groups, Positional/FourierEmbedding and the swap of their halves, the label map with
a bias on a sqrt(label_dim)-scaled one-hot, AttentionOp's (head, channel, part) qkv layout, the standard decoder's
aux_norm/aux_conv output). It creates its tensors, random, the first time it runs, and reads them afterwards.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffscore.errors import DiffscoreError
from diffscore.loading.edm.song import unet_from_edm, unet_kwargs_from_edm, unet_state_dict_from_edm

SIDE = 16


class EDMTensors:
    """An EDM state_dict that fills itself: a name's tensor is drawn the first time it is asked for."""

    def __init__(self, seed: int) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def get(self, name: str, shape: tuple[int, ...], kind: str = "weight") -> torch.Tensor:
        if name not in self.state:
            r = torch.randn(shape, generator=self.gen, dtype=torch.float64)
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            scale = {"weight": 1 / math.sqrt(fan_in), "bias": 0.3, "gain": 0.2, "freqs": 16.0}[kind]
            self.state[name] = r * scale + (1.0 if kind == "gain" else 0.0)
        assert tuple(self.state[name].shape) == shape, name
        return self.state[name]

    def resample_filter(self, name: str, taps: list[int]) -> torch.Tensor:
        f = torch.as_tensor(taps, dtype=torch.float64)
        self.state.setdefault(name, (torch.outer(f, f) / f.sum() ** 2)[None, None])  # [1, 1, k, k], a buffer
        return self.state[name]


def conv(P, name, x, cin, cout, kernel, taps, up=False, down=False, fused=False):
    """EDM's Conv2d: unfused = resample (filter padding) then conv (kernel padding); fused down = conv at both
    paddings, then the filter at stride 2 without padding; the bias last."""
    w = P.get(f"{name}.weight", (cout, cin, kernel, kernel))
    b = P.get(f"{name}.bias", (cout,), "bias")
    f = P.resample_filter(f"{name}.resample_filter", taps) if up or down else None
    f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
    if fused:
        x = F.conv2d(x, w, padding=kernel // 2 + f_pad)
        x = F.conv2d(x, f.tile(cout, 1, 1, 1), groups=cout, stride=2)
    else:
        if up:
            x = F.conv_transpose2d(x, 4 * f.tile(cin, 1, 1, 1), groups=cin, stride=2, padding=f_pad)
        if down:
            x = F.conv2d(x, f.tile(cin, 1, 1, 1), groups=cin, stride=2, padding=f_pad)
        x = F.conv2d(x, w, padding=kernel // 2)
    return x + b.view(1, -1, 1, 1)


def norm(P, name, x):
    C = x.shape[1]
    return F.group_norm(
        x, min(32, C // 4), P.get(f"{name}.weight", (C,), "gain"), P.get(f"{name}.bias", (C,), "bias"), 1e-6
    )


def linear(P, name, x, cin, cout, bias=True):
    y = x @ P.get(f"{name}.weight", (cout, cin)).T
    return y + P.get(f"{name}.bias", (cout,), "bias") if bias else y


def block(P, name, x, emb, cin, cout, taps, up=False, down=False, attn=False):
    """SongUNet's UNetBlock: additive embedding, skip_scale sqrt(1/2), a 1x1 skip when resampling or reshaping,
    one attention head whose qkv channels are (channel, part), part fastest."""
    h = conv(P, f"{name}.conv0", F.silu(norm(P, f"{name}.norm0", x)), cin, cout, 3, taps, up, down)
    h = h + linear(P, f"{name}.affine", emb, emb.shape[1], cout)[:, :, None, None]
    h = conv(P, f"{name}.conv1", F.silu(norm(P, f"{name}.norm1", h)), cout, cout, 3, taps)
    skip = conv(P, f"{name}.skip", x, cin, cout, 1, taps, up, down) if (cin != cout or up or down) else x
    x = (h + skip) * math.sqrt(0.5)
    if attn:
        B, C, H, W = x.shape
        qkv = conv(P, f"{name}.qkv", norm(P, f"{name}.norm2", x), C, 3 * C, 1, taps)
        q, k, v = qkv.reshape(B, C, 3, H * W).unbind(2)  # each [B, C, HW]
        w = torch.einsum("bcq,bck->bqk", q, k / math.sqrt(C)).softmax(dim=2)  # [B, HW, HW]
        a = torch.einsum("bqk,bck->bcq", w, v).reshape(B, C, H, W)
        x = (conv(P, f"{name}.proj", a, C, C, 1, taps) + x) * math.sqrt(0.5)
    return x


def mapping(P, cfg, noise_labels, class_labels, augment_labels):
    mc = cfg["model_channels"]
    noise_ch, emb_ch = mc * cfg.get("channel_mult_noise", 1), mc * cfg.get("channel_mult_emb", 4)
    half = noise_ch // 2
    if cfg.get("embedding_type", "positional") == "positional":
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / (half - 1))  # endpoint=True, float32
        arg = noise_labels[:, None] * freqs.double()
    else:
        arg = noise_labels[:, None] * (2 * math.pi * P.get("map_noise.freqs", (half,), "freqs"))
    emb = torch.cat([arg.cos(), arg.sin()], dim=1)
    emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)  # SongUNet's swap: [sin, cos]
    if cfg.get("label_dim", 0):
        L = cfg["label_dim"]
        emb = emb + linear(P, "map_label", class_labels * math.sqrt(L), L, noise_ch)
    if cfg.get("augment_dim", 0) and augment_labels is not None:
        emb = emb + linear(P, "map_augment", augment_labels, cfg["augment_dim"], noise_ch, bias=False)
    emb = F.silu(linear(P, "map_layer0", emb, noise_ch, emb_ch))
    return F.silu(linear(P, "map_layer1", emb, emb_ch, emb_ch))


def song_unet(P, cfg, x, noise_labels, class_labels=None, augment_labels=None):
    """SongUNet.forward, standard decoder, encoder 'standard' or 'residual'."""
    emb = mapping(P, cfg, noise_labels, class_labels, augment_labels)
    mc, taps, nb = cfg["model_channels"], cfg.get("resample_filter", [1, 1]), cfg.get("num_blocks", 4)
    mults, attn_res = cfg.get("channel_mult", [1, 2, 2, 2]), cfg.get("attn_resolutions", [16])
    skips, aux, cout, caux = [], x, x.shape[1], x.shape[1]
    for level, mult in enumerate(mults):
        res = SIDE >> level
        if level == 0:
            x, cout = conv(P, f"enc.{res}x{res}_conv", x, cout, mc, 3, taps), mc
            skips.append(x)
        else:
            x = block(P, f"enc.{res}x{res}_down", x, emb, cout, cout, taps, down=True)
            skips.append(x)
            if cfg.get("encoder_type") == "residual":
                y = conv(P, f"enc.{res}x{res}_aux_residual", aux, caux, cout, 3, taps, down=True, fused=True)
                x = skips[-1] = aux = (x + y) / math.sqrt(2)
                caux = cout
        for idx in range(nb):
            x = block(P, f"enc.{res}x{res}_block{idx}", x, emb, cout, mc * mult, taps, attn=res in attn_res)
            cout = mc * mult
            skips.append(x)
    for level, mult in reversed(list(enumerate(mults))):
        res = SIDE >> level
        if level == len(mults) - 1:
            x = block(P, f"dec.{res}x{res}_in0", x, emb, cout, cout, taps, attn=True)
            x = block(P, f"dec.{res}x{res}_in1", x, emb, cout, cout, taps)
        else:
            x = block(P, f"dec.{res}x{res}_up", x, emb, cout, cout, taps, up=True)
        for idx in range(nb + 1):
            x = torch.cat([x, skips.pop()], dim=1)
            attn = idx == nb and res in attn_res
            x = block(P, f"dec.{res}x{res}_block{idx}", x, emb, x.shape[1], mc * mult, taps, attn=attn)
            cout = mc * mult
    h = F.silu(norm(P, f"dec.{SIDE}x{SIDE}_aux_norm", x))
    return conv(P, f"dec.{SIDE}x{SIDE}_aux_conv", h, cout, 3, 3, taps)


BASE = dict(img_resolution=SIDE, in_channels=3, out_channels=3, model_channels=16, attn_resolutions=[8])
DDPMPP = dict(BASE, channel_mult=[1, 2], num_blocks=2, dropout=0.13, embedding_type="positional")
NCSNPP = dict(  # channel_mult left to EDM's default [1, 2, 2, 2] (FFHQ/AFHQ's): 16, 8, 4, 2
    BASE,
    num_blocks=1,
    embedding_type="fourier",
    channel_mult_noise=2,
    encoder_type="residual",
    decoder_type="standard",
    resample_filter=[1, 3, 3, 1],
)
CASES = {
    "ddpmpp_uncond": DDPMPP,
    "ddpmpp_cond_aug": dict(DDPMPP, label_dim=10, augment_dim=9),
    "ncsnpp_uncond": NCSNPP,
    "ncsnpp_cond_aug": dict(NCSNPP, label_dim=10, augment_dim=9),
}


def edm_net(cfg, seed=0):
    """EDM's state_dict for ``cfg`` (random, float64) and the inputs the test feeds both networks."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 3, SIDE, SIDE, generator=gen, dtype=torch.float64)
    # UNet's noise embeddings cast c_noise to float32 (embedding.py): draw values float32 holds exactly
    c_noise = torch.randn(3, generator=gen).double()
    labels = torch.tensor([1, 7, 3])
    aug = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    P = EDMTensors(seed)
    song_unet(P, cfg, x, c_noise, F.one_hot(labels, 10).double(), aug)  # draws every tensor
    return P, x, c_noise, labels, aug


def assert_same(out, ref):
    assert ref.abs().mean() > 0.1  # outputs of order one, so atol 1e-10 is a real bound
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_unet_from_edm_is_edm_song_unet_in_float64(case):
    cfg = CASES[case]
    P, x, c_noise, labels, aug = edm_net(cfg)
    assert any(k.endswith("resample_filter") for k in P.state)  # EDM's buffers are given, and checked
    net = unet_from_edm(cfg, P.state).eval()
    assert next(net.parameters()).dtype == torch.float64
    with torch.no_grad():
        if not cfg.get("label_dim"):
            assert_same(net(x, c_noise), song_unet(P, cfg, x, c_noise))
            return
        onehot = F.one_hot(labels, 10).double()
        assert_same(net(x, c_noise, labels, aug), song_unet(P, cfg, x, c_noise, onehot, aug))
        assert_same(net(x, c_noise, onehot), song_unet(P, cfg, x, c_noise, onehot))  # one-hot rows, no aug label
        # cond=None is EDM's all-zero label (what EDMPrecond passes for class_labels=None), whose map_label bias
        # still enters: classifier-free guidance's unconditional half is EDM's
        zeros = torch.zeros(3, 10, dtype=torch.float64)
        assert_same(net(x, c_noise), song_unet(P, cfg, x, c_noise, zeros))


def test_state_dict_mapping_renames_permutes_and_folds():
    cfg = CASES["ncsnpp_cond_aug"]
    P, *_ = edm_net(cfg)
    state = unet_state_dict_from_edm(P.state, cfg)
    assert "out_conv.weight" in state and "enc.8x8_aux_residual.0.weight" in state
    assert not any(k.endswith("resample_filter") or k.startswith("map_") for k in state)
    torch.testing.assert_close(state["emb.map_noise.freqs"], P.state["map_noise.freqs"])
    torch.testing.assert_close(state["out_norm.weight"], P.state["dec.16x16_aux_norm.weight"])
    qkv_edm, qkv = P.state["dec.2x2_in0.qkv.weight"], state["dec.2x2_in0.qkv.weight"]  # [3C, C, 1, 1]
    torch.testing.assert_close(qkv[32 + 5], qkv_edm[3 * 5 + 1])  # k of channel 5: (part, channel) <- (channel, part)
    w0, b_label = P.state["map_layer0.weight"], P.state["map_label.bias"]
    torch.testing.assert_close(state["emb.map_layer0.bias"], P.state["map_layer0.bias"] + w0 @ b_label)
    before = {k: v.clone() for k, v in P.state.items()}
    unet_state_dict_from_edm(P.state, cfg)
    assert all(torch.equal(before[k], v) for k, v in P.state.items())
    filters = {k: v for k, v in P.state.items() if not k.endswith("resample_filter")}
    assert unet_state_dict_from_edm(filters, cfg).keys() == state.keys()  # the buffers are optional


def test_kwargs_fill_edm_defaults():
    kw = unet_kwargs_from_edm(dict(img_resolution=64, in_channels=3, out_channels=3))
    assert kw == dict(
        data_shape=[3, 64, 64],
        label_dim=0,
        augment_dim=0,
        model_channels=128,
        channel_mult=[1, 2, 2, 2],
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=[16],
        dropout=0.10,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        resample_filter=[1, 1],
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(encoder_type="skip"), "encoder_type='skip'"),
        (dict(decoder_type="skip"), "decoder_type='skip'"),
        (dict(embedding_type="sinusoidal"), "embedding_type='sinusoidal'"),
        (dict(out_channels=6), "out_channels=6"),
        (dict(img_resolution=28), "img_resolution=28"),
        (dict(channel_mult=[1, 2, 2, 2, 2, 2]), "channel_mult"),
        (dict(model_channels=2.5), "model_channels=2.5"),
        (dict(model_channels=18), "GroupNorm"),  # 18 channels: EDM's min(32, 18 // 4) = 4 groups do not divide
        (dict(dropout=1.5), "dropout=1.5"),
        (dict(resample_filter=[1]), "resample_filter"),
        (dict(use_fp16=True), "use_fp16"),
        (dict(img_resolution=None), "img_resolution"),  # None: left out
    ],
)
def test_bad_kwargs_are_a_diffscore_error_naming_the_option(change, match):
    cfg = {k: v for k, v in {**DDPMPP, **change}.items() if v is not None}
    with pytest.raises(DiffscoreError, match=match):
        unet_state_dict_from_edm({}, cfg)


def _broken(state, key, value):
    state = dict(state)
    if value is None:
        del state[key]
    else:
        state[key] = value
    return state


@pytest.mark.parametrize(
    "key, value",
    [
        ("enc.16x16_block0.conv0.weight", torch.zeros(16, 16, 1, 1)),  # wrong shape
        ("map_layer1.bias", None),  # missing
        ("map_label.bias", None),  # missing: the conditional net's label bias
        ("map_augment.weight", "not a tensor"),
        ("enc.16x16_block0.extra.weight", torch.zeros(1)),  # unexpected
        ("enc.8x8_block0.conv0.resample_filter", torch.zeros(1, 1, 2, 2)),  # a filter where no resampling is
        ("enc.8x8_down.conv0.resample_filter", torch.ones(1, 1, 2, 2)),  # not [1, 1]'s filter
    ],
)
def test_bad_state_is_a_diffscore_error_naming_the_key(key, value):
    cfg = CASES["ddpmpp_cond_aug"]
    P, *_ = edm_net(cfg)
    with pytest.raises(DiffscoreError, match=key.replace(".", r"\.")):
        unet_from_edm(cfg, _broken(P.state, key, value))
