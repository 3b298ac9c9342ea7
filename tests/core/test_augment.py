import math

import pytest
import torch

from diffscore.core.augment import NonLeakyAugment, NonLeakyParams, ScoreAugment
from diffscore.core.losses import edm_loss_weight, scoreaug_loss


def _slow_shift(img: torch.Tensor, dx: int, dy: int, circular: bool) -> torch.Tensor:
    """Pixel loop: out[i, j] = img[i - dy, j - dx] (wrapped or zero outside)."""
    C, H, W = img.shape
    out = torch.zeros_like(img)
    for i in range(H):
        for j in range(W):
            si, sj = i - dy, j - dx
            if circular:
                out[:, i, j] = img[:, si % H, sj % W]
            elif 0 <= si < H and 0 <= sj < W:
                out[:, i, j] = img[:, si, sj]
    return out


@pytest.mark.parametrize("padding", ["zero", "circular"])
@pytest.mark.parametrize("mode", ["one_of", "composed"])
@pytest.mark.parametrize("side", [4, 8, 32, 64])
def test_the_label_is_zero_exactly_when_apply_leaves_the_image_unchanged_at_every_size(mode, side, padding):
    """Issue 34: on 8x8 images 1 in 9 translations (default translate_frac 0.1: m = 1) resolved to (0, 0) pixels
    under a nonzero label, and composed hflip + vflip + rot180 cancelled. Judged by the effect on random images:
    every sample with a nonzero label is changed, every sample with a zero label is returned exactly; and each
    label column is zero exactly when its part (pixel shift, flips, rotation, cutout, brightness) is the identity."""
    composed = {n: 0.5 for n in ("rot90", "hflip", "vflip", "translate", "cutout", "brightness")}
    aug = ScoreAugment(None if mode == "one_of" else composed, mode=mode, translate_padding=padding)
    g = torch.Generator().manual_seed(side)
    params = aug.sample_params(4000, generator=g)
    x = torch.randn(4000, 2, side, side, generator=g)
    unchanged = (aug.apply(x, params) == x).flatten(1).all(1)  # the identity, judged by its effect
    label = aug.label(params)
    zero_label = (label == 0).all(1)
    assert torch.equal(unchanged, zero_label) and torch.equal(zero_label, params.is_identity())
    px = aug.resolve(params, side, side)
    assert torch.equal(label[:, 5] != 0, px.shift_x != 0) and torch.equal(label[:, 6] != 0, px.shift_y != 0)
    assert torch.equal(label[:, 7] != 0, px.cutout_size > 0) and torch.equal(label[:, 10] != 0, params.brightness != 1)
    assert 0.01 < zero_label.float().mean() < 0.5 and (px.shift_x != 0).float().mean() > 0.05  # both kinds occur
    if mode == "composed":  # the dihedral part is drawn canonically: rot90^k hflip^h, never vflip
        assert not params.vflip.any() and params.hflip.any() and (params.rot90 == 2).any()


def test_same_params_give_the_same_transform_of_input_and_target():
    """Every transform is linear, so T(x0 + sigma n) = T(x0) + sigma T(n) exactly when input and target share T."""
    aug = ScoreAugment(mode="composed", weights={n: 0.5 for n in ("rot90", "hflip", "vflip", "translate", "cutout")})
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(64, 2, 8, 8, generator=g), torch.randn(64, 2, 8, 8, generator=g)
    sigma = 0.7
    params = aug.sample_params(64, generator=g)
    assert torch.allclose(aug.apply(x0 + sigma * n, params), aug.apply(x0, params) + sigma * aug.apply(n, params))
    assert torch.equal(aug.apply(x0, params), aug.apply(x0, params))


@pytest.mark.parametrize("name", ["rot90", "hflip", "vflip"])
def test_orthogonal_transforms_keep_iid_noise(name):
    """For flips and rot90, T(x0 + sigma n) = T(x0) + sigma T(n) and T(n) is a permutation of n's pixels, so it has
    exactly the statistics of fresh N(0, sigma^2 I) noise; checked against torch.flip / torch.rot90."""
    aug = ScoreAugment({name: 1.0}, mode="one_of")
    g = torch.Generator().manual_seed(2)
    params = aug.sample_params(32, generator=g)
    n = torch.randn(32, 3, 8, 8, generator=g)
    out = aug.apply(n, params)
    assert torch.equal(out.flatten(1).sort(1).values, n.flatten(1).sort(1).values)  # a permutation per sample
    for i in range(32):
        k = int(params.rot90[i])
        ref = torch.rot90(n[i], k, dims=(-2, -1)) if name == "rot90" else n[i].flip(-1 if name == "hflip" else -2)
        assert torch.equal(out[i], ref)
    # empirical covariance of the transformed noise over many draws is the identity
    many = aug.apply(torch.randn(20000, 1, 4, 4, generator=g), aug.sample_params(20000, generator=g))
    cov = torch.cov(many.flatten(1).T)
    assert torch.allclose(cov, torch.eye(16), atol=0.05)


