"""The conditioning vector shared by all backbones: noise level, class label and augmentation label."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffscore.networks.init import init_weights


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar (DDPM++), [B] -> [B, num_channels] as [sin, cos]."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True) -> None:
        super().__init__()
        half = num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32) / (half - (1 if endpoint else 0))
        self.register_buffer("freqs", (1 / max_positions) ** freqs, persistent=False)  # [C/2]

    def forward(self, x: Tensor) -> Tensor:
        arg = x.float()[:, None] * self.freqs  # [B, C/2]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++), [B] -> [B, num_channels]; frequencies ~ N(0, scale^2)."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)  # [C/2], saved: it is random

    def forward(self, x: Tensor) -> Tensor:
        arg = x.float()[:, None] * (2 * math.pi * self.freqs)  # [B, C/2]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ConditionEmbedding(nn.Module):
    """The mapping network of EDM's U-Nets.

    label_stage "noise" (SongUNet / DDPM++): emb = MLP(embed(c_noise) + W_label sqrt(L) onehot(cond) + W_aug aug).
    label_stage "output" (ADM): emb = SiLU(layer1(SiLU(layer0(embed(c_noise) + W_aug aug))) + W_label onehot(cond)).
    The label and augmentation maps have no bias, so an all-zero label (or ``cond=None``) means "none";
    that is what classifier-free guidance and ScoreAug's identity transform rely on.
    """

    def __init__(
        self,
        noise_channels: int,  # width of the noise-level embedding
        emb_channels: int,  # width of the output vector fed to every block
        embedding_type: str = "positional",  # "positional" (DDPM++) or "fourier" (NCSN++)
        fourier_scale: float = 16.0,  # frequency scale of the Fourier features
        label_dim: int = 0,  # number of classes (0 = unconditional)
        augment_dim: int = 0,  # size of the augmentation label (0 = none)
        label_dropout: float = 0.0,  # probability of dropping the class label in training (for guidance)
        init_mode: str = "xavier_uniform",
        init_scale: float = 1.0,  # weight init scale of the layers
        bias_scale: float = 0.0,  # bias init scale of the layers (0 = zero bias)
        label_stage: str = "noise",  # where the label enters: "noise" (DDPM++) or "output" (ADM)
        endpoint: bool = True,  # positional frequencies include the endpoint (DDPM++) or not (ADM)
        text_dim: int = 0,  # width of a pooled text vector added like the label (0 = no text)
    ) -> None:
        super().__init__()
        if label_stage not in ("noise", "output"):
            raise ValueError(f"label_stage must be 'noise' or 'output', got {label_stage!r}")
        self.label_stage = label_stage
        init = dict(mode=init_mode, scale=init_scale, bias_scale=bias_scale)
        if embedding_type == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(noise_channels, endpoint=endpoint)
        elif embedding_type == "fourier":
            self.map_noise = FourierEmbedding(noise_channels, scale=fourier_scale)
        else:
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.map_label = None
        if label_dim and label_stage == "noise":
            self.map_label = init_weights(nn.Linear(label_dim, noise_channels, bias=False), **init)
        elif label_dim:  # ADM: unit-variance weights on the raw one-hot
            self.map_label = init_weights(
                nn.Linear(label_dim, emb_channels, bias=False), "kaiming_normal", math.sqrt(label_dim)
            )
        self.map_augment = (
            init_weights(nn.Linear(augment_dim, noise_channels, bias=False), **init) if augment_dim else None
        )
        self.map_text = init_weights(nn.Linear(text_dim, noise_channels, bias=False), **init) if text_dim else None
        self.map_layer0 = init_weights(nn.Linear(noise_channels, emb_channels), **init)
        self.map_layer1 = init_weights(nn.Linear(emb_channels, emb_channels), **init)

    def _label(self, cond: Tensor, dtype: torch.dtype) -> Tensor:
        onehot = F.one_hot(cond.long(), self.label_dim).to(dtype) if cond.ndim == 1 else cond.to(dtype)
        if self.training and self.label_dropout > 0:
            keep = torch.rand(onehot.shape[0], 1, device=onehot.device) >= self.label_dropout
            onehot = onehot * keep
        scale = math.sqrt(self.label_dim) if self.label_stage == "noise" else 1.0
        return self.map_label(onehot * scale)

    def forward(
        self, c_noise: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None, text: Tensor | None = None
    ) -> Tensor:
        if cond is not None and self.map_label is None:
            raise ValueError("a class label was given but the backbone has label_dim=0; set label_dim")
        if aug_label is not None and self.map_augment is None:
            raise ValueError("an augmentation label was given but the backbone has augment_dim=0; set augment_dim")
        emb = self.map_noise(c_noise)  # [B, noise_channels]
        if cond is not None and self.label_stage == "noise":
            emb = emb + self._label(cond, emb.dtype)
        if aug_label is not None:
            emb = emb + self.map_augment(aug_label.to(emb.dtype))
        if text is not None:  # the pooled caption vector [B, text_dim], at the label's stage
            if self.map_text is None:
                raise ValueError("a text vector was given but the embedding has text_dim=0")
            emb = emb + self.map_text(text.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if cond is not None and self.label_stage == "output":
            emb = emb + self._label(cond, emb.dtype)
        return F.silu(emb)  # [B, emb_channels]
