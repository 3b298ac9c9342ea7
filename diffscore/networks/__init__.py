"""Backbones F(x_in, c_noise, cond, aug_label): plain nn.Modules that never see sigma scalings."""

from diffscore.networks.adm import ADMUNet
from diffscore.networks.edm2_unet import EDM2UNet
from diffscore.networks.mlp import MLP
from diffscore.networks.text_encoder import TextEncoder
from diffscore.networks.theory_net import TheoryNet
from diffscore.networks.unet import UNet

__all__ = ["ADMUNet", "EDM2UNet", "MLP", "TextEncoder", "TheoryNet", "UNet"]
