"""The DDPM++ / NCSN++ U-Net as EDM configures it (Song et al. 2021; Karras et al. 2022, Appendix F.2).

DDPM++ (CIFAR-10): positional embedding, 128 channels, multipliers [2, 2, 2], 4 blocks per resolution,
attention at 16x16, resample filter [1, 1], dropout 0.13 -> 55.7M parameters, 42.4 GFLOP per 32x32 image.
NCSN++: Fourier embedding (scale 16), residual encoder, resample filter [1, 3, 3, 1], noise-channel mult 2.
The layout, key names aside, is NVlabs/edm's SongUNet (training/networks.py) with decoder_type 'standard';
``diffscore.loading.edm.song`` maps that network's weights onto this one exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffscore.networks.backbone import Backbone
from diffscore.networks.embedding import ConditionEmbedding
from diffscore.networks.group_norm import group_norm
from diffscore.networks.init import init_weights
from diffscore.networks.resample import ConvDown, Resample
from diffscore.networks.text_encoder import TextEncoder

INIT = "xavier_uniform"
ZERO = 1e-5  # scale of "almost zero" initialisations (last conv of each residual branch)


def check_image_shape(data_shape: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(channels, side) of an image shape [C, H, W] with H == W; raises ValueError otherwise."""
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ValueError(f"data_shape must be a square image [C, H, W], got {list(data_shape)}")
    return int(data_shape[0]), int(data_shape[1])


def check_unet_options(
    data_shape: list[int] | tuple[int, ...],
    label_dim: int,
    channel_mult: list[int],
    encoder_type: str,
    text_dim: int,
    cross_attn_resolutions: list[int],
    text_dropout: float,
) -> tuple[int, int]:
    """(channels, side) of a UNet's image shape after checking its options; raises ValueError on a bad one."""
    in_channels, resolution = check_image_shape(data_shape)
    if text_dim and label_dim:
        raise ValueError("a backbone is conditioned on class labels (label_dim) or on text (text_dim), not both")
    if cross_attn_resolutions and not text_dim:
        raise ValueError("cross_attn_resolutions needs text_dim > 0 (a text encoder)")
    if not 0 <= text_dropout < 1:
        raise ValueError(f"text_dropout must be in [0, 1), got {text_dropout}")
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
    if resolution >> (len(channel_mult) - 1) < 1:
        raise ValueError(f"{len(channel_mult)} levels are too many for resolution {resolution}")
    if encoder_type not in ("standard", "residual"):
        raise ValueError(f"encoder_type must be 'standard' or 'residual', got {encoder_type!r}")
    return in_channels, resolution