@pytest.mark.parametrize("circular", [False, True])
def test_translation_matches_a_pixel_loop(circular):
    aug = ScoreAugment({"translate": 1.0}, translate_frac=0.4, translate_padding="circular" if circular else "zero")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, 6, 5, generator=g)
    params = aug.sample_params(16, generator=g)
    out = aug.apply(x, params)
    px = aug.resolve(params, 6, 5)
    for i in range(16):
        ref = _slow_shift(x[i], int(px.shift_x[i]), int(px.shift_y[i]), circular)
        assert torch.equal(out[i], ref)
    assert (px.shift_x != 0).any() and (px.shift_y != 0).any()


def test_brightness_and_cutout_change_the_effective_noise():
    """On pure noise, brightness b scales the noise std by b; a cutout of area a leaves variance 1 - a/(HW)."""
    g = torch.Generator().manual_seed(4)
    n = torch.randn(64, 64, 32, 32, generator=g)  # many channels: precise per-sample variances
    bright = ScoreAugment({"brightness": 1.0}, brightness=(0.5, 2.0))
    p = bright.sample_params(64, generator=g)
    std = bright.apply(n, p).flatten(1).std(1)
    assert torch.allclose(std, p.brightness, rtol=0.02)
    assert p.brightness.min() >= 0.5 and p.brightness.max() <= 2.0 and p.brightness.std() > 0.2

    cut = ScoreAugment({"cutout": 1.0}, cutout_frac=(0.2, 0.5))
    p = cut.sample_params(64, generator=g)
    var = cut.apply(n, p).flatten(1).var(1)
    px = cut.resolve(p, 32, 32)
    lo_x, lo_y = px.cutout_x - px.cutout_size // 2, px.cutout_y - px.cutout_size // 2
    w = (lo_x + px.cutout_size).clamp(max=32) - lo_x.clamp(min=0)  # the square clipped at the border
    h = (lo_y + px.cutout_size).clamp(max=32) - lo_y.clamp(min=0)
    expected = 1 - (w * h).float() / 1024
    assert torch.allclose(var, expected, atol=0.02)
    assert expected.min() < 0.85  # some large cutouts were drawn


def test_oracle_denoiser_has_zero_scoreaug_loss():
    aug = ScoreAugment()
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(128, 1, 8, 8, generator=g), torch.randn(128, 1, 8, 8, generator=g)
    sigma = torch.exp(torch.randn(128, generator=g))
    params = aug.sample_params(128, generator=g)
    seen = {}

    def oracle(x, s, cond=None, aug_label=None):
        seen["label"] = aug_label
        return aug.apply(x0, params)

    assert torch.equal(scoreaug_loss(oracle, x0, sigma, noise, aug, params), torch.zeros(128))
    assert torch.equal(seen["label"], aug.label(params))
    # the untransformed clean image is wrong exactly where a transform changed the target
    loss = scoreaug_loss(lambda *a: x0, x0, sigma, noise, aug, params)
    changed = ~params.is_identity()
    assert (loss[changed] > 0).all() and (loss[~changed] == 0).all()
    ref = edm_loss_weight(sigma) * (x0 - aug.apply(x0, params)).square().flatten(1).mean(1)
    assert torch.allclose(loss, ref)


def test_one_of_selection_frequencies_follow_the_weights():
    aug = ScoreAugment({"identity": 2.0, "hflip": 1.0, "brightness": 1.0})
    p = aug.sample_params(40000, generator=torch.Generator().manual_seed(6))
    assert p.is_identity().float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert p.hflip.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert ((p.brightness != 1) & p.hflip).sum() == 0  # one transform per sample


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        ScoreAugment({"rotate": 1.0})
    with pytest.raises(ValueError, match="probabilities"):
        ScoreAugment({"hflip": 2.0}, mode="composed")
    rot = ScoreAugment({"rot90": 1.0})
    with pytest.raises(ValueError, match="square"):
        rot.apply(torch.zeros(4, 1, 8, 6), rot.sample_params(4))
    with pytest.raises(TypeError):  # the contract: sample_params(batch, *, device, generator=None)
        ScoreAugment().sample_params(4, image_size=(8, 8))


