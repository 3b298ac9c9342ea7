"""An NVlabs/edm2 network pickle (written by tests/edm2_files.py as EDM2's training loop writes it) loads onto
diffscore's EDM2Precond(EDM2UNet, LogVarHead) and computes EDM2's network: the float64 reference of
tests/networks/test_edm2_unet.py on the file's float16 weights. Files that are not EDM2's network of their kwargs
give one line naming the file and the tensor or module."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffscore.errors import DiffscoreError
from diffscore.loading.edm.pickle import read_edm_pickle
from diffscore.loading.edm2.network import EDM2_SAMPLER, edm2_facts, load_edm2_network
from tests.edm2_files import CLASSES, _class_at, encoder_record, write_edm2_network
from tests.networks.test_edm2_unet import SIDE, EDM2Tensors, Prefixed, edm2_precond, edm2_unet, fourier, linear

CFG = dict(
    img_channels=3,
    label_dim=10,
    model_channels=16,
    channel_mult=[1, 2, 2],
    num_blocks=2,
    attn_resolutions=[8],
    channels_per_head=8,
)
KWARGS = dict(  # EDM2's Precond kwargs for CFG, as train_edm2.py passes them (use_fp16, dropout given)
    img_resolution=SIDE,
    img_channels=3,
    label_dim=10,
    model_channels=16,
    channel_mult=[1, 2, 2],
    num_blocks=2,
    attn_resolutions=[8],
    channels_per_head=8,
    dropout=0.0,
    use_fp16=True,
)


def edm2_state(seed=0) -> dict[str, torch.Tensor]:
    """EDM2 Precond's state_dict for CFG: random float64 tensors, drawn by one run of the reference."""
    P = EDM2Tensors(seed)
    x = torch.zeros(1, 3, SIDE, SIDE, dtype=torch.float64)
    edm2_precond(P, CFG, x, torch.ones(1, dtype=torch.float64), torch.zeros(1, 10, dtype=torch.float64))
    return P.state


class Fixed:
    """A reference tensor source that only reads (the file's float16 weights, as float64)."""

    def __init__(self, state):
        self.state = {k: v.to(torch.float16).double() for k, v in state.items()}

    def get(self, name, shape, kind="weight"):
        assert tuple(self.state[name].shape) == shape, name
        return self.state[name]


def write(tmp_path, state=None, kwargs=KWARGS, name="net.pkl", **extra):
    return write_edm2_network(tmp_path / name, kwargs, edm2_state() if state is None else state, **extra)


def test_loaded_network_is_edm2s_on_the_files_weights(tmp_path):
    state = edm2_state()
    path = write(tmp_path, state)
    net, facts = load_edm2_network(read_edm_pickle(path), path)
    assert not net.training and next(net.parameters()).dtype == torch.float32
    ref = Fixed(state)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, SIDE, SIDE, generator=gen, dtype=torch.float64)
    c_noise, labels = torch.randn(3, generator=gen, dtype=torch.float64), torch.tensor([2, 9, 0])
    onehot = F.one_hot(labels, 10).double()
    net64 = net.double()
    with torch.no_grad():  # the backbone and the logvar head, in float64: EDM2's functions exactly
        out = net64.backbone(x, c_noise, labels)
        expected = edm2_unet(Prefixed(ref, "unet."), CFG, x, c_noise, onehot)
        assert expected.abs().mean() > 0.1
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
        logvar = linear(ref, "logvar_linear", fourier(ref, "logvar_fourier", c_noise, 128), 1, False).reshape(-1)
        torch.testing.assert_close(net64.logvar(c_noise), logvar, atol=1e-12, rtol=0)
    net32 = net.float()
    sigma = torch.tensor([0.01, 1.3, 60.0])
    with torch.no_grad():  # the whole preconditioned network, whose coefficients are float32 (as EDM2's)
        denoised, lv = net32(x.float(), sigma, labels, return_logvar=True)
        ref_denoised, ref_lv = edm2_precond(ref, CFG, x, sigma.double(), onehot)
    torch.testing.assert_close(denoised.double(), ref_denoised, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lv.double(), ref_lv, atol=1e-5, rtol=1e-5)


