import torch

from diffscore.core.guidance import guide, guided_denoiser
from diffscore.networks import UNet
from diffscore.networks.text_encoder import SPECIALS


def test_guide_formula():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    torch.testing.assert_close(guide(u, c, 1.0), c)
    torch.testing.assert_close(guide(u, c, 0.0), u)
    torch.testing.assert_close(guide(u, c, 4.0), torch.tensor([9.0, -14.0]))


def text_unet(seed=0):
    torch.manual_seed(seed)
    net = UNet(
        data_shape=[1, 16, 16],
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        text_dim=16,
        text_layers=1,
        text_heads=2,
        text_vocab_size=32,
        text_max_length=12,
        cross_attn_resolutions=[8],
    )
    net.text_encoder.set_vocabulary([*SPECIALS, "a", "music", "score", "violin", "cello", "key", "is"])
    return net.eval()


def test_guidance_one_is_the_conditional_prediction_and_zero_the_unconditional():
    net = text_unet()
    x, sigma = torch.randn(3, 1, 16, 16), torch.full((3,), 0.7)
    cond = ["a music score violin", "a music score cello", "key is"]

    def denoiser(x, sigma, cond=None, aug_label=None):
        return net(x, sigma.log() / 4, cond)

    with torch.no_grad():
        d_cond, d_uncond = denoiser(x, sigma, cond), denoiser(x, sigma, None)
        torch.testing.assert_close(guided_denoiser(denoiser, 1.0)(x, sigma, cond), d_cond, rtol=0, atol=0)
        torch.testing.assert_close(guided_denoiser(denoiser, 0.0)(x, sigma, cond), d_uncond)
        torch.testing.assert_close(guided_denoiser(denoiser, 4.0)(x, sigma, cond), d_uncond + 4 * (d_cond - d_uncond))
        torch.testing.assert_close(denoiser(x, sigma, [""] * 3), d_uncond)  # None is the empty caption
