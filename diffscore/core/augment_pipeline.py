"""The training augmentation of a denoiser: which augmenters run, on what, and the label the network sees.

Clean-data augmenters (EDM's non-leaky pipeline, Karras et al. 2022 Appendix B.5) transform x0 before the noise is
added; a noisy-data augmenter (ScoreAug, Hou et al. 2025) transforms x0 + sigma n and the target alike. The
augmentation label is the augmenters' labels concatenated in the order given, zero-padded to the backbone's
augment_dim (the identity's label is zero, which is what sampling uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffscore.core.augment import NonLeakyAugment, ScoreAugment


class AugmentPipeline:
    """Augmenters in label order: any number of clean-data ones (NonLeakyAugment), at most one ScoreAugment."""

    def __init__(self, augmenters: Sequence[Any], label_dim: int, image_data: bool) -> None:
        self.augmenters = list(augmenters)
        bad = [type(a).__name__ for a in self.augmenters if not isinstance(a, NonLeakyAugment | ScoreAugment)]
        if bad:
            raise ValueError(f"augmenters must be NonLeakyAugment or ScoreAugment objects, got {bad}")
        noisy = [a for a in self.augmenters if isinstance(a, ScoreAugment)]
        if len(noisy) > 1:
            raise ValueError("at most one ScoreAugment: two noisy-data transforms would not compose with one target")
        self.clean = [a for a in self.augmenters if isinstance(a, NonLeakyAugment)]
        self.noisy = noisy[0] if noisy else None
        self.needed = sum(a.label_dim for a in self.augmenters)
        if label_dim < self.needed:
            names = " + ".join(f"{type(a).__name__} {a.label_dim}" for a in self.augmenters)
            raise ValueError(f"the augmentation label has {self.needed} entries ({names}); augment_dim is {label_dim}")
        if self.augmenters and not image_data:
            raise ValueError("augmentation needs image data [C, H, W]; the backbone makes vectors")
        self.label_dim = label_dim

    def __bool__(self) -> bool:
        return bool(self.augmenters)

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Any, Tensor | None]:
        """(x0 with the clean-data augmentation applied, the noisy augmenter's params or None, the label
        [B, label_dim] or None) for one batch; the parameters are drawn here, in label order."""
        if not self.augmenters:
            return x0, None, None
        B, labels, noisy_params = x0.shape[0], [], None
        for augmenter in self.augmenters:
            params = augmenter.sample_params(B, device=x0.device, generator=generator)
            if augmenter is self.noisy:
                noisy_params = params
            else:
                x0 = augmenter.apply(x0, params)
            labels.append(augmenter.label(params))
        label = torch.cat(labels, dim=1)  # [B, needed]
        return x0, noisy_params, torch.nn.functional.pad(label, (0, self.label_dim - label.shape[1]))
