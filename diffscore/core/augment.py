"""Augmentations with a conditioning label: ScoreAug's transforms of noisy data (here) and EDM's non-leaky pipeline
(core/nonleaky_augment.py, re-exported here: configs name ``diffscore.core.augment.NonLeakyAugment``).

Both classes share one interface: ``sample_params`` draws per-sample parameters (randomness at the edge),
``apply`` is a pure function of (images, parameters), and ``label`` is the [B, A] vector the backbone is
conditioned on; the identity transform has the all-zero label, so sampling with no label means "no transform".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffscore.core.nonleaky_augment import NonLeakyAugment, NonLeakyParams
from diffscore.core.recorded import Recorded

__all__ = ["NonLeakyAugment", "NonLeakyParams", "ScoreAugment", "AugParams", "PixelAugParams"]

SCOREAUG_TRANSFORMS = ("rot90", "hflip", "vflip", "translate", "cutout", "brightness")


def _check_images(x: Tensor) -> tuple[int, int]:  # (H, W) of images [B, C, H, W]
    if x.ndim != 4:
        raise ValueError(f"augmentations need images [B, C, H, W], got shape {tuple(x.shape)}")
    return x.shape[-2], x.shape[-1]


def _uniform(batch: int, lo: float, hi: float, device, generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(batch, device=device, generator=generator)


@dataclass(frozen=True)
class AugParams:
    """ScoreAugment's per-sample parameters, every field [B], in units of the image (no pixel counts): the same
    parameter set means the same transform at every resolution, resolved to pixels by ``ScoreAugment.apply``.
    Each field's identity value is 0 (brightness: 1)."""

    rot90: Tensor  # long, quarter turns counterclockwise (torch.rot90 on dims H, W), 0..3
    hflip: Tensor  # bool, mirror left-right
    vflip: Tensor  # bool, mirror top-bottom
    shift_x: Tensor  # float in [-translate_frac, translate_frac], shift to the right as a fraction of W (resolve)
    shift_y: Tensor  # float, shift down as a fraction of H
    cutout_size: Tensor  # float, side of the zeroed square as a fraction of min(H, W); 0 = no cutout
    cutout_x: Tensor  # float in [0, 1), centre column as a fraction of W (0 without cutout)
    cutout_y: Tensor  # float in [0, 1), centre row as a fraction of H
    brightness: Tensor  # float, multiplicative factor; 1 = none

    def is_identity(self) -> Tensor:
        """[B] bool: the parameters are the identity transform (zero label)."""
        unshifted = (self.shift_x == 0) & (self.shift_y == 0)
        return (
            (self.rot90 == 0) & ~self.hflip & ~self.vflip & unshifted & (self.cutout_size == 0) & (self.brightness == 1)
        )


@dataclass(frozen=True)
class PixelAugParams:
    """The translation and cutout of an AugParams resolved for one image size, every field long [B]."""

    shift_x: Tensor  # pixels to the right
    shift_y: Tensor  # pixels down
    cutout_size: Tensor  # side of the zeroed square in pixels; 0 = no cutout
    cutout_x: Tensor  # centre column
    cutout_y: Tensor  # centre row


def _bin(u: Tensor, lo: int, hi: int) -> Tensor:
    """u in [0, 1) -> the integer lo + floor(u (hi - lo + 1)) in [lo, hi]: uniform u gives uniform integers."""
    return (lo + (u * (hi - lo + 1)).floor().long()).clamp(lo, hi)


def shift_images(x: Tensor, shift_x: Tensor, shift_y: Tensor, circular: bool = False) -> Tensor:
    """Per-sample integer translation of x [B, C, H, W] by (shift_x, shift_y) [B] pixels; uncovered pixels are
    zero, or wrap around when ``circular``."""
    B, C, H, W = x.shape
    rows = torch.arange(H, device=x.device) - shift_y.view(B, 1)  # [B, H] source row of each output row
    cols = torch.arange(W, device=x.device) - shift_x.view(B, 1)  # [B, W]
    if circular:
        rows, cols = rows % H, cols % W
    else:
        valid = ((rows >= 0) & (rows < H)).view(B, 1, H, 1) & ((cols >= 0) & (cols < W)).view(B, 1, 1, W)
        rows, cols = rows.clamp(0, H - 1), cols.clamp(0, W - 1)
    out = x.gather(2, rows.view(B, 1, H, 1).expand(B, C, H, W))
    out = out.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))
    return out if circular else out * valid


