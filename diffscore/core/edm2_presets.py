"""EDM2's published training configurations (Karras et al. 2024, arXiv 2312.02696, Tables 2-3 and Appendix;
NVlabs/edm2 ``train_edm2.py``, ``config_presets``), as plain data for configs and tests.

A preset fixes the network width (``model_channels``), dropout, the learning-rate schedule of
:func:`diffscore.core.schedules.edm2_learning_rate` (``lr`` = ref_lr, ``decay`` = ref_batches, ramp-up 10M images),
the lognormal training noise (``P_mean``, ``P_std``), the batch (2048) and the training length in images. Adam with
betas (0.9, 0.99) and eps 1e-8 in every preset. ImageNet-64 presets train in pixels, ImageNet-512 ones in the
latent space of Stable Diffusion's VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffscore.errors import DiffscoreError

MI = 1 << 20  # EDM2 counts training images in mebi-images


@dataclass(frozen=True)
class EDM2Preset:
    """One row of EDM2's ``config_presets``."""

    channels: int  # model_channels of the U-Net
    lr: float  # reference learning rate (ref_lr)
    decay: int  # ref_batches: the learning rate starts its 1/sqrt(t) decay after this many batches
    dropout: float  # dropout probability in the residual blocks
    P_mean: float  # mean of ln(sigma) in training
    P_std: float  # standard deviation of ln(sigma) in training
    duration: int  # training length in images
    batch: int = 2048  # images per optimizer step


def _row(channels: int, lr: float, decay: int, dropout: float, P: tuple[float, float], mimg: int) -> EDM2Preset:
    return EDM2Preset(channels, lr, decay, dropout, P[0], P[1], mimg * MI)


IMG64 = (-0.8, 1.6)  # (P_mean, P_std) of ImageNet-64
IMG512 = (-0.4, 1.0)  # (P_mean, P_std) of ImageNet-512 (latent)
EDM2_PRESETS: dict[str, EDM2Preset] = {
    "edm2-img64-xs": _row(128, 0.0120, 35000, 0.00, IMG64, 1024),
    "edm2-img64-s": _row(192, 0.0100, 35000, 0.00, IMG64, 1024),
    "edm2-img64-m": _row(256, 0.0090, 35000, 0.10, IMG64, 2048),
    "edm2-img64-l": _row(320, 0.0080, 35000, 0.10, IMG64, 1024),
    "edm2-img64-xl": _row(384, 0.0070, 35000, 0.10, IMG64, 640),
    "edm2-img512-xxs": _row(64, 0.0170, 70000, 0.00, IMG512, 2048),
    "edm2-img512-xs": _row(128, 0.0120, 70000, 0.00, IMG512, 2048),
    "edm2-img512-s": _row(192, 0.0100, 70000, 0.00, IMG512, 2048),
    "edm2-img512-m": _row(256, 0.0090, 70000, 0.10, IMG512, 2048),
    "edm2-img512-l": _row(320, 0.0080, 70000, 0.10, IMG512, 1792),
    "edm2-img512-xl": _row(384, 0.0070, 70000, 0.10, IMG512, 1280),
    "edm2-img512-xxl": _row(448, 0.0065, 70000, 0.10, IMG512, 896),
}

# Network sizes by name: (model_channels, dropout), the same in both families (img64 has xs..xl, img512 xxs..xxl).
EDM2_SIZES: dict[str, tuple[int, float]] = {
    "xxs": (64, 0.0),
    "xs": (128, 0.0),
    "s": (192, 0.0),
    "m": (256, 0.10),
    "l": (320, 0.10),
    "xl": (384, 0.10),
    "xxl": (448, 0.10),
}


def edm2_preset(name: str) -> EDM2Preset:
    """The training preset ``name`` (e.g. "edm2-img64-s"); DiffscoreError naming the allowed ones otherwise."""
    if name not in EDM2_PRESETS:
        raise DiffscoreError(f"EDM2 preset {name!r} does not exist; choose one of {', '.join(EDM2_PRESETS)}")
    return EDM2_PRESETS[name]


def edm2_size(name: str) -> tuple[int, float]:
    """(model_channels, dropout) of the network size ``name`` ("xs", "s", ..., case-insensitive)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in EDM2_SIZES:
        raise DiffscoreError(f"EDM2 preset {name!r} does not exist; choose one of {', '.join(EDM2_SIZES)}")
    return EDM2_SIZES[key]
