"""What every diffscore backbone F(x_in, c_noise, cond, aug_label) declares, and the record of how it was built.

A backbone states its data shape, class count, augmentation-label size and text encoder as attributes (callers
read them directly, never probe with getattr), and keeps ``init_kwargs`` (diffscore.core.recorded): a checkpoint
stores ``config(backbone)``, a class name and plain data, and diffscore.loading rebuilds the network from it
through an explicit table of allowed classes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffscore.core.recorded import Recorded, config, plain_data

__all__ = ["Backbone", "BackboneFacts", "config", "plain_data"]


class Backbone(Recorded, nn.Module):
    """Base class of the backbones; subclasses set ``data_shape`` (and the others if they have them)."""

    data_shape: tuple[int, ...]  # [C, H, W] or [D]
    label_dim: int = 0  # number of classes (0: unconditional)
    augment_dim: int = 0  # size of the augmentation label (0: none)
    text_encoder: nn.Module | None  # the caption encoder of a text-conditioned backbone (None: no text)
    init_kwargs: dict[str, Any]  # the constructor's arguments, defaults filled in

    def __init__(self) -> None:
        super().__init__()
        # an instance attribute, not a class default: a class attribute would hide a registered submodule
        self.text_encoder = None


class BackboneFacts:
    """What a holder of a backbone (``self.backbone``: a sampler, a loaded model, a LightningModule) reports about
    the data it models: the shape, the class count, whether it reads captions."""

    backbone: Any

    @property
    def data_shape(self) -> tuple[int, ...]:
        """[C, H, W] for images, [D] for vectors."""
        return tuple(self.backbone.data_shape)

    @property
    def label_dim(self) -> int:
        return self.backbone.label_dim

    @property
    def text_conditioned(self) -> bool:
        return self.backbone.text_encoder is not None

    @property
    def conditional(self) -> bool:
        """Conditioned on class labels or on captions."""
        return self.label_dim > 0 or self.text_conditioned