def cutout_mask(shape: tuple[int, ...], size: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
    """[B, 1, H, W] mask, 0 inside the square of side ``size`` centred at (cx, cy) (clipped at the border)."""
    B, _, H, W = shape
    lo_x, lo_y = cx - size // 2, cy - size // 2  # [B]
    cols = torch.arange(W, device=size.device).view(1, W)
    rows = torch.arange(H, device=size.device).view(1, H)
    in_x = (cols >= lo_x.view(B, 1)) & (cols < (lo_x + size).view(B, 1))  # [B, W]
    in_y = (rows >= lo_y.view(B, 1)) & (rows < (lo_y + size).view(B, 1))  # [B, H]
    return (~(in_y.view(B, 1, H, 1) & in_x.view(B, 1, 1, W))).float()


class ScoreAugment(Recorded):
    """ScoreAug (Hou et al. 2025): transforms applied to the *noisy* input; the denoiser predicts the same
    transform of the clean image, conditioned on the transform's label (sampling uses the zero label).

    Transforms: rot90 (k = 1, 2, 3), hflip, vflip, translate (whole pixels, zero padding or circular),
    cutout (a zeroed square), brightness (a multiplicative factor). ``mode="one_of"``: each sample gets one
    transform, chosen with probabilities proportional to ``weights`` (the key "identity" included);
    ``mode="composed"``: each transform is applied independently with probability ``weights[name]``, in the
    order brightness, cutout, translate, flips, rot90. Parameters are drawn in units of the image (fractions of
    H and W) and resolved to pixels from the images ``apply`` gets: at every size a drawn shift moves 1..m pixels
    in its direction, uniformly (m = round(translate_frac * side), at least 1 and below the side), the cutout side
    is uniform over round(cutout_frac * min(H, W)) (at least 1) and its centre uniform over the pixels.

    Label [B, 11]: one-hot rot90 k (3), hflip, vflip, shift / W and / H, cutout side / min(H, W), cutout centre
    offset from the image centre / W and / H (0 without cutout), ln(brightness), all read from the fractions.
    It describes the transform ``apply`` makes at any size: the parameters are quantised to what ``apply`` does
    (not ``apply`` made sub-pixel: interpolation would blur the noise below level sigma). A shift t != 0 never
    resolves to 0 pixels; composed draws use the canonical rot90^k hflip^h (vflip = rot180 hflip), so no nonzero
    label (hflip + vflip + rot180) is the identity. Zero label <=> identity, at every image size."""

    label_dim = 11

    def __init__(
        self,
        weights: dict[str, float] | None = None,  # selection weights (one_of) or probabilities (composed)
        mode: str = "one_of",  # "one_of" (one transform per sample, identity included) or "composed"
        translate_frac: float = 0.1,  # largest shift, as a fraction of the image side
        translate_padding: str = "zero",  # "zero" or "circular"
        cutout_frac: tuple[float, float] = (0.1, 0.3),  # range of the cutout side, as a fraction of the image side
        brightness: tuple[float, float] = (1 / 1.2, 1.2),  # range of the brightness factor (log-uniform)
    ) -> None:
        if mode not in ("one_of", "composed"):
            raise ValueError(f"ScoreAugment mode must be 'one_of' or 'composed', got {mode!r}")
        default = {"identity": 1.0, **{name: 1.0 for name in SCOREAUG_TRANSFORMS}}
        weights = dict(default if weights is None else weights)
        unknown = set(weights) - {"identity", *SCOREAUG_TRANSFORMS}
        if unknown:
            raise ValueError(f"ScoreAugment weights: unknown {sorted(unknown)}; use identity, {SCOREAUG_TRANSFORMS}")
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"ScoreAugment weights must be >= 0, got {weights}")
        if mode == "one_of" and sum(weights.values()) <= 0:
            raise ValueError("ScoreAugment weights: at least one must be positive")
        if mode == "composed" and any(w > 1 for k, w in weights.items() if k != "identity"):
            raise ValueError(f"ScoreAugment composed mode: weights are probabilities in [0, 1], got {weights}")
        if translate_padding not in ("zero", "circular"):
            raise ValueError(f"translate_padding must be 'zero' or 'circular', got {translate_padding!r}")
        if not 0 <= translate_frac < 1 or not 0 < cutout_frac[0] <= cutout_frac[1] <= 1:
            raise ValueError(
                f"need 0 <= translate_frac < 1 and 0 < cutout_frac[0] <= [1] <= 1, got {translate_frac}, {cutout_frac}"
            )
        if not 0 < brightness[0] <= brightness[1]:
            raise ValueError(f"brightness range must be positive and ordered, got {brightness}")
        self.weights, self.mode = weights, mode
        self.translate_frac, self.translate_padding = translate_frac, translate_padding
        self.cutout_frac, self.brightness = tuple(cutout_frac), tuple(brightness)

    def _chosen(self, batch: int, device, generator) -> dict[str, Tensor]:
        """[B] bool per transform: whether it is applied to each sample."""
        if self.mode == "one_of":
            names = ["identity", *SCOREAUG_TRANSFORMS]
            probs = torch.tensor([self.weights.get(n, 0.0) for n in names], device=device)
            pick = torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=generator)  # [B]
            return {n: pick == i for i, n in enumerate(names) if n != "identity"}
        return {
            n: torch.rand(batch, device=device, generator=generator) < self.weights.get(n, 0.0)
            for n in SCOREAUG_TRANSFORMS
        }

    def sample_params(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> AugParams:
        """Draws parameters for ``batch`` images of any size (translation and cutout as fractions of the side)."""
        on = self._chosen(batch, device, generator)
        zero = torch.zeros(batch, device=device)

        def unit() -> Tensor:  # uniform in [0, 1)
            return torch.rand(batch, device=device, generator=generator)

        f, (c_lo, c_hi) = self.translate_frac, self.cutout_frac
        log_b = _uniform(batch, math.log(self.brightness[0]), math.log(self.brightness[1]), device, generator)
        rot90 = torch.where(on["rot90"], torch.randint(1, 4, (batch,), device=device, generator=generator), 0)
        hflip, vflip = on["hflip"], on["vflip"]
        if self.mode == "composed" and self.weights.get("rot90", 0) > 0:
            # rot90^k vflip^v hflip^h = rot90^(k + 2v) hflip^(h xor v): the same transform, in canonical form
            rot90, hflip, vflip = (rot90 + 2 * vflip.long()) % 4, hflip ^ vflip, torch.zeros_like(vflip)
        return AugParams(
            rot90=rot90,
            hflip=hflip,
            vflip=vflip,  # fmt: skip
            shift_x=torch.where(on["translate"], f * (2 * unit() - 1), zero),
            shift_y=torch.where(on["translate"], f * (2 * unit() - 1), zero),
            cutout_size=torch.where(on["cutout"], c_lo + (c_hi - c_lo) * unit(), zero),
            cutout_x=torch.where(on["cutout"], unit(), zero),
            cutout_y=torch.where(on["cutout"], unit(), zero),
            brightness=torch.where(on["brightness"], log_b.exp(), torch.ones_like(log_b)),
        )

    def resolve(self, params: AugParams, height: int, width: int) -> PixelAugParams:
        """Translation and cutout in pixels for ``height`` x ``width`` images.

        A shift fraction t in (0, f] falls in one of m equal bins, m = round(f * side) clamped to 1..side - 1: the
        bin's number is the pixel shift (about t * side), -t gives its negative, only t = 0 gives 0. The cutout
        side fraction falls in a bin of the sides round(cutout_frac * min(H, W)); a centre c -> floor(c * side)."""
        f, (c_lo, c_hi) = self.translate_frac, self.cutout_frac

        def shift(t: Tensor, side: int) -> Tensor:  # [B] long; t = 0 (always so when f = 0) stays 0
            m = min(max(1, round(f * side)), side - 1)  # python's round, as the pixel draw always used
            return t.sign().long() * _bin((t.abs() / max(f, 1e-12)).clamp(max=1 - 1e-7), 1, m)

        lo, hi = (max(1, round(c * min(height, width))) for c in (c_lo, c_hi))
        has_cut = params.cutout_size > 0
        size_u = (params.cutout_size - c_lo) / (c_hi - c_lo) if c_hi > c_lo else torch.zeros_like(params.cutout_size)
        return PixelAugParams(
            shift_x=shift(params.shift_x, width),
            shift_y=shift(params.shift_y, height),
            cutout_size=torch.where(has_cut, _bin(size_u.clamp(0, 1), lo, hi), 0),
            cutout_x=torch.where(has_cut, _bin(params.cutout_x, 0, width - 1), 0),
            cutout_y=torch.where(has_cut, _bin(params.cutout_y, 0, height - 1), 0),
        )

    def apply(self, x: Tensor, params: AugParams) -> Tensor:
        """T(x) for images [B, C, H, W]; pure, so the same parameters give the same T for input and target."""
        H, W = _check_images(x)
        if H != W and self.weights.get("rot90", 0) > 0:  # from the options, not the draw: no host sync
            raise ValueError(f"ScoreAugment rot90 needs square images, got {H}x{W}; set its weight to 0")
        if min(H, W) < 2 and self.translate_frac > 0 and self.weights.get("translate", 0) > 0:
            raise ValueError(f"ScoreAugment translate needs images of at least 2x2 pixels, got {H}x{W}")
        px = self.resolve(params, H, W)
        view = (x.shape[0], 1, 1, 1)
        out = x * params.brightness.to(x.dtype).view(view)
        out = out * cutout_mask(x.shape, px.cutout_size, px.cutout_x, px.cutout_y).to(x.dtype)
        out = shift_images(out, px.shift_x, px.shift_y, circular=self.translate_padding == "circular")
        out = torch.where(params.hflip.view(view), out.flip(-1), out)
        out = torch.where(params.vflip.view(view), out.flip(-2), out)
        if H == W:  # rot90 is only ever drawn with square images (checked above)
            quarter = out
            for k in (1, 2, 3):  # selected per sample with where: no host sync in a training step
                quarter = torch.rot90(quarter, 1, dims=(-2, -1))
                out = torch.where((params.rot90 == k).view(view), quarter, out)
        return out

    def label(self, params: AugParams) -> Tensor:
        """[B, 11] conditioning label, independent of the image size; all zeros exactly for the identity."""
        has_cut = params.cutout_size > 0
        cols = [
            *(params.rot90 == k for k in (1, 2, 3)),
            params.hflip,
            params.vflip,
            params.shift_x,
            params.shift_y,
            params.cutout_size,
            torch.where(has_cut, params.cutout_x - 0.5, 0.0),
            torch.where(has_cut, params.cutout_y - 0.5, 0.0),
            params.brightness.log(),
        ]
        return torch.stack([c.float() for c in cols], dim=1)
