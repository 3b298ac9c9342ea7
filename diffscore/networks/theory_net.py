"""The two-layer ReLU network analysed by Han, Razaviyayn & Xu 2024 (arXiv 2401.15604, Sec. 3).

F(x_in, c_noise) = (1 / sqrt(m)) sum_r a_r relu(w_r . z),   z = [x_in, c_noise, 1]

with m hidden units, first-layer weights W [m, D + 2] ~ N(0, 1) (the only trained parameters), and output weights
a [m, D] drawn once from {-1, +1} and then fixed (a buffer, saved with the checkpoint but never trained). The noise
level enters as an input feature, as time does in the paper; the 1/sqrt(m) (NTK) scaling makes the tangent kernel
converge to a deterministic limit as m grows (Jacot et al. 2018), the regime where gradient descent is kernel
regression. Used as a backbone under EDMPrecond like the MLP; unconditional, vector data [B, D].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffscore.networks.backbone import Backbone


class TheoryNet(Backbone):
    """Backbone F(x_in [B, D], c_noise [B], cond, aug_label) -> [B, D]: two-layer ReLU, fixed output weights."""

    def __init__(
        self,
        data_shape: list[int] = [2],  # noqa: B006 - [D] (linked from data)
        width: int = 1024,  # hidden units m
        label_dim: int = 0,  # linked from data; the theory net is unconditional (must be 0)
        bias: bool = True,  # append a constant 1 to the input (a first-layer bias)
    ) -> None:
        super().__init__()
        if len(data_shape) != 1:
            raise ValueError(f"TheoryNet takes vector data, data_shape [D]; got {list(data_shape)}")
        if label_dim:
            raise ValueError(f"TheoryNet is unconditional; got label_dim={label_dim}")
        dim = int(data_shape[0])
        if dim < 1 or width < 1:
            raise ValueError(f"dim and width must be positive, got {dim}, {width}")
        self.data_shape = (dim,)
        self.dim, self.width, self.bias = dim, width, bias
        self.label_dim = 0
        in_features = dim + 1 + int(bias)  # x_in, c_noise[, 1]
        self.weight = nn.Parameter(torch.randn(width, in_features))  # W: w_r ~ N(0, I)
        self.register_buffer("output_weight", torch.randint(0, 2, (width, dim)).float() * 2 - 1)  # a in {-1, 1}

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, aug_label: Tensor | None = None
    ) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"TheoryNet expects [B, {self.dim}], got {tuple(x.shape)}")
        if cond is not None or aug_label is not None:
            raise ValueError("TheoryNet takes no class or augmentation label")
        parts = [x, c_noise.reshape(-1, 1).to(x.dtype)]
        if self.bias:
            parts.append(torch.ones_like(x[:, :1]))
        z = torch.cat(parts, dim=1)  # [B, D + 2]
        hidden = torch.relu(z @ self.weight.T)  # [B, m]
        return hidden @ self.output_weight.to(x.dtype) / math.sqrt(self.width)  # [B, D]
