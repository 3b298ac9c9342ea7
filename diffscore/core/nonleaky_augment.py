"""EDM's non-leaky augmentation (Karras et al. 2022, App. B.5; the geometric part of ADA, Karras et al. 2020):
transforms of the clean data, each fired with probability ``p``, and the label that tells the network which were
applied (so it learns them without leaking them into samples). Same interface as ScoreAugment
(core/augment.py): ``sample_params``, a pure ``apply``, ``label`` [B, A], zero label = identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from diffscore.core.recorded import Recorded


def _check_images(x: Tensor) -> tuple[int, int]:  # (H, W) of images [B, C, H, W]
    if x.ndim != 4:
        raise ValueError(f"augmentations need images [B, C, H, W], got shape {tuple(x.shape)}")
    return x.shape[-2], x.shape[-1]


@dataclass(frozen=True)
class NonLeakyParams:
    """NonLeakyAugment's per-sample draws, every field [B]; 0 means "not applied"."""

    xflip: Tensor  # 0/1
    yflip: Tensor  # 0/1
    scale: Tensor  # standard normal draw: isotropic scale 2^(scale * scale_std)
    rotate: Tensor  # angle in radians
    aniso: Tensor  # standard normal draw: anisotropic scale 2^(aniso * aniso_std) along direction aniso_angle
    aniso_angle: Tensor  # radians
    translate_x: Tensor  # standard normal draw: shift of translate_x * translate_std * W pixels
    translate_y: Tensor

    def is_identity(self) -> Tensor:
        return torch.stack([getattr(self, f.name) == 0 for f in fields(self) if f.name != "aniso_angle"]).all(0)