def pixels_to_heads(x: Tensor, parts: int, heads: int) -> Tensor:
    """[B, parts * heads * D, H, W] -> [parts, B, heads, H * W, D], the layout attention wants (D contiguous).

    Channels are read as (part, head, D), part-major. A view for a channels-last input (its storage is
    [B, H, W, C]); one copy for a contiguous one."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, parts, heads, C // (parts * heads)).permute(2, 0, 3, 1, 4)


def heads_to_pixels(a: Tensor, like: Tensor) -> Tensor:
    """[B, heads, H * W, D] -> [B, heads * D, H, W] in the memory layout of ``like`` (a [B, C, H, W] tensor);
    the inverse of pixels_to_heads."""
    B, heads, _, D = a.shape
    H, W = like.shape[-2:]
    y = a.transpose(1, 2).reshape(B, H, W, heads * D).permute(0, 3, 1, 2)  # channels-last (a view, mostly)
    return y.contiguous() if like.is_contiguous() else y  # a contiguous network stays contiguous


class CrossAttention(nn.Module):
    """Image features attend to text tokens (the text-to-image U-Net's cross-attention, Rombach et al. 2022):
    x + proj(softmax(q k^T / sqrt(d)) v), q from GroupNorm(x), k and v from the token sequence; padding masked.
    The output projection starts near zero, so a fresh block barely changes the network it is added to."""

    def __init__(self, channels: int, text_dim: int, num_heads: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, eps)
        self.q = init_weights(nn.Conv2d(channels, channels, 1), INIT, math.sqrt(0.2))
        self.kv = init_weights(nn.Linear(text_dim, 2 * channels), INIT, math.sqrt(0.2))
        self.proj = init_weights(nn.Conv2d(channels, channels, 1), INIT, ZERO)

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        B, C = x.shape[:2]
        heads, L = self.num_heads, tokens.shape[1]
        q = pixels_to_heads(self.q(self.norm(x)), 1, heads)[0]  # [B, h, HW, C/h]
        k, v = self.kv(tokens.to(x.dtype)).reshape(B, L, 2, heads, C // heads).permute(2, 0, 3, 1, 4)  # [B, h, L, C/h]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # [B, h, HW, C/h]
        return x + self.proj(heads_to_pixels(a, x))


class UNetBlock(nn.Module):
    """Residual block: GN-SiLU-conv, + emb, GN-SiLU-dropout-conv, skip; optional resampling and self-attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = 1,  # attention heads (None: out_channels // channels_per_head)
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),  # DDPM++ sqrt(1/2), ADM 1
        eps: float = 1e-6,  # GroupNorm epsilon (DDPM++ 1e-6, ADM 1e-5)
        resample_filter: list[int] | tuple[int, ...] = (1, 1),
        resample_proj: bool = True,  # 1x1 conv on a resampled skip (DDPM++), or the resampled input itself (ADM)
        adaptive_scale: bool = False,  # scale-shift conditioning (ADM) instead of an added bias (DDPM++)
        init: dict | None = None,  # init of the layers (default: DDPM++'s xavier_uniform)
        init_zero: dict | None = None,  # init of the last conv of each branch (default: xavier_uniform * 1e-5)
        init_attn: dict | None = None,  # init of qkv (default: xavier_uniform * sqrt(0.2))
        cross_attn_dim: int = 0,  # width of text tokens to cross-attend to after the block (0 = none)
    ) -> None:
        super().__init__()
        init = init or dict(mode=INIT)
        init_zero = init_zero or dict(mode=INIT, scale=ZERO)
        init_attn = init_attn or dict(mode=INIT, scale=math.sqrt(0.2))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.num_heads = (num_heads or out_channels // channels_per_head) if attention else 0
        self.resample = Resample("up" if up else "down", resample_filter) if (up or down) else None
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = init_weights(nn.Conv2d(in_channels, out_channels, 3, padding=1), **init)
        self.affine = init_weights(nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1)), **init)
        self.norm1 = group_norm(out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = init_weights(nn.Conv2d(out_channels, out_channels, 3, padding=1), **init_zero)
        self.skip = None
        if out_channels != in_channels or ((up or down) and resample_proj):
            self.skip = init_weights(nn.Conv2d(in_channels, out_channels, 1), **init)
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"{out_channels} channels do not split into {self.num_heads} heads")
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = init_weights(nn.Conv2d(out_channels, out_channels * 3, 1), **init_attn)
            self.proj = init_weights(nn.Conv2d(out_channels, out_channels, 1), **init_zero)
        self.cross = (
            CrossAttention(out_channels, cross_attn_dim, max(1, self.num_heads), eps) if cross_attn_dim else None
        )

    def forward(self, x: Tensor, emb: Tensor, text: tuple[Tensor, Tensor] | None = None) -> Tensor:
        orig = x
        h = self.norm0(x, silu=True)
        if self.resample is not None:  # resample before the conv, as EDM does (cheaper going down)
            h, orig = self.resample(h), self.resample(orig)
        if self.adaptive_scale:
            scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)  # [B, C, 1, 1] each
            h = F.silu(torch.addcmul(shift, self.norm1(self.conv0(h)), scale + 1))
        else:  # conv0's bias joins the embedding's shift [B, C], added inside the norm (no pass of its own when fused)
            h = self.conv0._conv_forward(h, self.conv0.weight, None)
            h = self.norm1(h, self.affine(emb) + self.conv0.bias, silu=True)
        h = self.conv1(self.dropout(h))
        x = (h + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            q, k, v = pixels_to_heads(self.qkv(self.norm2(x)), 3, self.num_heads)  # each [B, heads, HW, C/heads]
            a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
            x = (self.proj(heads_to_pixels(a, x)) + x) * self.skip_scale
        if self.cross is not None and text is not None:  # text = (tokens [B, L, D], mask [B, L])
            x = self.cross(x, *text)
        return x


class UNet(Backbone):
    """EDM's SongUNet layout (DDPM++ / NCSN++) as a backbone F(x_in, c_noise, cond, aug_label) -> [B, C, H, W].

    EDM's ``dec.{res}x{res}_aux_norm`` / ``_aux_conv`` (the standard decoder's output layers) are ``out_norm`` /
    ``out_conv`` here; the output has as many channels as the input."""

    def __init__(
        self,
        data_shape: list[int] = [3, 32, 32],  # noqa: B006 - [C, H, W], square, a power-of-two side (linked from data)
        label_dim: int = 0,  # number of classes (0 = unconditional)
        augment_dim: int = 0,  # size of the augmentation label (0 = none)
        model_channels: int = 128,  # base channel count
        channel_mult: list[int] = [2, 2, 2],  # noqa: B006 - per-resolution channel multipliers
        channel_mult_emb: int = 4,  # embedding width = model_channels * this
        num_blocks: int = 4,  # residual blocks per resolution
        attn_resolutions: list[int] = [16],  # noqa: B006 - resolutions with self-attention
        dropout: float = 0.10,  # dropout inside residual blocks
        label_dropout: float = 0.0,  # class-label dropout (classifier-free guidance)
        embedding_type: str = "positional",  # "positional" (DDPM++) or "fourier" (NCSN++)
        channel_mult_noise: int = 1,  # noise-embedding width = model_channels * this (NCSN++: 2)
        encoder_type: str = "standard",  # "standard" (DDPM++) or "residual" (NCSN++)
        resample_filter: list[int] = [1, 1],  # noqa: B006 - [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++)
        # Text conditioning (MusicScore): a learned TextEncoder whose pooled vector joins the noise embedding and
        # whose tokens are cross-attended at cross_attn_resolutions. text_dim 0 = none (all other configs).
        text_dim: int = 0,  # token width of the text encoder (0 = no text conditioning)
        text_layers: int = 2,  # transformer layers of the text encoder
        text_heads: int = 4,  # attention heads of the text encoder
        text_vocab_size: int = 512,  # embedding-table size; the vocabulary comes from the training captions
        text_max_length: int = 32,  # tokens per caption
        cross_attn_resolutions: list[int] = [],  # noqa: B006 - resolutions with cross-attention to the tokens
        text_dropout: float = 0.0,  # training: replace the caption by "" with this probability (guidance)
    ) -> None:
        super().__init__()
        in_channels, resolution = check_unet_options(
            data_shape, label_dim, channel_mult, encoder_type, text_dim, cross_attn_resolutions, text_dropout
        )
        self.data_shape = (in_channels, resolution, resolution)
        self.resolution = resolution
        self.in_channels = in_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        emb_channels = model_channels * channel_mult_emb
        self.text_dropout = text_dropout
        self.text_encoder = (
            TextEncoder(text_vocab_size, text_max_length, text_dim, text_layers, text_heads) if text_dim else None
        )
        self.emb = ConditionEmbedding(
            model_channels * channel_mult_noise,
            emb_channels,
            embedding_type=embedding_type,
            label_dim=label_dim,
            augment_dim=augment_dim,
            label_dropout=label_dropout,
            init_mode=INIT,
            text_dim=text_dim,
        )
        levels = [(resolution >> level, model_channels * mult) for level, mult in enumerate(channel_mult)]
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)
        cross = {res: dict(cross_attn_dim=text_dim) for res in cross_attn_resolutions}
        skips = self._build_encoder(levels, model_channels, num_blocks, attn_resolutions, encoder_type, block, cross)
        cout = self._build_decoder(levels, num_blocks, attn_resolutions, block, cross, skips)
        self.out_norm = group_norm(cout)
        self.out_conv = init_weights(nn.Conv2d(cout, in_channels, 3, padding=1), INIT, ZERO)

    def _build_encoder(
        self,
        levels: list[tuple[int, int]],  # (resolution, channels) per level, finest first
        model_channels: int,
        num_blocks: int,
        attn_resolutions: list[int],
        encoder_type: str,
        block: dict,  # UNetBlock arguments shared by all blocks
        cross: dict[int, dict],  # resolution -> cross-attention arguments
    ) -> list[int]:
        """``self.enc`` as SongUNet's encoder; returns the channel counts of the skip connections, in order.
        Entries named "aux_*" carry the residual input pyramid of NCSN++ (not skips)."""
        self.enc = nn.ModuleDict()
        cout, caux = self.in_channels, self.in_channels
        skips = []
        for level, (res, width) in enumerate(levels):
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = init_weights(nn.Conv2d(cout, model_channels, 3, padding=1), INIT)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = ConvDown(caux, cout, block["resample_filter"], INIT)
                    caux = cout
            skips.append(cout)
            for idx in range(num_blocks):
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cout, width, attention=attn, **block, **cross.get(res, {})
                )
                cout = width
                skips.append(cout)
        return skips

    def _build_decoder(
        self,
        levels: list[tuple[int, int]],  # (resolution, channels) per level, finest first
        num_blocks: int,
        attn_resolutions: list[int],
        block: dict,  # UNetBlock arguments shared by all blocks
        cross: dict[int, dict],  # resolution -> cross-attention arguments
        skips: list[int],  # channel counts of the encoder's skips (consumed from the end)
    ) -> int:
        """``self.dec`` as SongUNet's decoder (without its output layers); returns its output channel count."""
        self.dec = nn.ModuleDict()
        cout = skips[-1]
        for level, (res, width) in reversed(list(enumerate(levels))):
            if level == len(levels) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block, **cross.get(res, {}))
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block, **cross.get(res, {}))
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=attn, **block, **cross.get(res, {})
                )
        return cout

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects [B, {self.in_channels}, {self.resolution}, {self.resolution}], got {tuple(x.shape)}"
            )
        text, pooled = None, None
        if self.text_encoder is not None:  # cond: captions (list of str), token ids [B, L], or None (= "")
            seq, pooled, mask = self.text_encoder(self._text_tokens(cond, x.shape[0]))
            text, cond = (seq, mask), None
        emb = self.emb(c_noise, cond, aug_label, pooled)  # [B, emb_channels]
        skips, aux = [], x
        for name, layer in self.enc.items():
            if "aux_residual" in name:
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
                continue
            x = layer(x, emb, text) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for layer in self.dec.values():
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb, text)
        return self.out_conv(self.out_norm(x, silu=True))

    def _text_tokens(self, cond: Tensor | list[str] | tuple[str, ...] | None, batch: int) -> Tensor:
        """Token ids [B, L] of the captions; "" (the null caption) for cond None and, in training, for a
        ``text_dropout`` share of the samples (classifier-free guidance's condition dropout)."""
        if cond is None:
            cond = [""] * batch
        tokens = cond if isinstance(cond, Tensor) else self.text_encoder.tokenize(list(cond))
        if tokens.shape[0] != batch:
            raise ValueError(f"{tokens.shape[0]} captions for a batch of {batch}")
        if self.training and self.text_dropout > 0:
            null = self.text_encoder.tokenize([""]).to(tokens.device)  # [1, L]
            drop = torch.rand(batch, 1, device=tokens.device) < self.text_dropout
            tokens = torch.where(drop, null, tokens)
        return tokens