@pytest.mark.parametrize("side", [4, 5, 8, 32, 64])
def test_one_parameter_set_resolves_to_uniform_nonzero_pixel_laws_at_every_size(side):
    """One draw (no size given) resolved at several sizes: a drawn shift is uniform over -m..-1, 1..m pixels,
    m = round(translate_frac * side) clamped to 1..side - 1 (never 0: the label says it moved), the cutout side
    uniform over round(cutout_frac * side) and its centre uniform over the pixels; the pixels stay near
    fraction * side."""
    n = 60000
    aug = ScoreAugment({"translate": 1.0, "cutout": 1.0}, mode="composed", translate_frac=0.15, cutout_frac=(0.1, 0.5))
    p = aug.sample_params(n, generator=torch.Generator().manual_seed(12))
    px = aug.resolve(p, side, side)

    def assert_uniform(values: torch.Tensor, lo: int, hi: int, skip_zero: bool = False) -> None:
        assert values.min() == lo and values.max() == hi
        freq = torch.bincount(values - lo, minlength=hi - lo + 1).double() / len(values)
        if skip_zero:
            assert freq[-lo] == 0
            freq = torch.cat([freq[:-lo], freq[-lo + 1 :]])
        assert (freq - 1 / len(freq)).abs().max() < 4 * (1 / len(freq) / len(values)) ** 0.5

    m = min(max(1, round(0.15 * side)), side - 1)
    assert_uniform(px.shift_x, -m, m, skip_zero=True)
    assert_uniform(px.shift_y, -m, m, skip_zero=True)
    assert torch.equal(px.shift_x.sign(), p.shift_x.sign().long())
    cut = p.cutout_size > 0
    assert_uniform(px.cutout_size[cut], max(1, round(0.1 * side)), max(1, round(0.5 * side)))
    assert_uniform(px.cutout_x[cut], 0, side - 1)
    assert torch.equal(px.cutout_size[~cut], torch.zeros_like(px.cutout_size[~cut]))
    assert (px.shift_x - p.shift_x * side).abs().max() < 1.5
    assert (px.cutout_size[cut] - p.cutout_size[cut] * side).abs().max() < 1.5
    assert ((px.cutout_x[cut] + 0.5) / side - p.cutout_x[cut]).abs().max() <= 0.5 / side


def test_label_reads_the_fractions_with_the_old_meaning():
    """Columns: one-hot rot90 (3), hflip, vflip, shift / W, shift / H, cutout side / side, cutout centre offset from
    the image centre / W and / H, ln(brightness); the same label at every size, close to the pixel quantities."""
    aug = ScoreAugment(mode="composed", weights={n: 0.5 for n in ("rot90", "hflip", "vflip", "translate", "cutout")})
    p = aug.sample_params(4000, generator=torch.Generator().manual_seed(13))
    lab = aug.label(p)
    assert lab.shape == (4000, 11)
    for k in (1, 2, 3):
        assert torch.equal(lab[:, k - 1], (p.rot90 == k).float())
    assert torch.equal(lab[:, 3], p.hflip.float()) and torch.equal(lab[:, 4], p.vflip.float())
    assert torch.equal(lab[:, 5:8], torch.stack([p.shift_x, p.shift_y, p.cutout_size], 1))
    cut = p.cutout_size > 0
    assert torch.equal(lab[cut, 8], p.cutout_x[cut] - 0.5) and (lab[~cut, 8:10] == 0).all()
    assert torch.equal(lab[:, 10], p.brightness.log())
    side = 32
    px = aug.resolve(p, side, side)
    assert (lab[:, 5] - px.shift_x / side).abs().max() < 1.5 / side  # the old column was shift_x / W
    assert (lab[cut, 8] - ((px.cutout_x[cut] + 0.5) / side - 0.5)).abs().max() <= 0.5 / side


# ---------------------------------------------------------------------------------------------------------
def _nl_params(B: int, **kw) -> NonLeakyParams:
    z = torch.zeros(B)
    base = dict(xflip=z, yflip=z, scale=z, rotate=z, aniso=z, aniso_angle=z, translate_x=z, translate_y=z)
    base.update(kw)
    return NonLeakyParams(**base)


