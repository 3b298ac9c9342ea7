"""A residual MLP backbone for vector data [B, D] (the GMM experiments), conditioned like the U-Net."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffscore.networks.backbone import Backbone
from diffscore.networks.embedding import ConditionEmbedding
from diffscore.networks.init import init_weights


class MLPBlock(nn.Module):
    """h + W2 dropout(SiLU(LN(W1 SiLU(LN(h))) + A emb)): a pre-norm residual block with the embedding added."""

    def __init__(self, width: int, emb_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm0 = nn.LayerNorm(width)
        self.fc0 = init_weights(nn.Linear(width, width))
        self.affine = init_weights(nn.Linear(emb_channels, width))
        self.norm1 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = init_weights(nn.Linear(width, width), scale=1e-5)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc0(F.silu(self.norm0(h)))
        z = F.silu(self.norm1(z + self.affine(emb)))
        return h + self.fc1(self.dropout(z))


class MLP(Backbone):
    """Backbone F(x_in [B, D], c_noise [B], cond, aug_label) -> [B, D]."""

    def __init__(
        self,
        data_shape: list[int] = [2],  # noqa: B006 - [D] (linked from data)
        width: int = 256,  # hidden width
        depth: int = 4,  # residual blocks
        emb_channels: int = 128,  # conditioning-vector width
        label_dim: int = 0,  # number of classes (0 = unconditional)
        augment_dim: int = 0,  # size of the augmentation label (0 = none)
        dropout: float = 0.0,  # dropout inside blocks
        embedding_type: str = "positional",  # "positional" or "fourier"
    ) -> None:
        super().__init__()
        if len(data_shape) != 1:
            raise ValueError(f"MLP takes vector data, data_shape [D]; got {list(data_shape)}")
        dim = int(data_shape[0])
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"dim, width and depth must be positive, got {dim}, {width}, {depth}")
        self.data_shape = (dim,)
        self.dim = dim
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.emb = ConditionEmbedding(
            emb_channels, emb_channels, embedding_type, label_dim=label_dim, augment_dim=augment_dim
        )
        self.inp = init_weights(nn.Linear(dim, width))
        self.blocks = nn.ModuleList(MLPBlock(width, emb_channels, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = init_weights(nn.Linear(width, dim), scale=1e-5)

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects [B, {self.dim}], got {tuple(x.shape)}")
        emb = self.emb(c_noise, cond, aug_label)  # [B, emb_channels]
        h = self.inp(x)  # [B, width]
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))
