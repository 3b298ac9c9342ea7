"""LightningModules: EDM training, EDM2 training, score regression (NTK probes), DisBack distillation and Stable
Diffusion fine-tuning. Configs name them as ``diffscore.lit.modules.<Class>``."""

from diffscore.lit.modules.diffusion import DiffusionModule
from diffscore.lit.modules.disback import DisBackModule
from diffscore.lit.modules.edm2 import EDM2Module
from diffscore.lit.modules.regression import RegressionDiffusionModule
from diffscore.lit.modules.stable_diffusion import StableDiffusionModule

__all__ = ["DiffusionModule", "DisBackModule", "EDM2Module", "RegressionDiffusionModule", "StableDiffusionModule"]