def test_facts_of_a_pixel_model(tmp_path):
    path = write(tmp_path)
    facts = edm2_facts(read_edm_pickle(path), path)
    assert (facts.resolution, facts.channels, facts.label_dim, facts.model_channels) == (SIDE, 3, 10, 16)
    assert facts.encoder == "StandardRGBEncoder" and not facts.latent and facts.encoder_scale is None
    assert facts.sampler == EDM2_SAMPLER == dict(sampler="heun", num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert facts.training == {"P_mean": -0.8, "P_std": 1.6} and facts.dataset_path == "datasets/img64.zip"
    assert facts.file == str(path) and "Precond(" in facts.network


def expect_error(path, match):
    with pytest.raises(DiffscoreError, match=match) as err:
        load_edm2_network(read_edm_pickle(path), path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    state = edm2_state()
    key = "unet.enc.8x8_block1.conv_res1.weight"
    missing = {k: v for k, v in state.items() if k != key}
    expect_error(write(tmp_path, missing, name="missing.pkl"), f"lacks tensor '{key}'")
    extra = dict(state, **{"unet.enc.8x8_block1.conv_res1.bias": torch.zeros(32)})
    expect_error(write(tmp_path, extra, name="extra.pkl"), "'unet.enc.8x8_block1.conv_res1.bias' has no place")
    shaped = dict(state, **{key: torch.zeros(32, 32, 1, 1)})
    expect_error(
        write(tmp_path, shaped, name="shape.pkl"), f"tensor '{key}' is .*\\(32, 32, 1, 1\\).*\\(32, 32, 3, 3\\)"
    )
    wider = dict(KWARGS, model_channels=24)  # kwargs of another network than the weights
    expect_error(write(tmp_path, state, wider, name="wider.pkl"), "tensor 'unet.*' is")


def test_records_of_other_classes_and_kwargs_are_refused(tmp_path):
    def renamed(at, cls_name):
        cls = type(cls_name, (CLASSES["MPConv"],), {})
        return lambda path: cls if path == at else _class_at(path)

    expect_error(
        write(tmp_path, class_at=renamed("unet.out_conv", "Conv2d"), name="c.pkl"), "'unet.out_conv' is a Conv2d"
    )
    expect_error(write(tmp_path, class_at=renamed("unet", "SongUNet"), name="u.pkl"), "wraps a SongUNet")
    expect_error(
        write(tmp_path, kwargs=dict(KWARGS, model_type="SongUNet"), name="k.pkl"), "option model_type='SongUNet'"
    )
    expect_error(write(tmp_path, kwargs=dict(KWARGS, resample_filter=[1, 3, 3, 1]), name="f.pkl"), "resample_filter")
    no_res = {k: v for k, v in KWARGS.items() if k != "img_resolution"}
    expect_error(write(tmp_path, kwargs=no_res, name="r.pkl"), "lack 'img_resolution'")


def test_an_edm_network_is_not_an_edm2_one(tmp_path):
    from tests.edm_files import write_edm_network

    path = write_edm_network(tmp_path / "edm.pkl", "EDMPrecond", {}, "SongUNet", {}, {"x.weight": torch.zeros(2)})
    expect_error(path, "not NVlabs/edm2's Precond")


def test_a_latent_model_is_identified(tmp_path):
    """A StabilityVAEEncoder model: facts.latent with EDM2's scale and bias, so a caller refuses it in one line."""
    vae = encoder_record("StabilityVAEEncoder")
    del vae.scale, vae.bias  # the numpy arrays EDM2's __init__ stores; recomputed from the kwargs (see below)
    path = write(tmp_path, encoder=vae, name="latent.pkl")
    facts = edm2_facts(read_edm_pickle(path), path)
    assert facts.latent and facts.encoder == "StabilityVAEEncoder" and facts.vae_name == "stabilityai/sd-vae-ft-mse"
    raw_mean, raw_std = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]
    for s, b, m, sd in zip(facts.encoder_scale, facts.encoder_bias, raw_mean, raw_std):
        assert s == pytest.approx(0.5 / sd, rel=1e-6) and b == pytest.approx(-m * 0.5 / sd, rel=1e-6)
    with pytest.raises(DiffscoreError, match="latent"):  # the caller's one line
        if facts.latent:
            raise DiffscoreError(f"{facts.file}: an EDM2 latent model ({facts.encoder}); diffscore samples pixels")


def test_a_latent_model_as_edm2_pickles_it(tmp_path):
    """EDM2's StabilityVAEEncoder state holds numpy arrays (scale, bias). The reader either refuses the file in one
    line or the loader identifies it as latent; it never reads it as a pixel model."""
    path = write(tmp_path, encoder=encoder_record("StabilityVAEEncoder"), name="latent_np.pkl")
    try:
        data = read_edm_pickle(path)
    except DiffscoreError as err:
        assert "\n" not in str(err) and str(path) in str(err) and "numpy" in str(err)
        return
    assert edm2_facts(data, path).latent


def test_unconditional_and_bare_network_defaults(tmp_path):
    """label_dim 0 (no emb_label) and EDM2's defaults for every omitted UNet/Block kwarg."""
    cfg = dict(CFG, label_dim=0)
    P = EDM2Tensors(1)
    edm2_precond(P, cfg, torch.zeros(1, 3, SIDE, SIDE, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    kwargs = dict(KWARGS, label_dim=0)
    del kwargs["dropout"], kwargs["use_fp16"]
    path = write(tmp_path, P.state, kwargs, name="uncond.pkl")
    net, facts = load_edm2_network(read_edm_pickle(path), path)
    assert facts.label_dim == 0 and net.backbone.emb_label is None
    assert net.backbone.enc["16x16_block0"].clip_act == 256 and math.isclose(net.backbone.concat_balance, 0.5)
