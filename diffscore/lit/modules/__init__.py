"""LightningModules: EDM training, score regression (NTK probes), DisBack distillation and the one-step generator it
yields. Configs name them as ``diffscore.lit.modules.<Class>``."""

from diffscore.lit.modules.diffusion import DiffusionModule
from diffscore.lit.modules.disback import DisBackModule
from diffscore.lit.modules.one_step import OneStepGenerator
from diffscore.lit.modules.regression import RegressionDiffusionModule

__all__ = ["DiffusionModule", "DisBackModule", "OneStepGenerator", "RegressionDiffusionModule"]