def test_nonleaky_label_is_zero_iff_identity_and_identity_is_exact():
    aug = NonLeakyAugment(p=0.3)
    g = torch.Generator().manual_seed(7)
    params = aug.sample_params(4000, generator=g)
    x = torch.randn(4000, 3, 8, 8, generator=g)
    out = aug.apply(x, params)
    zero = (aug.label(params) == 0).all(1)
    assert torch.equal(zero, params.is_identity())
    assert torch.equal(out[zero], x[zero])
    assert 0.05 < zero.float().mean() < 0.6
    assert (out[~zero] != x[~zero]).flatten(1).any(1).all()
    assert NonLeakyAugment(p=0).sample_params(100, generator=g).is_identity().all()


def test_nonleaky_quarter_rotation_and_pixel_shift_are_exact():
    """Bilinear resampling at a 90 degree rotation or a whole-pixel shift lands on pixel centres: compare with
    torch.rot90 and an integer shift (reflection padding at the border)."""
    aug = NonLeakyAugment()
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(8))
    rotated = aug.apply(x, _nl_params(1, rotate=torch.tensor([math.pi / 2])))
    assert torch.allclose(rotated, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5) or torch.allclose(
        rotated, torch.rot90(x, 3, dims=(-2, -1)), atol=1e-5
    )
    one_pixel = 1 / (aug.translate_std * 8)
    shifted = aug.apply(x, _nl_params(1, translate_x=torch.tensor([one_pixel])))
    assert torch.allclose(shifted[..., 1:], x[..., :-1], atol=1e-5)  # moved one pixel to the right
    flipped = aug.apply(x, _nl_params(1, xflip=torch.ones(1)))
    assert torch.equal(flipped, x.flip(-1))


def test_nonleaky_inverse_matrix_inverts_the_forward_warp():
    """The warp's inverse, built factor by factor, against float64 linalg.inv of the forward transform assembled
    here from the parameters' definitions (pixel frame, then grid_sample's normalised frame)."""
    aug = NonLeakyAugment(p=1.0)
    params = aug.sample_params(64, generator=torch.Generator().manual_seed(11))
    H, W = 8, 12
    theta = aug._inverse_matrix(params, H, W).double()  # [B, 2, 3]
    p = NonLeakyParams(**{k: v.double() for k, v in vars(params).items()})

    def rot(a):
        return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)

    for i in range(64):
        s = 2.0 ** (p.scale[i].item() * aug.scale_std)
        a = 2.0 ** (p.aniso[i].item() * aug.aniso_std)
        r = p.aniso_angle[i].item()
        stretch = torch.diag(torch.tensor([a, 1 / a], dtype=torch.float64))
        forward = rot(r) @ stretch @ rot(-r) @ rot(p.rotate[i].item()) * s
        to_norm = torch.diag(torch.tensor([2.0 / W, 2.0 / H], dtype=torch.float64))
        lin = to_norm @ torch.linalg.inv(forward) @ torch.linalg.inv(to_norm)
        shift = torch.tensor([p.translate_x[i].item(), p.translate_y[i].item()], dtype=torch.float64)
        shift = shift * aug.translate_std * 2
        torch.testing.assert_close(theta[i, :, :2], lin, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theta[i, :, 2], -lin @ shift, atol=1e-5, rtol=1e-5)


def test_nonleaky_probability_p():
    aug = NonLeakyAugment(p=0.12)
    params = aug.sample_params(50000, generator=torch.Generator().manual_seed(9))
    assert (params.yflip != 0).float().mean().item() == pytest.approx(0.12 / 2, abs=0.006)  # fires, then 0 or 1
    assert (params.xflip != 0).float().mean().item() == pytest.approx(0.5, abs=0.01)  # xflip multiplier 1e8
    assert (params.rotate != 0).float().mean().item() == pytest.approx(0.12, abs=0.006)
    assert aug.label(params).shape == (50000, 9)


def test_nonleaky_geometry_runs_in_float32_whatever_the_parameter_dtype():
    """Under CUDA autocast the parameter arithmetic comes out in bf16 (linalg.inv had no kernel for it)."""
    aug = NonLeakyAugment(p=1.0)
    params = aug.sample_params(8, generator=torch.Generator().manual_seed(10))
    x = torch.randn(8, 3, 8, 8)
    low = NonLeakyParams(**{k: v.bfloat16() for k, v in vars(params).items()})
    out = aug.apply(x, low)  # raised "linalg.inv: Low precision dtypes not supported" before
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    assert (out - aug.apply(x, params)).abs().mean() < 0.05  # only bf16 rounding of the angles and scales
