"""LightningModules: EDM training, EDM2 training, score regression (NTK probes) and DisBack distillation. Configs
name them as ``diffscore.lit.modules.<Class>``."""

from diffscore.lit.modules.diffusion import DiffusionModule
from diffscore.lit.modules.disback import DisBackModule
from diffscore.lit.modules.edm2 import EDM2Module
from diffscore.lit.modules.regression import RegressionDiffusionModule

__all__ = ["DiffusionModule", "DisBackModule", "EDM2Module", "RegressionDiffusionModule"]
