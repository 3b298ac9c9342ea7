"""diffscore/loading/edm/dhariwal.py against an independent float64 reference of EDM's DhariwalUNet.

The reference below is written from the facts of NVlabs/edm ``training/networks.py`` (DhariwalUNet, UNetBlock,
Conv2d, Linear, GroupNorm, PositionalEmbedding, AttentionOp) in plain torch functional ops, on parameters in EDM's
own key names and layouts; it shares no code with diffscore's networks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from diffscore.errors import DiffscoreError
from diffscore.loading.edm.dhariwal import adm_from_edm, adm_kwargs_from_edm, adm_state_dict_from_edm
from diffscore.networks import ADMUNet

EDM_DEFAULTS = dict(
    label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3
)
EDM_DEFAULTS["attn_resolutions"] = [32, 16, 8]
PUBLISHED = dict(  # edm-imagenet-64x64-cond-adm.pkl: train.py --arch=adm --cond=1 --dropout=0.10 --augment=0
    img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, model_channels=192, channel_mult=[1, 2, 3, 4]
)
PUBLISHED["dropout"] = 0.10
SMALL = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1)
CASES = {
    "labels": dict(SMALL, attn_resolutions=[8], label_dim=5),  # 64 channels at 8x8: one head
    "labels+augment": dict(  # 128 channels at 8x8: two heads; 32 at 16x16: "attention" with no head, as in EDM
        SMALL, channel_mult=[1, 4], num_blocks=2, channel_mult_emb=2, attn_resolutions=[16, 8], label_dim=5
    ),
}
CASES["labels+augment"]["augment_dim"] = 9
CASES["learned variance"] = dict(CASES["labels"], out_channels=6)  # the iDDPM baseline's 2C outputs
BOX = torch.full((1, 1, 2, 2), 0.25)  # EDM's [1, 1] resample filter


def edm_layers(kw: dict) -> tuple[list[tuple], list[tuple]]:
    """EDM's DhariwalUNet encoder and decoder in forward order: (name, in, out, kind, heads), kind in conv|down|up|
    block; heads = out // 64 where the block has attention (0: none)."""
    k = {**EDM_DEFAULTS, **kw}
    mc, mult, nb = k["model_channels"], k["channel_mult"], k["num_blocks"]
    enc, dec, cout = [], [], k["in_channels"]
    for level, m in enumerate(mult):
        res = k["img_resolution"] >> level
        if level == 0:
            enc.append((f"enc.{res}x{res}_conv", cout, mc * m, "conv", 0))
        else:
            enc.append((f"enc.{res}x{res}_down", cout, cout, "down", 0))
        cout = enc[-1][2]
        for i in range(nb):
            attn = res in k["attn_resolutions"]
            enc.append((f"enc.{res}x{res}_block{i}", cout, mc * m, "block", mc * m // 64 if attn else 0))
            cout = mc * m
    skips = [layer[2] for layer in enc]
    for level, m in reversed(list(enumerate(mult))):
        res = k["img_resolution"] >> level
        if level == len(mult) - 1:
            dec.append((f"dec.{res}x{res}_in0", cout, cout, "block", cout // 64))
            dec.append((f"dec.{res}x{res}_in1", cout, cout, "block", 0))
        else:
            dec.append((f"dec.{res}x{res}_up", cout, cout, "up", 0))
        for i in range(nb + 1):
            attn = res in k["attn_resolutions"]
            dec.append((f"dec.{res}x{res}_block{i}", cout + skips.pop(), mc * m, "block", mc * m // 64 if attn else 0))
            cout = mc * m
    return enc, dec


def edm_state(kw: dict, make) -> dict[str, Tensor]:
    """A DhariwalUNet state_dict in EDM's names and layouts; make(shape, kind) gives each tensor, kind in
    weight|bias|gain. resample_filter buffers are EDM's box filter."""
    k = {**EDM_DEFAULTS, **kw}
    M, E = k["model_channels"], k["model_channels"] * k["channel_mult_emb"]
    p = {}

    def linear(name, cin, cout, bias=True, kernel=None):
        p[f"{name}.weight"] = make([cout, cin] + ([kernel, kernel] if kernel else []), "weight")
        if bias:
            p[f"{name}.bias"] = make([cout], "bias")

    def norm(name, c):
        p[f"{name}.weight"], p[f"{name}.bias"] = make([c], "gain"), make([c], "bias")

    linear("map_layer0", M, E)
    linear("map_layer1", E, E)
    if k["label_dim"]:
        linear("map_label", k["label_dim"], E, bias=False)
    if k["augment_dim"]:
        linear("map_augment", k["augment_dim"], M, bias=False)
    enc, dec = edm_layers(kw)
    for name, cin, cout, kind, heads in enc + dec:
        if kind == "conv":
            linear(name, cin, cout, kernel=3)
            continue
        norm(f"{name}.norm0", cin)
        linear(f"{name}.conv0", cin, cout, kernel=3)
        linear(f"{name}.affine", E, 2 * cout)
        norm(f"{name}.norm1", cout)
        linear(f"{name}.conv1", cout, cout, kernel=3)
        if kind in ("up", "down"):  # conv0 resamples; the skip is a kernel-0 conv: only the resampling
            p[f"{name}.conv0.resample_filter"] = p[f"{name}.skip.resample_filter"] = BOX.clone()
        elif cin != cout:
            linear(f"{name}.skip", cin, cout, kernel=1)
        if heads:
            norm(f"{name}.norm2", cout)
            linear(f"{name}.qkv", cout, 3 * cout, kernel=1)
            linear(f"{name}.proj", cout, cout, kernel=1)
    norm("out_norm", dec[-1][2])
    linear("out_conv", dec[-1][2], k["out_channels"], kernel=3)
    return p


def random_maker(seed: int = 0):
    """make(shape, kind) with float32 (as EDM's pickles hold) weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2),
    gains ~ 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)

    def make(shape, kind):
        t = torch.randn(shape, generator=gen)
        if kind == "weight":
            return t / math.sqrt(math.prod(shape[1:]))
        return 0.1 * t + (1.0 if kind == "gain" else 0.0)

    return make


def edm_group_norm(p: dict, name: str, x: Tensor) -> Tensor:  # EDM GroupNorm: min(32, C // 4) groups, eps 1e-5
    return F.group_norm(x, min(32, x.shape[1] // 4), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)


def edm_conv(p: dict, name: str, x: Tensor, resample: str | None = None) -> Tensor:
    """EDM's Conv2d (not fused): the filter resampling first (transposed for up, x4), then the conv, then bias."""
    C = x.shape[1]
    if resample is not None:
        f = p[f"{name}.resample_filter"].to(x.dtype).tile(C, 1, 1, 1)  # [C, 1, 2, 2]
        x = F.conv_transpose2d(x, f * 4, groups=C, stride=2) if resample == "up" else F.conv2d(x, f, groups=C, stride=2)
    if f"{name}.weight" in p:
        x = F.conv2d(x, p[f"{name}.weight"], padding=p[f"{name}.weight"].shape[-1] // 2)
    if f"{name}.bias" in p:
        x = x + p[f"{name}.bias"].view(1, -1, 1, 1)
    return x


def edm_block(p: dict, name: str, x: Tensor, emb: Tensor, kind: str, heads: int) -> Tensor:
    """EDM's UNetBlock as DhariwalUNet configures it: adaptive scale, skip_scale 1, dropout off (eval)."""
    resample = kind if kind in ("up", "down") else None
    orig = x
    x = edm_conv(p, f"{name}.conv0", F.silu(edm_group_norm(p, f"{name}.norm0", x)), resample)
    params = F.linear(emb, p[f"{name}.affine.weight"], p[f"{name}.affine.bias"])[:, :, None, None]
    scale, shift = params.chunk(2, dim=1)
    x = F.silu(shift + edm_group_norm(p, f"{name}.norm1", x) * (scale + 1))
    x = edm_conv(p, f"{name}.conv1", x)
    if any(key.startswith(f"{name}.skip.") for key in p):
        orig = edm_conv(p, f"{name}.skip", orig, resample)
    x = x + orig
    if heads:
        B, C, H, W = x.shape
        qkv = edm_conv(p, f"{name}.qkv", edm_group_norm(p, f"{name}.norm2", x))  # [B, 3C, H, W]
        q, k, v = qkv.reshape(B * heads, C // heads, 3, H * W).unbind(2)  # each [B*heads, C/heads, HW]
        w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)  # [B*heads, HW, HW]
        a = torch.einsum("nqk,nck->ncq", w, v)  # [B*heads, C/heads, HW]
        x = edm_conv(p, f"{name}.proj", a.reshape(B, C, H, W)) + x
    return x


def edm_forward(p: dict, kw: dict, x: Tensor, c_noise: Tensor, onehot: Tensor | None, aug: Tensor | None) -> Tensor:
    """EDM's DhariwalUNet.forward in eval mode (no label dropout)."""
    half = kw["model_channels"] // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / half)  # float32, endpoint=False, as EDM
    arg = torch.outer(c_noise, freqs.to(c_noise.dtype))  # [B, M/2]
    emb = torch.cat([arg.cos(), arg.sin()], dim=1)  # EDM's order: cos first
    if aug is not None:
        emb = emb + aug @ p["map_augment.weight"].T
    emb = F.silu(F.linear(emb, p["map_layer0.weight"], p["map_layer0.bias"]))
    emb = F.linear(emb, p["map_layer1.weight"], p["map_layer1.bias"])
    if onehot is not None:
        emb = emb + onehot @ p["map_label.weight"].T
    emb = F.silu(emb)
    enc, dec = edm_layers(kw)
    skips = []
    for name, _, _, kind, heads in enc:
        x = edm_conv(p, name, x) if kind == "conv" else edm_block(p, name, x, emb, kind, heads)
        skips.append(x)
    for name, cin, _, kind, heads in dec:
        if x.shape[1] != cin:
            x = torch.cat([x, skips.pop()], dim=1)
        x = edm_block(p, name, x, emb, kind, heads)
    return edm_conv(p, "out_conv", F.silu(edm_group_norm(p, "out_norm", x)))


@pytest.mark.parametrize("case", list(CASES))
def test_imported_adm_computes_edms_dhariwal_unet(case):
    kw = CASES[case]
    state = edm_state(kw, random_maker())
    net = adm_from_edm(kw, state).double().eval()
    state = {k: v.double() for k, v in state.items()}  # the reference runs in float64 on the same values
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    c_noise = torch.randn(3, generator=gen).double()  # float32 values: ADMUNet's embedding reads c_noise in float32
    labels = torch.tensor([0, 4, 2])
    aug = torch.randn(3, 9, generator=gen, dtype=torch.float64) if kw.get("augment_dim") else None
    with torch.no_grad():
        expected = edm_forward(state, kw, x, c_noise, F.one_hot(labels, 5).double(), aug)
        got = net(x, c_noise, labels, aug)
        unconditional = net(x, c_noise, None, aug)
    assert expected.abs().mean() > 0.1  # a non-trivial output to compare
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(unconditional, edm_forward(state, kw, x, c_noise, None, aug), atol=1e-10, rtol=0)


def test_published_imagenet_config_maps_every_tensor():
    kw = adm_kwargs_from_edm(PUBLISHED)
    assert kw == dict(
        data_shape=[3, 64, 64], label_dim=1000, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4],
        channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0.0,
    )  # fmt: skip
    state = edm_state(PUBLISHED, lambda shape, kind: torch.empty(shape, device="meta"))
    mapped = adm_state_dict_from_edm(state, PUBLISHED)
    with torch.device("meta"):
        expected = ADMUNet(**kw).state_dict()
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in expected.items()}
    assert sum(v.numel() for v in mapped.values()) / 1e6 == pytest.approx(295.9, abs=0.1)
    defaults = adm_kwargs_from_edm(dict(img_resolution=64, in_channels=3, out_channels=3))
    assert defaults == dict(kw, label_dim=0)  # EDM's defaults fill what the record leaves out


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(out_channels=0), "out_channels=0"),
        (dict(embedding_type="fourier"), "embedding_type='fourier'"),
        (dict(img_resolution=None), "img_resolution=None"),
        (dict(model_channels=33), "model_channels=33"),
        (dict(channel_mult=[1, 2, 2, 2, 2, 2]), "channel_mult="),
        (dict(dropout=1.5), "dropout=1.5"),
        (dict(label_dim=-1), "label_dim=-1"),
        (dict(attn_resolutions=8), "attn_resolutions=8"),
        (dict(model_channels=66, channel_mult=[1], attn_resolutions=[]), "66 channels"),  # EDM's norm can't split
    ],
)
def test_bad_kwargs_are_diffscore_errors(change, match):
    with pytest.raises(DiffscoreError, match=match):
        adm_kwargs_from_edm(dict(CASES["labels"], **change))


def test_missing_required_kwarg_is_a_diffscore_error():
    with pytest.raises(DiffscoreError, match="lack 'in_channels'"):
        adm_kwargs_from_edm(dict(img_resolution=16, out_channels=3))


def test_bad_state_dicts_are_diffscore_errors_naming_the_key():
    kw = CASES["labels"]
    good = edm_state(kw, lambda shape, kind: torch.zeros(shape))
    bad = dict(good, **{"enc.8x8_block0.qkv.weight": torch.zeros(192, 63, 1, 1)})  # [192, 64, 1, 1] is right
    with pytest.raises(DiffscoreError, match=r"'enc\.8x8_block0\.qkv\.weight' has shape \(192, 63, 1, 1\)"):
        adm_state_dict_from_edm(bad, kw)
    missing = {k: v for k, v in good.items() if k != "map_label.weight"}
    with pytest.raises(DiffscoreError, match="lacks 'map_label.weight'"):
        adm_state_dict_from_edm(missing, kw)
    with pytest.raises(DiffscoreError, match="'enc.99x99_conv.weight' has no place"):
        adm_state_dict_from_edm(dict(good, **{"enc.99x99_conv.weight": torch.zeros(1)}), kw)
    with pytest.raises(DiffscoreError, match="'dec.16x16_up.skip.resample_filter' is not the"):
        adm_state_dict_from_edm(dict(good, **{"dec.16x16_up.skip.resample_filter": torch.ones(1, 1, 2, 2)}), kw)
    no_filters = {k: v for k, v in good.items() if not k.endswith("resample_filter")}  # a reader may skip buffers
    assert adm_state_dict_from_edm(no_filters, kw).keys() == adm_state_dict_from_edm(good, kw).keys()