class NonLeakyAugment(Recorded):
    """EDM's non-leaky augmentation of clean images (Karras et al. 2022, App. B.5; the ADA pipeline's geometric
    part): each transform fires with probability ``p`` times its multiplier, the network sees the parameters
    as a 9-dimensional label [xflip, yflip, scale, cos(rot) - 1, sin(rot), aniso cos, aniso sin, tx, ty]. Flips
    are exact; scale, rotation, anisotropy and translation resample bilinearly with reflection padding (EDM
    upsamples with a wavelet filter first; this is simpler and slightly blurrier)."""

    label_dim = 9

    def __init__(
        self,
        p: float = 0.12,  # augmentation probability (EDM: 0.12 CIFAR-10, 0.15 FFHQ/AFHQv2)
        xflip: float = 1e8,  # per-transform multipliers of p (EDM: x-flip always eligible, the rest 1)
        yflip: float = 1.0,
        scale: float = 1.0,
        rotate: float = 1.0,
        aniso: float = 1.0,
        translate: float = 1.0,
        scale_std: float = 0.2,  # log2 std of the isotropic scale
        rotate_max: float = 1.0,  # largest rotation, in units of pi
        aniso_std: float = 0.2,  # log2 std of the anisotropic scale
        aniso_rotate_prob: float = 0.5,  # probability that the anisotropy axis is rotated
        translate_std: float = 0.125,  # std of the shift, as a fraction of the image side
    ) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"NonLeakyAugment p must be in [0, 1], got {p}")
        self.p = p
        self.mult = dict(xflip=xflip, yflip=yflip, scale=scale, rotate=rotate, aniso=aniso, translate=translate)
        self.scale_std, self.rotate_max, self.aniso_std = scale_std, rotate_max, aniso_std
        self.aniso_rotate_prob, self.translate_std = aniso_rotate_prob, translate_std

    def sample_params(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> NonLeakyParams:
        def gate(name: str, value: Tensor) -> Tensor:
            fire = torch.rand(batch, device=device, generator=generator) < self.p * self.mult[name]
            return torch.where(fire, value, torch.zeros_like(value))

        def normal() -> Tensor:
            return torch.randn(batch, device=device, generator=generator)

        def uniform_pm(scale: float) -> Tensor:
            return (torch.rand(batch, device=device, generator=generator) * 2 - 1) * scale

        angle = uniform_pm(math.pi)
        angle = torch.where(torch.rand(batch, device=device, generator=generator) < self.aniso_rotate_prob, angle, 0.0)
        translate = gate("translate", torch.ones(batch, device=device)).bool()
        return NonLeakyParams(
            xflip=gate("xflip", torch.randint(2, (batch,), device=device, generator=generator).float()),
            yflip=gate("yflip", torch.randint(2, (batch,), device=device, generator=generator).float()),
            scale=gate("scale", normal()),
            rotate=gate("rotate", uniform_pm(math.pi * self.rotate_max)),
            aniso=gate("aniso", normal()),
            aniso_angle=angle,
            translate_x=torch.where(translate, normal(), 0.0),
            translate_y=torch.where(translate, normal(), 0.0),
        )

    def _inverse_matrix(self, params: NonLeakyParams, H: int, W: int) -> Tensor:
        """[B, 2, 3]: output pixel -> input pixel, in grid_sample's normalised coordinates (float32 also under
        autocast: bf16 angles and scales, ~0.4% off, would misplace the edge pixels of a 64x64 image by ~0.1)."""
        dev = params.scale.device
        with torch.autocast(dev.type, enabled=False):
            f32 = NonLeakyParams(**{f.name: getattr(params, f.name).float() for f in fields(params)})
            return self._inverse_matrix_f32(f32, H, W)

    def _inverse_matrix_f32(self, params: NonLeakyParams, H: int, W: int) -> Tensor:
        B = params.scale.shape[0]

        def rot(a: Tensor) -> Tensor:
            c, s = a.cos(), a.sin()
            return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # [B, 2, 2]

        def diag(sx: Tensor, sy: Tensor) -> Tensor:
            return torch.diag_embed(torch.stack([sx, sy], -1))

        s = torch.exp2(params.scale * self.scale_std)
        a = torch.exp2(params.aniso * self.aniso_std)
        r = params.aniso_angle
        # forward = rot(r) diag(a, 1/a) rot(-r) rot(rotate) diag(s, s) in the pixel frame; its inverse, factor by
        # factor (no linalg.inv: on a GPU it reads an error flag back, a host sync in every training step)
        inverse = diag(1 / s, 1 / s) @ rot(-params.rotate) @ rot(r) @ diag(1 / a, a) @ rot(-r)  # [B, 2, 2]
        # pixel frame -> normalised frame: diag(2/W, 2/H) @ inverse @ diag(W/2, H/2)
        lin = inverse.clone()
        lin[:, 0, 1] *= H / W
        lin[:, 1, 0] *= W / H
        shift = torch.stack(
            [params.translate_x * self.translate_std * 2, params.translate_y * self.translate_std * 2], -1
        )
        offset = -(lin @ shift.view(B, 2, 1))  # output = forward(input) + shift  =>  input = inv(output - shift)
        return torch.cat([lin, offset], dim=2)

    def apply(self, x: Tensor, params: NonLeakyParams) -> Tensor:
        """Augmented clean images [B, C, H, W]; samples drawn as identity are returned bit-exactly."""
        H, W = _check_images(x)
        B = x.shape[0]
        view = (B, 1, 1, 1)
        out = torch.where(params.xflip.bool().view(view), x.flip(-1), x)
        out = torch.where(params.yflip.bool().view(view), out.flip(-2), out)
        geometric = (params.scale != 0) | (params.rotate != 0) | (params.aniso != 0) | (params.translate_x != 0)
        geometric |= params.translate_y != 0
        # every sample is warped and the identity ones selected back, bit-exact: no host sync in a training step
        theta = self._inverse_matrix(params, H, W).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return torch.where(geometric.view(view), warped, out)

    def label(self, params: NonLeakyParams) -> Tensor:
        """[B, 9]: xflip, yflip, scale, cos(rot) - 1, sin(rot), aniso cos, aniso sin, tx, ty (0 = identity)."""
        cols = [
            params.xflip,
            params.yflip,
            params.scale,
            params.rotate.cos() - 1,
            params.rotate.sin(),
            params.aniso * params.aniso_angle.cos(),
            params.aniso * params.aniso_angle.sin(),
            params.translate_x,
            params.translate_y,
        ]
        return torch.stack([c.float() for c in cols], dim=1)
